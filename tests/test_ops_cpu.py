"""The compiled CPU kernel against the float64 reference."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sn_deploy import ops, reference as R

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not ops.available(), reason="libsn_cpu.so could not be built")


def params(C, nw, using_bn, seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        scale=rng.normal(1, 0.2, C).astype(np.float32), bias=rng.normal(0, 0.2, C).astype(np.float32),
        running_mean=rng.normal(0, 1, C).astype(np.float32) if using_bn else None,
        running_var=rng.uniform(0.5, 2, C).astype(np.float32) if using_bn else None,
        mean_weights=R.softmax(rng.normal(size=nw)).astype(np.float32),
        var_weights=R.softmax(rng.normal(size=nw)).astype(np.float32))


def ref(x, p, relu=False, residual=None):
    return R.switchable_norm(x.astype(np.float64), p["scale"], p["bias"], p["mean_weights"],
                             p["var_weights"], p["running_mean"], p["running_var"], relu=relu,
                             residual=None if residual is None else residual.astype(np.float64))


def nweights(shape, using_bn):
    return 2 if (len(shape) == 2 or not using_bn) else 3


SHAPES = [((3, 5, 7, 11), True), ((1, 3, 5, 7), True), ((3, 4, 6, 6), False),
          ((2, 3, 3, 4, 5), True), ((4, 7), True), ((1, 16, 600, 601), True)]


@pytest.mark.parametrize("shape,using_bn", SHAPES)
@pytest.mark.parametrize("relu", [False, True])
def test_fp32_matches_reference(shape, using_bn, relu, rng):
    p = params(shape[1], nweights(shape, using_bn), using_bn)
    x = rng.normal(0.3, 2.0, size=shape).astype(np.float32)
    y = ops.switchable_norm_cpu(x, **p, relu=relu)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, ref(x, p, relu), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,using_bn", SHAPES)
@pytest.mark.parametrize("relu", [False, True])
def test_fp16_matches_reference(shape, using_bn, relu, rng):
    """float16 in/out: within the output's own rounding (half an ulp is 4.9e-4 relative)."""
    p = params(shape[1], nweights(shape, using_bn), using_bn)
    x = rng.normal(0.3, 2.0, size=shape).astype(np.float16)
    y = ops.switchable_norm_cpu(x, **p, relu=relu)
    assert y.dtype == np.float16 and y.shape == x.shape
    np.testing.assert_allclose(y.astype(np.float64), ref(x, p, relu), rtol=2e-3, atol=4e-3)


@pytest.mark.parametrize("shape,using_bn", SHAPES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_fused_residual_matches_reference(shape, using_bn, relu, dtype, rng):
    """relu?(SN(x) + residual) in one pass, every rank, both dtypes (fp16: one rounding)."""
    p = params(shape[1], nweights(shape, using_bn), using_bn)
    x = rng.normal(0.3, 2.0, size=shape).astype(dtype)
    r = rng.normal(-0.5, 1.5, size=shape).astype(dtype)
    y = ops.switchable_norm_cpu(x, **p, relu=relu, residual=r)
    assert y.dtype == dtype and y.shape == x.shape
    tol = dict(rtol=2e-3, atol=4e-3) if dtype == np.float16 else dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y.astype(np.float64), ref(x, p, relu, residual=r), **tol)
    without = ops.switchable_norm_cpu(x, **p).astype(np.float64)
    assert np.abs(y.astype(np.float64) - without).max() > 0.1  # the residual did take part


def test_fused_residual_in_place_and_threads(rng):
    """The residual's buffer may be the output (y += SN(x) in place); threads agree bitwise."""
    p = params(32, 3, True)
    x = rng.normal(size=(4, 32, 40, 40)).astype(np.float32)
    r = rng.normal(size=x.shape).astype(np.float32)
    one = ops.switchable_norm_cpu(x, **p, relu=True, residual=r, num_threads=1)
    for t in (2, 0):
        np.testing.assert_array_equal(ops.switchable_norm_cpu(x, **p, relu=True, residual=r,
                                                              num_threads=t), one)
    buf = r.copy()
    assert ops.switchable_norm_cpu(x, **p, relu=True, residual=buf, out=buf) is buf
    np.testing.assert_array_equal(buf, one)


def test_fused_residual_argument_checks():
    p = params(3, 3, True)
    x = np.ones((2, 3, 4, 4), np.float32)
    with pytest.raises(ValueError, match="residual must have the input's shape and dtype"):
        ops.switchable_norm_cpu(x, **p, residual=np.ones((2, 3, 4, 1), np.float32))
    with pytest.raises(ValueError, match="residual must have the input's shape and dtype"):
        ops.switchable_norm_cpu(x, **p, residual=np.ones((2, 3, 4, 4), np.float16))


