"""The compiled CPU kernel against the float64 reference."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sn_deploy import ops, reference as R

pytestmark = pytest.mark.skipif(not ops.available(), reason="libsn_cpu.so could not be built")


def params(C, nw, using_bn, seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        scale=rng.normal(1, 0.2, C).astype(np.float32), bias=rng.normal(0, 0.2, C).astype(np.float32),
        running_mean=rng.normal(0, 1, C).astype(np.float32) if using_bn else None,
        running_var=rng.uniform(0.5, 2, C).astype(np.float32) if using_bn else None,
        mean_weights=R.softmax(rng.normal(size=nw)).astype(np.float32),
        var_weights=R.softmax(rng.normal(size=nw)).astype(np.float32))


def ref(x, p, relu=False):
    return R.switchable_norm(x.astype(np.float64), p["scale"], p["bias"], p["mean_weights"],
                             p["var_weights"], p["running_mean"], p["running_var"], relu=relu)


def nweights(shape, using_bn):
    return 2 if (len(shape) == 2 or not using_bn) else 3


SHAPES = [((2, 5, 7, 11), True), ((1, 3, 5, 7), True), ((3, 4, 6, 6), False),
          ((2, 3, 3, 4, 5), True), ((4, 7), True), ((1, 16, 600, 601), True)]


@pytest.mark.parametrize("shape,using_bn", SHAPES)
@pytest.mark.parametrize("relu", [False, True])
def test_fp32_matches_reference(shape, using_bn, relu, rng):
    p = params(shape[1], nweights(shape, using_bn), using_bn)
    x = rng.normal(0.3, 2.0, size=shape).astype(np.float32)
    y = ops.switchable_norm_cpu(x, **p, relu=relu)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, ref(x, p, relu), rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (4, 1)])
def test_degenerate_is_an_error(shape):
    using_bn = True
    p = params(shape[1], nweights(shape, using_bn), using_bn)
    with pytest.raises(ValueError, match="unbiased variance divides by zero"):
        ops.switchable_norm_cpu(np.ones(shape, np.float32), **p)


def test_argument_checks():
    p = params(3, 3, True)
    with pytest.raises(ValueError, match="float32 or float16"):
        ops.switchable_norm_cpu(np.ones((2, 3, 4, 4)), **p)
    with pytest.raises(ValueError, match="C=4"):
        ops.switchable_norm_cpu(np.ones((2, 4, 4, 4), np.float32), **p)
    with pytest.raises(ValueError, match="mixing weights"):
        ops.switchable_norm_cpu(np.ones((2, 3, 4, 4), np.float32), **{**p, "running_mean": None,
                                                                       "running_var": None})


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


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 7), h=st.integers(1, 9), w=st.integers(2, 9),
       using_bn=st.booleans(), relu=st.booleans(), seed=st.integers(0, 10_000))
def test_property(n, c, h, w, using_bn, relu, seed):
    p = params(c, 3 if using_bn else 2, using_bn, seed)
    x = np.random.default_rng(seed).normal(1.0, 3.0, size=(n, c, h, w)).astype(np.float32)
    np.testing.assert_allclose(ops.switchable_norm_cpu(x, **p, relu=relu), ref(x, p, relu),
                               rtol=1e-5, atol=2e-5)
