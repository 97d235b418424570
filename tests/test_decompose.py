"""The standard-op lowering in onnxruntime against the float64 reference (not the torch module)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper

from sn_deploy import onnx_ops, reference as R
from sn_deploy.passes.decompose import decompose_model
from sn_deploy.runtime.onnxruntime import create_session


def sn_model(shape, using_bn=True, opset=18, relu=False, seed=0, dynamic=(), dtype=np.float32):
    """A one-node model.sn.onnx built by hand, plus its parameters for the reference."""
    rng = np.random.default_rng(seed)
    C = shape[1]
    nw = 2 if (not using_bn or len(shape) == 2) else 3
    p = {
        "scale": rng.normal(1, 0.2, C).astype(np.float32),
        "bias": rng.normal(0, 0.2, C).astype(np.float32),
        "running_mean": rng.normal(0, 1, C).astype(np.float32),
        "running_var": rng.uniform(0.5, 2, C).astype(np.float32),
        "mw": R.softmax(rng.normal(size=nw)).astype(np.float32),
        "vw": R.softmax(rng.normal(size=nw)).astype(np.float32),
    }
    has_running = using_bn or len(shape) == 2
    names = ["scale", "bias"] + (["running_mean", "running_var"] if has_running else [])
    node = helper.make_node(onnx_ops.OP_TYPE, ["X"] + [f"l.{n}" for n in names], ["l.output"],
                            domain=onnx_ops.DOMAIN, name="l", epsilon=1e-5,
                            mean_weights=p["mw"].tolist(), var_weights=p["vw"].tolist(),
                            relu=int(relu))
    dims = [f"d{i}" if i in dynamic else d for i, d in enumerate(shape)]
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("X", elem, dims)],
        [helper.make_tensor_value_info("l.output", elem, dims)],
        [onnx.numpy_helper.from_array(p[n], f"l.{n}") for n in names])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    onnx_ops.opset_import()], ir_version=10)
    if not has_running:
        p["running_mean"] = p["running_var"] = None
    return model, p


def ref(x, p, relu=False):
    return R.switchable_norm(x, p["scale"], p["bias"], p["mw"], p["vw"], p["running_mean"],
                             p["running_var"], eps=1e-5, relu=relu)


def run(model, x):
    return create_session(model).run(None, {"X": x})[0]


CASES = [
    ((2, 5, 7, 11), True), ((1, 4, 6, 6), True), ((3, 6, 5, 4), False),
    ((2, 3, 3, 4, 5), True), ((1, 2, 2, 3, 3), False), ((4, 7), True), ((1, 9), True),
]


@pytest.mark.parametrize("shape,using_bn", CASES)
@pytest.mark.parametrize("opset", [17, 18])
def test_matches_reference(shape, using_bn, opset, rng):
    model, p = sn_model(shape, using_bn, opset)
    dec = decompose_model(model)
    assert not any(n.domain == onnx_ops.DOMAIN for n in dec.graph.node)
    assert all(o.domain != onnx_ops.DOMAIN for o in dec.opset_import)
    assert [o.name for o in dec.graph.output] == ["l.output"]
    x = rng.normal(0.5, 2.0, size=shape).astype(np.float32)
    np.testing.assert_allclose(run(dec, x), ref(x, p), rtol=1e-4, atol=1e-5)


def test_relu_attribute(rng):
    model, p = sn_model((2, 4, 5, 5), relu=True)
    x = rng.normal(size=(2, 4, 5, 5)).astype(np.float32)
    y = run(decompose_model(model), x)
    assert (y >= 0).all()
    np.testing.assert_allclose(y, ref(x, p, relu=True), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 8, 16, 16), (3, 5)])
def test_offset_inputs_stay_accurate(shape, rng):
    """Mean 1000x the std: the two-pass variance keeps float32 close to float64."""
    model, p = sn_model(shape)
    x = (1000.0 + rng.normal(size=shape)).astype(np.float32)
    y = run(decompose_model(model), x)
    expected = ref(x.astype(np.float64), p)
    assert np.abs(y - expected).max() / np.abs(expected).max() < 1e-3
    np.testing.assert_allclose(y, expected, rtol=2e-3, atol=2e-3)


def test_dynamic_batch_and_spatial_one_model(rng):
    model, p = sn_model((2, 3, 6, 6), dynamic=(0, 2, 3))
    sess = create_session(decompose_model(model))
    for shape in [(1, 3, 4, 4), (3, 3, 7, 5), (2, 3, 16, 9)]:
        x = rng.normal(size=shape).astype(np.float32)
        np.testing.assert_allclose(sess.run(None, {"X": x})[0], ref(x, p), rtol=1e-4, atol=1e-5)


def test_dynamic_spatial_size_one_gives_nan(rng):
    """The documented behaviour: unbiased variance of one element is NaN, as officially."""
    model, _ = sn_model((2, 3, 6, 6), dynamic=(0, 2, 3))
    y = run(decompose_model(model), rng.normal(size=(1, 3, 1, 1)).astype(np.float32))
    assert np.isnan(y).all()


def test_float16_model(rng):
    model, p = sn_model((2, 4, 8, 8), dtype=np.float16)
    x = rng.normal(3.0, 1.0, size=(2, 4, 8, 8)).astype(np.float16)
    y = run(decompose_model(model), x)
    assert y.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float64), ref(x.astype(np.float64), p), atol=2e-2)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 5), h=st.integers(1, 5), w=st.integers(2, 6),
       using_bn=st.booleans(), seed=st.integers(0, 1000))
def test_property_random_shapes(n, c, h, w, using_bn, seed):
    model, p = sn_model((n, c, h, w), using_bn, seed=seed)
    x = np.random.default_rng(seed).normal(size=(n, c, h, w)).astype(np.float32)
    np.testing.assert_allclose(run(decompose_model(model), x), ref(x, p), rtol=2e-4, atol=2e-5)


def test_custom_op_form_matches_reference(rng):
    """model.sn.onnx itself runs in onnxruntime through the custom op."""
    model, p = sn_model((2, 5, 7, 7))
    x = rng.normal(size=(2, 5, 7, 7)).astype(np.float32)
    np.testing.assert_allclose(run(model, x), ref(x, p), rtol=1e-5, atol=1e-6)
