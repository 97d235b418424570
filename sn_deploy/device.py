"""Where calibration runs: the device a user names (or the best one visible), checked up front.

A wrong device must fail before any checkpoint is loaded, in one line that names the problem and
the fix; the messages name the *parameter* (``device``), and the command-line layer maps that to
its flag.  Float64 statistics stay on the device except where it has no float64 (Apple MPS): there
they are kept on the CPU, which costs two tiny copies per layer and batch.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Union

import torch

from sn_deploy.errors import InputError

DeviceSpec = Union[str, torch.device, None]
SUPPORTED = ("cpu", "cuda", "mps")


class DeviceError(InputError):
    """A device that cannot be used; ``str()`` starts with ``device '<spec>'``."""

    def __init__(self, spec: object, problem: str) -> None:
        super().__init__(f"device '{spec}' {problem}")
        self.spec = spec


def default_device() -> torch.device:
    """CUDA when a CUDA device is visible, else the CPU (never MPS unasked: its lack of float64
    makes it a choice, not a default)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(spec: DeviceSpec = None, local_rank: Optional[int] = None,
                   local_world_size: int = 1) -> torch.device:
    """The torch.device for ``spec`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``; None: the default).

    ``local_rank`` (a torchrun launch): a bare ``cuda`` becomes ``cuda:LOCAL_RANK``, so each rank
    of a node takes its own GPU; an explicit index is refused when several ranks share the node
    (they would all use that one GPU).
    """
    if isinstance(spec, torch.device):
        device = spec
    else:
        text = "" if spec is None else str(spec).strip()
        if not text:
            device = default_device()
        else:
            try:
                device = torch.device(text)
            except RuntimeError:
                raise DeviceError(text, "is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type not in SUPPORTED:
        raise DeviceError(device, f"is not supported for calibration; use {', '.join(SUPPORTED)}")
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(device, "is not available on this machine (no Apple GPU, or torch "
                                      "built without MPS); use cpu")
        return torch.device("mps")
    return _cuda_device(device, local_rank, local_world_size)


def _cuda_device(device: torch.device, local_rank: Optional[int],
                 local_world_size: int) -> torch.device:
    if device.index is not None and local_rank is not None and local_world_size > 1:
        raise DeviceError(device, f"names one GPU for all {local_world_size} ranks of this node; "
                                  "use cuda (each rank takes cuda:LOCAL_RANK)")
    if not torch.cuda.is_available():
        why = ("this torch build has no CUDA support (torch " + torch.__version__ + ")"
               if torch.version.cuda is None else
               "no CUDA device is visible (check the driver, nvidia-smi and CUDA_VISIBLE_DEVICES)")
        raise DeviceError(device, f"cannot be used: {why}; use cpu")
    count = torch.cuda.device_count()
    if device.index is None and local_rank is not None:
        if local_rank >= count:
            raise DeviceError(device, f"is cuda:{local_rank} for LOCAL_RANK {local_rank}, but "
                                      f"{count} GPU(s) are visible; start at most {count} "
                                      "rank(s) per node")
        return torch.device("cuda", local_rank)
    index = device.index or 0
    if index >= count:
        raise DeviceError(device, f"does not exist: {count} GPU(s) are visible; use cuda:0 to "
                                  f"cuda:{count - 1}")
    return torch.device("cuda", index)


def torchrun_local_rank() -> tuple[Optional[int], int]:
    """(LOCAL_RANK, LOCAL_WORLD_SIZE) of a torchrun launch; (None, 1) outside one."""
    if "LOCAL_RANK" not in os.environ:
        return None, 1
    return int(os.environ["LOCAL_RANK"]), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def statistics_device(device: torch.device) -> torch.device:
    """Where float64 sums live: on the device, except on one without float64 (MPS: the CPU)."""
    return torch.device("cpu") if device.type == "mps" else device


def moments_dtype(device: torch.device) -> torch.dtype:
    """The widest float the device computes in (float64; float32 on MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (asynchronous devices), so a timing covers the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@contextlib.contextmanager
def ieee_fp32(device: torch.device) -> Iterator[None]:
    """Full-precision float32 convolutions and matmuls on CUDA (no TF32) inside the block.

    cuDNN convolves in TF32 by default (10-bit mantissa): statistics would then depend on the
    GPU generation and differ from the CPU's by ~1e-3.  Calibration runs once and its results
    are stored, so it runs in IEEE float32; the flags are restored afterwards.
    """
    if device.type != "cuda":
        yield
        return
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved
