"""torch.distributed set-up for multi-process calibration (launched by ``torchrun``).

The backend follows the rank's device: nccl for a CUDA device, gloo otherwise.  NCCL reduces
CUDA tensors only and gloo is used here for CPU tensors, so every all-reduce goes through
:func:`all_reduce_sum`, which places the tensor on the backend's device and hands the result back
where the caller keeps it.
"""
from __future__ import annotations

import os

import torch

from sn_deploy.errors import InputError


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def collective_device(backend: str, device: torch.device) -> torch.device:
    """Where the backend's collectives take tensors: the rank's GPU for nccl, the CPU for gloo."""
    if backend != "nccl":
        return torch.device("cpu")
    return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())


def init_from_env(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; returns (rank, world size).

    ``device`` is this rank's device (see :func:`sn_deploy.device.resolve_device`): nccl on a CUDA
    device (made the current one), gloo otherwise.
    """
    import torch.distributed as dist

    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise InputError(f"--distributed needs a torchrun launch ({', '.join(missing)} not set): "
                         "torchrun --nproc_per_node=N $(which sn-calibrate) ... --distributed")
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(device)
        dist.init_process_group(backend, device_id=device)
    else:
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def all_reduce_sum(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum ``tensor`` over every rank (``device``: this rank's), through the backend's device;
    the result comes back on the tensor's own device."""
    import torch.distributed as dist

    buffer = tensor.to(collective_device(dist.get_backend(), device), copy=True)
    dist.all_reduce(buffer)
    return buffer.to(tensor.device)


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
