"""The standard-op lowering in onnxruntime against the float64 reference (not the torch module)."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from hypothesis import given, settings, strategies as st
import torch
from onnx import TensorProto, helper

from sn_deploy import onnx_ops, reference as R
from sn_deploy.errors import InputError
from sn_deploy.export import export_sn_onnx
from sn_deploy.nn import SwitchNorm1d, SwitchNorm2d, SwitchNorm3d
from sn_deploy.passes.decompose import decompose_model
from sn_deploy.runtime.onnxruntime import create_session
from tests.conftest import randomize_sn


def sn_model(shape, using_bn=True, opset=18, relu=False, seed=0, dynamic=(), dtype=np.float32,
             residual=False):
    """A one-node model.sn.onnx built by hand, plus its parameters for the reference.

    ``residual``: a second graph input ``R`` (X's shape and type) is the node's fused residual.
    """
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
    inputs = ["X"] + [f"l.{n}" for n in names]
    if residual:
        inputs += [""] * (onnx_ops.INPUT_RESIDUAL - len(inputs)) + ["R"]
    node = helper.make_node(onnx_ops.OP_TYPE, inputs, ["l.output"],
                            domain=onnx_ops.DOMAIN, name="l", epsilon=1e-5,
                            mean_weights=p["mw"].tolist(), var_weights=p["vw"].tolist(),
                            relu=int(relu))
    dims = [f"d{i}" if i in dynamic else d for i, d in enumerate(shape)]
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    graph_inputs = [helper.make_tensor_value_info(n, elem, dims) for n in ["X", "R"][:1 + residual]]
    graph = helper.make_graph(
        [node], "g", graph_inputs,
        [helper.make_tensor_value_info("l.output", elem, dims)],
        [onnx.numpy_helper.from_array(p[n], f"l.{n}") for n in names])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    onnx_ops.opset_import()], ir_version=10)
    if not has_running:
        p["running_mean"] = p["running_var"] = None
    return model, p


def ref(x, p, relu=False, residual=None):
    return R.switchable_norm(x, p["scale"], p["bias"], p["mw"], p["vw"], p["running_mean"],
                             p["running_var"], eps=1e-5, relu=relu, residual=residual)


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


@pytest.mark.parametrize("shape,using_bn", [((2, 5, 7, 7), True), ((3, 6, 5, 4), False),
                                            ((4, 7), True), ((2, 3, 3, 4, 5), True)])
@pytest.mark.parametrize("relu", [False, True])
def test_fused_residual_lowered_to_add_then_relu(shape, using_bn, relu, rng):
    """A fused node (passes/fuse.py) lowers to the application, Add(residual), then Relu."""
    model, p = sn_model(shape, using_bn, relu=relu, residual=True)
    dec = decompose_model(model)
    nodes = {o: n for n in dec.graph.node for o in n.output}
    last = nodes["l.output"]
    if relu:
        assert last.op_type == "Relu"
        last = nodes[last.input[0]]
    assert last.op_type == "Add" and "R" in last.input
    x = rng.normal(0.5, 2.0, size=shape).astype(np.float32)
    r = rng.normal(0.0, 3.0, size=shape).astype(np.float32)
    expected = ref(x, p, relu=relu, residual=r)
    np.testing.assert_allclose(create_session(dec).run(None, {"X": x, "R": r})[0], expected,
                               rtol=1e-4, atol=1e-5)
    # the custom-op form of the same node (native library, else the Python op) agrees
    np.testing.assert_allclose(create_session(model).run(None, {"X": x, "R": r})[0], expected,
                               rtol=1e-5, atol=1e-5)


def test_fused_residual_float16(rng):
    model, p = sn_model((2, 4, 8, 8), dtype=np.float16, relu=True, residual=True)
    x = rng.normal(3.0, 1.0, size=(2, 4, 8, 8)).astype(np.float16)
    r = rng.normal(size=(2, 4, 8, 8)).astype(np.float16)
    y = create_session(decompose_model(model)).run(None, {"X": x, "R": r})[0]
    assert y.dtype == np.float16
    expected = ref(x.astype(np.float64), p, relu=True, residual=r.astype(np.float64))
    np.testing.assert_allclose(y.astype(np.float64), expected, atol=2e-2)


def test_fused_residual_that_broadcasts_is_refused():
    model, _ = sn_model((2, 5, 7, 7), residual=True)
    dims = model.graph.input[1].type.tensor_type.shape.dim
    dims[2].dim_value = dims[3].dim_value = 1
    with pytest.raises(InputError, match="cannot broadcast"):
        decompose_model(model)


@pytest.mark.parametrize("shape", [(2, 8, 16, 16), (3, 5)])
def test_offset_inputs_stay_accurate(shape, rng):
    """Mean 1000x the std: the two-pass variance keeps float32 close to float64."""
    model, p = sn_model(shape)
    x = (1000.0 + rng.normal(size=shape)).astype(np.float32)
    y = run(decompose_model(model), x)
    expected = ref(x.astype(np.float64), p)
    assert np.abs(y - expected).max() / np.abs(expected).max() < 1e-3
    np.testing.assert_allclose(y, expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("shape,dynamic,sizes", [
    ((2, 3, 6, 6), (0, 2, 3), [(1, 3, 4, 4), (3, 3, 7, 5), (2, 3, 16, 9)]),
    ((2, 3, 4, 5, 6), (0, 2, 3, 4), [(1, 3, 2, 3, 4), (2, 3, 5, 1, 3)]),
    ((2, 6), (0,), [(1, 6), (5, 6)]),
])
def test_dynamic_batch_and_spatial_one_model(shape, dynamic, sizes, rng):
    model, p = sn_model(shape, dynamic=dynamic)
    sess = create_session(decompose_model(model))
    for size in sizes:
        x = rng.normal(size=size).astype(np.float32)
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


# --------------------------------------------------------------------------- graph form
def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("opset", [17, 18])
def test_application_is_one_mul_one_add_with_folded_constants(opset):
    """y = x·A + B: the output's producer is Add(Mul(X, A), B); per-channel constants folded."""
    model, p = sn_model((2, 4, 6, 6), opset=opset)
    dec = decompose_model(model)
    nodes = {o: n for n in dec.graph.node for o in n.output}
    final = nodes["l.output"]
    assert final.op_type == "Add" and nodes[final.input[0]].op_type == "Mul"
    assert nodes[final.input[0]].input[0] == "X"
    assert [n.op_type for n in dec.graph.node if "X" in n.input] == ["ReduceMean", "Sub", "Mul"]
    assert not {"Shape", "ReduceSumSquare", "BatchNormalization"} & set(_ops(dec))  # static
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in dec.graph.initializer}
    bn_mean = [v for k, v in consts.items() if "bn_mean" in k]
    np.testing.assert_allclose(bn_mean[0].reshape(-1), p["mw"][2] * p["running_mean"], rtol=1e-6)
    reduce_mean = next(n for n in dec.graph.node if n.op_type == "ReduceMean")
    has_axes_attr = any(a.name == "axes" for a in reduce_mean.attribute)
    assert has_axes_attr == (opset < 18) and len(reduce_mean.input) == (1 if opset < 18 else 2)
    assert [o.domain for o in dec.opset_import] == [""]


