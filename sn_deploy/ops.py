"""Python face of the native Switchable Normalization kernels (``plugins/switchable_norm``).

The libraries are loaded with ctypes; ``libsn_cpu.so`` is built on first use (CMake) when it is
missing, so ``pip install -e .`` never needs a compiler for the pure-Python pipeline.
``SN_DEPLOY_PLUGIN_DIR`` points at another build folder.
"""
from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SN_OK, SN_ERR_INVALID_ARGUMENT, SN_ERR_DEGENERATE, SN_ERR_CUDA = 0, 1, 2, 3
_build_lock = threading.Lock()


class NativeBuildError(RuntimeError):
    """The native library is missing and cannot be built here."""


class SnParams(ctypes.Structure):
    """Mirror of ``SnParams`` in ``sn_kernels.h``."""

    _fields_ = [
        ("N", ctypes.c_int64), ("C", ctypes.c_int64), ("L", ctypes.c_int64),
        ("rank2", ctypes.c_int32), ("using_bn", ctypes.c_int32),
        ("mean_w", ctypes.c_float * 3), ("var_w", ctypes.c_float * 3),
        ("eps", ctypes.c_float), ("relu", ctypes.c_int32),
        ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
        ("running_mean", ctypes.c_void_p), ("running_var", ctypes.c_void_p),
        ("residual", ctypes.c_void_p),
    ]


def plugin_dir() -> Path:
    return Path(os.environ.get("SN_DEPLOY_PLUGIN_DIR", ROOT / "build" / "plugins"))


def library_path(name: str = "sn_cpu") -> Path:
    return plugin_dir() / f"lib{name}.so"