@pytest.mark.parametrize("shape,using_bn", SHAPES[:5])
def test_offset_inputs_within_1e5_relative(shape, using_bn, rng):
    """Mean 1000x the std: float32 output within 1e-5 relative of float64."""
    p = params(shape[1], nweights(shape, using_bn), using_bn)
    x = (1000.0 + rng.normal(size=shape)).astype(np.float32)
    y = ops.switchable_norm_cpu(x, **p)
    expected = ref(x, p)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_fp16_accuracy_and_no_overflow_near_6e4(rng):
    p = params(4, 3, True)
    x = (6.0e4 + 50 * rng.normal(size=(2, 4, 16, 16))).astype(np.float16)
    assert np.isfinite(x).all()
    y = ops.switchable_norm_cpu(x, **p)
    assert y.dtype == np.float16 and np.isfinite(y).all()
    np.testing.assert_allclose(y.astype(np.float64), ref(x, p), atol=2e-2, rtol=1e-2)
    x2 = rng.normal(size=(3, 4, 9, 9)).astype(np.float16)
    np.testing.assert_allclose(ops.switchable_norm_cpu(x2, **p).astype(np.float64), ref(x2, p),
                               atol=1e-2, rtol=1e-2)


def test_constant_planes(rng):
    p = params(3, 3, True)
    x = np.broadcast_to(np.array([1.0, -2.0, 5.0], np.float32)[None, :, None, None],
                        (2, 3, 4, 4)).copy()
    y = ops.switchable_norm_cpu(x, **p)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, ref(x, p), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (2, 3, 1), (1, 2, 1, 1, 1), (4, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_degenerate_is_an_error(shape, dtype):
    """One value per normalized group: 0/0 unbiased variance is refused, never NaN."""
    using_bn = True
    p = params(shape[1], nweights(shape, using_bn), using_bn)
    with pytest.raises(ValueError, match="unbiased variance divides by zero"):
        ops.switchable_norm_cpu(np.ones(shape, dtype), **p)


def test_argument_checks():
    p = params(3, 3, True)
    with pytest.raises(ValueError, match="float32 or float16"):
        ops.switchable_norm_cpu(np.ones((2, 3, 4, 4)), **p)
    with pytest.raises(ValueError, match="C=4"):
        ops.switchable_norm_cpu(np.ones((2, 4, 4, 4), np.float32), **p)
    with pytest.raises(ValueError, match="mixing weights"):
        ops.switchable_norm_cpu(np.ones((2, 3, 4, 4), np.float32), **{**p, "running_mean": None,
                                                                       "running_var": None})
    with pytest.raises(ValueError, match="rank-2"):
        ops.switchable_norm_cpu(np.ones((2, 3), np.float32), **{**p, "running_mean": None,
                                                                "running_var": None})
    with pytest.raises(ValueError, match="together"):
        ops.switchable_norm_cpu(np.ones((2, 3, 4, 4), np.float32), **{**p, "running_var": None})


def test_threads_give_identical_results(rng):
    p = params(32, 3, True)
    x = rng.normal(size=(4, 32, 40, 40)).astype(np.float32)
    one = ops.switchable_norm_cpu(x, **p, num_threads=1)
    for t in (2, 3, 0):
        np.testing.assert_array_equal(ops.switchable_norm_cpu(x, **p, num_threads=t), one)


def test_out_buffer(rng):
    p = params(3, 3, True)
    x = rng.normal(size=(2, 3, 5, 5)).astype(np.float32)
    out = np.empty_like(x)
    assert ops.switchable_norm_cpu(x, **p, out=out) is out
    with pytest.raises(ValueError, match="out must be"):
        ops.switchable_norm_cpu(x, **p, out=np.empty((2, 3, 5, 4), np.float32))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(2, 7),
       spatial=st.lists(st.integers(1, 9), min_size=0, max_size=3).filter(
           lambda s: len(s) == 0 or int(np.prod(s)) >= 2),
       using_bn=st.booleans(), relu=st.booleans(), half=st.booleans(), residual=st.booleans(),
       loc=st.sampled_from([0.0, 1.0, 100.0]), seed=st.integers(0, 10_000))
def test_property(n, c, spatial, using_bn, relu, half, residual, loc, seed):
    """Random small shapes of every rank (2: SwitchNorm1d), both dtypes, offset inputs, with and
    without a fused residual."""
    shape = (n, c, *spatial)
    using_bn = using_bn or len(shape) == 2
    p = params(c, nweights(shape, using_bn), using_bn, seed)
    gen = np.random.default_rng(seed)
    dtype = np.float16 if half else np.float32
    x = gen.normal(loc, 3.0, size=shape).astype(dtype)
    r = gen.normal(0.0, 2.0, size=shape).astype(dtype) if residual else None
    y = ops.switchable_norm_cpu(x, **p, relu=relu, residual=r).astype(np.float64)
    tol = dict(rtol=2e-3, atol=4e-3) if half else dict(rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(y, ref(x, p, relu, residual=r), **tol)


def test_missing_toolchain_is_a_clear_runtime_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SN_DEPLOY_PLUGIN_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(RuntimeError, match="cmake -S plugins -B build/plugins"):
        ops._build_cpu_library()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_builds_on_first_use(tmp_path):
    """A fresh process with an empty plugin folder configures and builds libsn_cpu.so itself."""
    code = ("import numpy as np; from sn_deploy import ops; "
            "y = ops.switchable_norm_cpu(np.ones((1, 2, 2, 2), np.float32), np.ones(2), np.zeros(2), "
            "None, None, [0.5, 0.5], [0.5, 0.5]); print(ops.library_path())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "SN_DEPLOY_PLUGIN_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "libsn_cpu.so").is_file()