def test_chained_nodes_without_value_info(rng):
    """Intermediate tensors with no declared shape: decompose_model infers ranks itself."""
    model, p = sn_model((2, 3, 5, 5))
    first = model.graph.node[0]
    second = onnx.NodeProto.FromString(first.SerializeToString())
    first.output[0] = "mid"
    first.name, second.name, second.input[0] = "l0", "l", "mid"
    model.graph.node.append(second)
    dec = decompose_model(model)
    x = rng.normal(size=(2, 3, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(run(dec, x), ref(ref(x, p), p), rtol=1e-4, atol=1e-5)


def test_static_single_element_planes_refused():
    model, _ = sn_model((2, 3, 1, 1))
    with pytest.raises(InputError, match="1 element per plane"):
        decompose_model(model)


def test_parameters_must_be_initializers():
    model, _ = sn_model((2, 3, 4, 4))
    init = model.graph.initializer[0]
    model.graph.input.append(helper.make_tensor_value_info(init.name, TensorProto.FLOAT, [3]))
    del model.graph.initializer[0]
    with pytest.raises(InputError, match="must be an initializer"):
        decompose_model(model)


def test_wrong_weight_count_refused():
    model, _ = sn_model((2, 3, 4, 4), using_bn=True)
    for a in model.graph.node[0].attribute:
        if a.name == onnx_ops.ATTR_MEAN_WEIGHTS:
            del a.floats[-1]
    with pytest.raises(InputError, match="expected 3 mean/var weights"):
        decompose_model(model)


# --------------------------------------------------------------------------- exported torch nets
class _Net(torch.nn.Module):
    """first → SN (named ``sn``) → head, so the SN output is an inner tensor."""

    def __init__(self, first, sn, head):
        super().__init__()
        self.first, self.sn, self.head = first, sn, head

    def forward(self, x):
        return self.head(self.sn(self.first(x)))


def _reference_net(net: _Net, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(SN output, net output) in float64: torch only for the conv/linear around the reference SN."""
    net64 = copy.deepcopy(net).double()
    with torch.no_grad():
        h = net64.first(torch.from_numpy(x.astype(np.float64))).numpy()
        s = R.switchable_norm_from_state(dict(net.sn.state_dict()), h, eps=net.sn.eps)
        return s, net64.head(torch.from_numpy(s)).numpy()


EXPORTED = {
    "2d_dynamic_opset17": (lambda: _Net(torch.nn.Conv2d(2, 4, 3), SwitchNorm2d(4),
                                        torch.nn.Conv2d(4, 3, 1)),
                           (2, 2, 9, 9), True, True, 17, [(1, 2, 9, 9), (3, 2, 12, 7)]),
    "3d_no_bn_static_opset18": (lambda: _Net(torch.nn.Conv3d(2, 4, 3), SwitchNorm3d(4, using_bn=False),
                                             torch.nn.Conv3d(4, 3, 1)),
                                (2, 2, 5, 6, 7), False, False, 18, [(2, 2, 5, 6, 7)]),
    "1d_dynamic_batch_opset18": (lambda: _Net(torch.nn.Linear(6, 5), SwitchNorm1d(5),
                                              torch.nn.Linear(5, 3)),
                                 (4, 6), True, False, 18, [(1, 6), (5, 6)]),
}


@pytest.mark.parametrize("case", list(EXPORTED))
def test_exported_torch_nets_match_reference(case, rng):
    factory, shape, dyn_batch, dyn_spatial, opset, sizes = EXPORTED[case]
    torch.manual_seed(0)
    net = randomize_sn(factory())
    dec = decompose_model(export_sn_onnx(net, shape, dynamic_batch=dyn_batch,
                                         dynamic_spatial=dyn_spatial, opset=opset))
    assert not any(n.domain == onnx_ops.DOMAIN for n in dec.graph.node)
    assert all(o.domain != onnx_ops.DOMAIN for o in dec.opset_import)
    assert next(o.version for o in dec.opset_import if o.domain == "") == opset
    info = {v.name: v for v in dec.graph.value_info}
    assert "sn.output" in info  # the per-layer name survives the lowering
    dec.graph.output.append(info["sn.output"])
    sess = create_session(dec)
    for size in sizes:
        x = rng.normal(0.3, 1.5, size=size).astype(np.float32)
        out, sn_out = sess.run(["output", "sn.output"], {"input": x})
        want_sn, want_out = _reference_net(net, x)
        np.testing.assert_allclose(sn_out, want_sn, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(out, want_out, rtol=1e-4, atol=1e-4)