def _build_cpu_library() -> None:
    compilers = (os.environ.get("CXX"), "c++", "g++", "clang++")
    if shutil.which("cmake") is None or not any(c and shutil.which(c) for c in compilers):
        raise NativeBuildError(
            f"{library_path()} is missing and cmake/a C++ compiler are not installed; install "
            "them or build with `cmake -S plugins -B build/plugins && cmake --build build/plugins`")
    build = plugin_dir()
    cmds = [["cmake", "-S", str(ROOT / "plugins"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"],
            ["cmake", "--build", str(build), "--target", "sn_cpu", "-j2"]]
    for cmd in cmds:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise NativeBuildError(f"building libsn_cpu.so failed: {' | '.join(tail)}")


@functools.lru_cache(maxsize=None)
def _load(name: str, build: bool) -> ctypes.CDLL:
    path = library_path(name)
    if not path.is_file():
        if not build:
            raise NativeBuildError(f"{path} not found; build it with `make plugins`")
        with _build_lock:
            if not path.is_file():
                _build_cpu_library()
    # OpenMP workers must sleep between calls, not spin: the kernel runs inside onnxruntime and
    # PyTorch processes whose own threads would lose their cores to spinning workers.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    lib = ctypes.CDLL(str(path))
    lib.sn_error_string.restype = ctypes.c_char_p
    lib.sn_error_string.argtypes = [ctypes.c_int]
    return lib


def cpu_library() -> ctypes.CDLL:
    lib = _load("sn_cpu", True)
    for fn in (lib.sn_forward_cpu_f32, lib.sn_forward_cpu_f16):
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.POINTER(SnParams), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.sn_forward_cpu_nchwc_f32.restype = ctypes.c_int
    lib.sn_forward_cpu_nchwc_f32.argtypes = [ctypes.POINTER(SnParams), ctypes.c_int64,
                                             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return lib


def available() -> bool:
    """True when the CPU kernel is built (or builds now) and loads."""
    try:
        cpu_library()
        return True
    except (NativeBuildError, OSError):
        return False


def make_params(
    shape: Sequence[int],
    scale: np.ndarray,
    bias: np.ndarray,
    running_mean: Optional[np.ndarray],
    running_var: Optional[np.ndarray],
    mean_weights: Sequence[float],
    var_weights: Sequence[float],
    eps: float,
    relu: bool,
) -> tuple[SnParams, list]:
    """SnParams for a tensor shape; also returns the arrays that must stay alive during the call."""
    if len(shape) < 2:
        raise ValueError(f"SwitchableNorm needs (N, C, ...) input, got shape {tuple(shape)}")
    N, C = int(shape[0]), int(shape[1])
    L = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    rank2 = len(shape) == 2
    using_bn = running_mean is not None
    if using_bn != (running_var is not None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    if rank2 and not using_bn:
        raise ValueError("rank-2 (SwitchNorm1d) input needs running_mean/running_var: its weights "
                         "are [LN, BN]")
    nw = len(mean_weights)
    if nw != len(var_weights) or nw != (2 if rank2 or not using_bn else 3):
        raise ValueError(f"{nw} mixing weights do not fit a rank-{len(shape)} input with "
                         f"using_bn={using_bn}")
    keep = [np.ascontiguousarray(a, np.float32).reshape(-1) if a is not None else None
            for a in (scale, bias, running_mean, running_var)]
    for a in keep:
        if a is not None and a.size != C:
            raise ValueError(f"per-channel arrays must have C={C} elements, got {a.size}")
    p = SnParams(N=N, C=C, L=L, rank2=int(rank2), using_bn=int(using_bn), eps=float(eps),
                 relu=int(relu))
    for i in range(nw):
        p.mean_w[i], p.var_w[i] = float(mean_weights[i]), float(var_weights[i])
    p.scale, p.bias = keep[0].ctypes.data, keep[1].ctypes.data
    if using_bn:
        p.running_mean, p.running_var = keep[2].ctypes.data, keep[3].ctypes.data
    return p, keep


def check(code: int, lib: ctypes.CDLL) -> None:
    if code != SN_OK:
        raise ValueError(f"SwitchableNorm kernel: {lib.sn_error_string(code).decode()}")


def switchable_norm_cpu(
    x: np.ndarray,
    scale: np.ndarray,
    bias: np.ndarray,
    running_mean: Optional[np.ndarray],
    running_var: Optional[np.ndarray],
    mean_weights: Sequence[float],
    var_weights: Sequence[float],
    eps: float = 1e-5,
    relu: bool = False,
    num_threads: int = 0,
    out: Optional[np.ndarray] = None,
    residual: Optional[np.ndarray] = None,
    *,
    nchwc_block: int = 0,
    channels: Optional[int] = None,
) -> np.ndarray:
    """SN inference on the CPU kernel: float32/float16 NCHW (or (N, C)) in, same dtype out.

    Mixing weights are already softmaxed; running stats are None when the layer has no BN branch.
    ``out`` (C-contiguous, same shape and dtype) avoids allocating the result. ``residual`` (the
    input's shape and dtype) is a fused skip connection: ``y = relu?(SN(x) + residual)``.
    ``nchwc_block`` > 0: x, the residual and y are float32 in onnxruntime's blocked NCHWc layout
    (see :func:`to_nchwc`), axis 1 padded; ``channels`` is then the real C.
    """
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float16):
        raise ValueError(f"switchable_norm_cpu takes float32 or float16, got {x.dtype}")
    x = np.ascontiguousarray(x)
    logical = x.shape
    if nchwc_block:
        c = int(channels if channels is not None else x.shape[1])
        padded = -(-c // nchwc_block) * nchwc_block
        if x.dtype != np.float32 or x.ndim < 3 or x.shape[1] != padded:
            raise ValueError(f"an NCHWc tensor of {c} channels in blocks of {nchwc_block} is "
                             f"float32 with {padded} on axis 1, got {x.dtype} {x.shape}")
        logical = (x.shape[0], c) + x.shape[2:]
    if residual is not None:
        residual = np.asarray(residual)
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual must have the input's shape and dtype {x.shape} {x.dtype}, "
                             f"got {residual.shape} {residual.dtype}")
        residual = np.ascontiguousarray(residual)
    lib = cpu_library()
    params, keep = make_params(logical, scale, bias, running_mean, running_var, mean_weights,
                               var_weights, eps, relu)
    if residual is not None:
        params.residual = residual.ctypes.data
    if out is None:
        y = np.empty_like(x)
    elif out.shape != x.shape or out.dtype != x.dtype or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous array of the input's shape and dtype")
    else:
        y = out
    if nchwc_block:
        code = lib.sn_forward_cpu_nchwc_f32(ctypes.byref(params), int(nchwc_block), x.ctypes.data,
                                            y.ctypes.data, int(num_threads))
    else:
        fn = lib.sn_forward_cpu_f32 if x.dtype == np.float32 else lib.sn_forward_cpu_f16
        code = fn(ctypes.byref(params), x.ctypes.data, y.ctypes.data, int(num_threads))
    check(code, lib)
    del keep, residual
    return y


def cuda_library() -> ctypes.CDLL:
    """libsn_cuda.so (never built on first use: it needs nvcc; ``make plugins``)."""
    lib = _load("sn_cuda", False)
    lib.sn_cuda_workspace_size.restype = ctypes.c_size_t
    lib.sn_cuda_workspace_size.argtypes = [ctypes.c_int64] * 3
    lib.sn_forward_cuda.restype = ctypes.c_int
    lib.sn_forward_cuda.argtypes = [ctypes.POINTER(SnParams), ctypes.c_int] + [ctypes.c_void_p] * 4
    return lib


class CudaSwitchableNorm:
    """One SN layer on the CUDA kernel, for torch CUDA tensors of one shape and dtype.

    The per-channel parameters and the workspace are uploaded once, so a call is the kernel
    launch alone (what a TensorRT engine does per layer); tests and benchmarks share it.
    """

    def __init__(
        self,
        shape: Sequence[int],
        half: bool,
        scale: np.ndarray,
        bias: np.ndarray,
        running_mean: Optional[np.ndarray],
        running_var: Optional[np.ndarray],
        mean_weights: Sequence[float],
        var_weights: Sequence[float],
        eps: float = 1e-5,
        relu: bool = False,
    ) -> None:
        import torch

        self.lib = cuda_library()
        self.shape, self.half = tuple(int(d) for d in shape), bool(half)
        self.params, host = make_params(self.shape, scale, bias, running_mean, running_var,
                                        mean_weights, var_weights, eps, relu)
        names = ("scale", "bias", "running_mean", "running_var")
        self._device = {k: torch.from_numpy(a).cuda() for k, a in zip(names, host) if a is not None}
        for k in names:
            setattr(self.params, k, self._device[k].data_ptr() if k in self._device else None)
        p = self.params
        size = self.lib.sn_cuda_workspace_size(p.N, p.C, p.L if not p.rank2 else 1)
        self.workspace = torch.empty(max(int(size), 1), dtype=torch.uint8, device="cuda")

    def __call__(self, x, out=None, residual=None):
        """y = relu?(SN(x) + residual) on the current stream; ``out`` may be preallocated."""
        import torch

        want = torch.float16 if self.half else torch.float32
        for name, t in (("x", x), ("out", out), ("residual", residual)):
            if t is not None and (tuple(t.shape) != self.shape or t.dtype != want
                                  or not t.is_cuda or not t.is_contiguous()):
                raise ValueError(f"{name} must be a contiguous CUDA {want} tensor of shape "
                                 f"{self.shape}")
        y = torch.empty_like(x) if out is None else out
        self.params.residual = residual.data_ptr() if residual is not None else None
        stream = torch.cuda.current_stream().cuda_stream
        check(self.lib.sn_forward_cuda(ctypes.byref(self.params), int(self.half), x.data_ptr(),
                                       y.data_ptr(), self.workspace.data_ptr(), stream), self.lib)
        return y


def to_nchwc(x: np.ndarray, block: int) -> np.ndarray:
    """NCHW (N, C, *spatial) → onnxruntime's blocked NCHWc layout, channels zero-padded to a
    multiple of ``block``, as the logical (N, C_padded, *spatial) array ORT passes around."""
    n, c = x.shape[:2]
    cp = -(-c // block) * block
    padded = np.zeros((n, cp) + x.shape[2:], x.dtype)
    padded[:, :c] = x
    blocked = padded.reshape((n, cp // block, block) + x.shape[2:])
    order = (0, 1) + tuple(range(3, x.ndim + 1)) + (2,)
    return np.ascontiguousarray(blocked.transpose(order)).reshape(padded.shape)


def from_nchwc(x: np.ndarray, channels: int, block: int) -> np.ndarray:
    """The inverse of :func:`to_nchwc` (padding channels dropped)."""
    n, cp = x.shape[:2]
    blocked = x.reshape((n, cp // block) + x.shape[2:] + (block,))
    nd = blocked.ndim
    order = (0, 1, nd - 1) + tuple(range(2, nd - 1))
    return np.ascontiguousarray(blocked.transpose(order)).reshape((n, cp) + x.shape[2:])[:, :channels]
