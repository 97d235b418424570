"""The CUDA kernels: compiled here (nvcc), exercised on a GPU where one is present (marked gpu)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from sn_deploy import ops, reference as R

ROOT = Path(__file__).resolve().parents[1]
CU = ROOT / "plugins" / "switchable_norm" / "sn_cuda.cu"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_compiles_for_sm90_without_warnings(tmp_path):
    proc = subprocess.run(["nvcc", "-std=c++17", "-O3", "-arch=sm_90", "-Xcompiler", "-fPIC",
                           "-Werror", "all-warnings", "-c", str(CU), "-o", str(tmp_path / "k.o")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(not ops.library_path("sn_cuda").is_file() or shutil.which("readelf") is None,
                    reason="libsn_cuda.so not built (make plugins) or readelf missing")
def test_library_needs_no_driver_and_exports_the_api():
    """libsn_cuda.so links cudart statically: it loads where only the driver is installed, and
    links where not even that is (no libcuda / libcudart in NEEDED)."""
    lib = str(ops.library_path("sn_cuda"))
    needed = subprocess.run(["readelf", "-d", lib], capture_output=True, text=True).stdout
    assert "libcuda.so" not in needed and "libcudart" not in needed, needed
    symbols = subprocess.run(["readelf", "--dyn-syms", "-W", lib], capture_output=True, text=True).stdout
    for name in ("sn_forward_cuda", "sn_cuda_workspace_size", "sn_error_string"):
        assert f" {name}" in symbols


def _gpu_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch missing"
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    if not ops.library_path("sn_cuda").is_file():
        return "libsn_cuda.so not built (make plugins)"
    return None


gpu = pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))


def run_cuda(x, p, relu=False, misalign=False, residual=None):
    """Run libsn_cuda.so on numpy data through :class:`ops.CudaSwitchableNorm` (``misalign``:
    True puts x, y and the residual, "residual" only the residual, one element past an aligned
    address, so the vectorized paths must step aside)."""
    import torch

    sn = ops.CudaSwitchableNorm(x.shape, x.dtype == np.float16, p["scale"], p["bias"],
                                p["running_mean"], p["running_var"], p["mean_weights"],
                                p["var_weights"], 1e-5, relu)

    def upload(a, shifted):
        if not shifted:
            return torch.from_numpy(np.ascontiguousarray(a)).cuda()
        t = torch.empty(a.size + 1, dtype=torch.from_numpy(a).dtype, device="cuda")[1:].view(a.shape)
        return t.copy_(torch.from_numpy(np.ascontiguousarray(a)))

    xt = upload(x, misalign is True)
    yt = upload(np.empty_like(x), misalign is True)
    rt = upload(residual, bool(misalign)) if residual is not None else None
    sn(xt, out=yt, residual=rt)
    torch.cuda.synchronize()
    return yt.cpu().numpy()


def params(C, nw, using_bn, seed=0):
    rng = np.random.default_rng(seed)
    return dict(scale=rng.normal(1, 0.2, C), bias=rng.normal(0, 0.2, C),
                running_mean=rng.normal(0, 1, C) if using_bn else None,
                running_var=rng.uniform(0.5, 2, C) if using_bn else None,
                mean_weights=R.softmax(rng.normal(size=nw)), var_weights=R.softmax(rng.normal(size=nw)))


def ref(x, p, relu=False, residual=None):
    f32 = lambda a: None if a is None else np.asarray(a, np.float32)  # noqa: E731
    return R.switchable_norm(x.astype(np.float64), f32(p["scale"]), f32(p["bias"]),
                             f32(p["mean_weights"]), f32(p["var_weights"]), f32(p["running_mean"]),
                             f32(p["running_var"]), relu=relu,
                             residual=None if residual is None else residual.astype(np.float64))


CASES = [((2, 5, 7, 11), True), ((1, 64, 56, 56), True), ((8, 3, 300, 301), True),
         ((3, 4, 6, 6), False), ((2, 3, 3, 4, 5), True), ((16, 7), True), ((4, 2048), True)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape,using_bn", CASES)
@pytest.mark.parametrize("relu", [False, True])
def test_fp32_matches_reference(shape, using_bn, relu):
    nw = 2 if (len(shape) == 2 or not using_bn) else 3
    p = params(shape[1], nw, using_bn)
    x = np.random.default_rng(1).normal(0.5, 2, size=shape).astype(np.float32)
    np.testing.assert_allclose(run_cuda(x, p, relu), ref(x, p, relu), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", [(2, 8, 32, 32), (4, 16)])
def test_offset_inputs(shape):
    p = params(shape[1], 3 if len(shape) > 2 else 2, True)
    x = (1000 + np.random.default_rng(2).normal(size=shape)).astype(np.float32)
    expected = ref(x, p)
    np.testing.assert_allclose(run_cuda(x, p), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.gpu
@gpu
def test_fp16_and_large_values():
    p = params(4, 3, True)
    x = (6.0e4 + 50 * np.random.default_rng(3).normal(size=(2, 4, 16, 16))).astype(np.float16)
    y = run_cuda(x, p)
    assert y.dtype == np.float16 and np.isfinite(y).all()
    np.testing.assert_allclose(y.astype(np.float64), ref(x, p), atol=2e-2, rtol=1e-2)


@pytest.mark.gpu
@gpu
def test_deterministic_and_degenerate():
    p = params(32, 3, True)
    x = np.random.default_rng(4).normal(size=(8, 32, 64, 64)).astype(np.float32)
    np.testing.assert_array_equal(run_cuda(x, p), run_cuda(x, p))
    with pytest.raises(ValueError, match="one element per normalized group"):
        run_cuda(np.ones((2, 32, 1, 1), np.float32), p)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape,using_bn", CASES)
@pytest.mark.parametrize("relu", [False, True])
def test_fp16_matches_reference(shape, using_bn, relu):
    nw = 2 if (len(shape) == 2 or not using_bn) else 3
    p = params(shape[1], nw, using_bn)
    x = np.random.default_rng(5).normal(0.5, 2, size=shape).astype(np.float16)
    y = run_cuda(x, p, relu)
    assert y.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float64), ref(x, p, relu), rtol=2e-3, atol=4e-3)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape", [(2, 8, 32, 32), (3, 6, 20, 20), (4, 64)])
def test_misaligned_pointers_take_the_scalar_path(dtype, shape):
    p = params(shape[1], 3 if len(shape) > 2 else 2, True)
    x = np.random.default_rng(6).normal(size=shape).astype(dtype)
    tol = dict(rtol=2e-3, atol=4e-3) if dtype == np.float16 else dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run_cuda(x, p, misalign=True).astype(np.float64), ref(x, p), **tol)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape,using_bn", CASES)
@pytest.mark.parametrize("misalign", [False, True, "residual"],
                         ids=["aligned", "misaligned", "residual-misaligned"])
def test_fused_residual_matches_reference(dtype, shape, using_bn, misalign):
    """relu(SN(x) + r) on the vectorized (float4/half2), scalar and rank-2 apply paths."""
    nw = 2 if (len(shape) == 2 or not using_bn) else 3
    p = params(shape[1], nw, using_bn)
    rng = np.random.default_rng(8)
    x = rng.normal(0.5, 2, size=shape).astype(dtype)
    r = rng.normal(-0.5, 1.5, size=shape).astype(dtype)
    y = run_cuda(x, p, relu=True, misalign=misalign, residual=r)
    assert y.dtype == dtype
    tol = dict(rtol=2e-3, atol=4e-3) if dtype == np.float16 else dict(rtol=1e-5, atol=1e-5)
    expected = ref(x, p, relu=True, residual=r)
    np.testing.assert_allclose(y.astype(np.float64), expected, **tol)


@pytest.mark.gpu
@gpu
def test_fp16_deterministic():
    p = params(64, 3, True)
    x = np.random.default_rng(7).normal(size=(4, 64, 56, 56)).astype(np.float16)
    np.testing.assert_array_equal(run_cuda(x, p), run_cuda(x, p))
