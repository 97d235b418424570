"""SN → ReLU and SN → Add(residual) → ReLU folding: structure, numerics in every ONNX form,
per-layer validation still exact."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from sn_deploy.export import export_sn_onnx
from sn_deploy.models import build_model
from sn_deploy.passes.decompose import decompose_model
from sn_deploy.passes.fuse import (fuse_model, fuse_relu_model, fused_relu_layers,
                                   fused_residual_layers)
from sn_deploy.runtime.onnxruntime import create_session
from sn_deploy.validate import make_inputs, validate
from tests.conftest import randomize_sn
from tests.test_decompose import sn_model


def _model():
    return randomize_sn(build_model("resnetv1sn18", num_classes=10))


def test_fuses_sn_relu_pairs_only():
    model = _model()
    sn = export_sn_onnx(model, (1, 3, 64, 64))
    fused = fuse_relu_model(sn)
    relus = lambda m: [n for n in m.graph.node if n.op_type == "Relu"]  # noqa: E731
    # stem sn1 and each block's sn1 are followed by their own ReLU; sn2 feeds the residual Add
    assert len(relus(sn)) - len(relus(fused)) == 9
    layers = fused_relu_layers(fused)
    assert "sn1" in layers and "layer1.0.sn1" in layers and "layer1.0.sn2" not in layers
    attrs = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
             for n in fused.graph.node if n.op_type == "SwitchableNorm"}
    assert all(attrs[name]["relu"] == 1 for name in layers)
    assert fused_relu_layers(decompose_model(fused)) == layers


def test_fused_forms_match_pytorch_per_layer():
    model = _model()
    fused = fuse_relu_model(export_sn_onnx(model, (2, 3, 64, 64)))
    x = make_inputs("random", (2, 3, 64, 64))
    report = validate(model, [decompose_model(fused), fused], x, per_layer=True)
    assert report.passed and all(f.first_divergent_layer is None for f in report.forms)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    y = create_session(fused).run(None, {"input": x})[0]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- residual blocks
def _attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_resnet18_residual_blocks_fold_into_sn_nodes():
    """relu(sn2(conv2(.)) + residual) of every block becomes one SN node; nothing else is left."""
    fused = fuse_model(export_sn_onnx(_model(), (1, 3, 64, 64)))
    ops = [n.op_type for n in fused.graph.node]
    assert "Add" not in ops and "Relu" not in ops  # all 8 Adds and all 17 Relus folded
    residuals = fused_residual_layers(fused)
    assert sorted(residuals) == [f"layer{i}.{j}.sn2" for i in range(1, 5) for j in range(2)]
    # downsampling blocks: the main path (sn2) takes the Add, downsample.1 is its residual
    assert residuals["layer2.0.sn2"] == "layer2.0.downsample.1.output"
    assert residuals["layer1.1.sn2"] == "layer1.0.sn2.output"  # the previous block's output
    assert residuals["layer1.0.sn2"] == "max_pool2d"
    assert set(residuals) <= fused_relu_layers(fused)
    nodes = {n.name: n for n in fused.graph.node if n.op_type == "SwitchableNorm"}
    for layer, tensor in residuals.items():
        assert len(nodes[layer].input) == 6 and nodes[layer].input[5] == tensor
        assert _attrs(nodes[layer])["relu"] == 1
    assert all(len(n.input) == 5 for name, n in nodes.items() if name not in residuals)
    dec = decompose_model(fused)
    assert fused_residual_layers(dec) == residuals and fused_relu_layers(dec) == fused_relu_layers(fused)
    # ReLU-only folding leaves the residual Adds and their ReLUs alone
    relu_only = fuse_model(export_sn_onnx(_model(), (1, 3, 64, 64)), residual=False)
    assert [n.op_type for n in relu_only.graph.node].count("Add") == 8
    assert not fused_residual_layers(relu_only)


def test_residual_fused_forms_match_pytorch():
    """Dynamic batch (symbolic shapes): every form within 1e-4 of PyTorch, every layer checked."""
    model = _model()
    fused = fuse_model(export_sn_onnx(model, (2, 3, 64, 64), dynamic_batch=True))
    assert len(fused_residual_layers(fused)) == 8
    dec = decompose_model(fused)
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 64, 64)).astype(np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        for form, native in ((fused, True), (fused, False), (dec, True)):
            y = create_session(form, native_op=native).run(None, {"input": x})[0]
            np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    x = make_inputs("random", (2, 3, 64, 64))
    report = validate(model, [dec, fused], x, per_layer=True)
    assert report.passed
    for form in report.forms:
        assert form.first_divergent_layer is None and not form.missing_layers
        assert len(form.layers) == 20


def _block(shape=(2, 5, 7, 7), other_shape=None, relu_after=True, extra_reader=None,
           sn_relu=False, add_is_output=False):
    """X → SN(l) → Add(l.output, R) [→ Relu] → Neg → out, built by hand, with variations."""
    model, p = sn_model(shape, relu=sn_relu)
    g = model.graph
    g.input.append(helper.make_tensor_value_info("R", TensorProto.FLOAT, other_shape or shape))
    g.node.append(helper.make_node("Add", ["l.output", "R"], ["sum"], name="add"))
    last = "sum"
    if relu_after:
        g.node.append(helper.make_node("Relu", ["sum"], ["act"], name="relu"))
        last = "act"
    g.node.append(helper.make_node("Neg", [last], ["out"], name="tail"))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("out", TensorProto.FLOAT, shape))
    if add_is_output:
        g.output.append(helper.make_tensor_value_info("sum", TensorProto.FLOAT, shape))
    if extra_reader:
        g.node.append(helper.make_node("Neg", [extra_reader], ["neg"], name="neg"))
        g.output.append(helper.make_tensor_value_info("neg", TensorProto.FLOAT, shape))
    return model, p


def _run_both(model, fused, rng, shape=(2, 5, 7, 7), other_shape=None):
    x = rng.normal(size=shape).astype(np.float32)
    r = rng.normal(size=other_shape or shape).astype(np.float32)
    a = create_session(decompose_model(model)).run(None, {"X": x, "R": r})
    b = create_session(fused).run(None, {"X": x, "R": r})
    for u, v in zip(a, b):
        np.testing.assert_allclose(v, u, rtol=1e-5, atol=1e-5)


def test_hand_built_block_fuses_and_matches(rng):
    model, _ = _block()
    fused = fuse_model(model)
    assert [n.op_type for n in fused.graph.node] == ["SwitchableNorm", "Neg"]
    node = fused.graph.node[0]
    assert list(node.input)[3:] == ["l.running_mean", "l.running_var", "R"]
    assert list(node.output) == ["l.output"] and _attrs(node)["relu"] == 1
    assert list(fused.graph.node[1].input) == ["l.output"]
    _run_both(model, fused, rng)


def test_add_with_other_readers_fuses_without_its_relu(rng):
    model, _ = _block(extra_reader="sum")
    fused = fuse_model(model)
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("Add") == 0 and ops.count("Relu") == 1
    node = next(n for n in fused.graph.node if n.op_type == "SwitchableNorm")
    assert _attrs(node)["relu"] == 0 and node.input[5] == "R"
    assert fused_residual_layers(fused) == {"l": "R"} and not fused_relu_layers(fused)
    _run_both(model, fused, rng)


def test_add_without_relu_fuses(rng):
    model, _ = _block(relu_after=False)
    fused = fuse_model(model)
    assert [n.op_type for n in fused.graph.node] == ["SwitchableNorm", "Neg"]
    assert _attrs(fused.graph.node[0])["relu"] == 0
    _run_both(model, fused, rng)


def test_fused_without_bn_branch_fills_the_empty_slots(rng):
    model, _ = sn_model((2, 5, 7, 7), using_bn=False)
    g = model.graph
    g.input.append(helper.make_tensor_value_info("R", TensorProto.FLOAT, (2, 5, 7, 7)))
    g.node.append(helper.make_node("Add", ["R", "l.output"], ["sum"], name="add"))  # SN second
    g.node.append(helper.make_node("Neg", ["sum"], ["out"], name="tail"))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("out", TensorProto.FLOAT, (2, 5, 7, 7)))
    fused = fuse_model(model)
    node = fused.graph.node[0]
    assert list(node.input) == ["X", "l.scale", "l.bias", "", "", "R"]
    _run_both(model, fused, rng)


@pytest.mark.parametrize("variant", [
    dict(other_shape=(1, 5, 1, 1)),   # a broadcast, not a residual
    dict(other_shape=(2, 5, 7, 1)),
    dict(extra_reader="l.output"),    # the SN output is read elsewhere too
    dict(sn_relu=True),               # relu(SN) + R is not relu(SN + R)
    dict(add_is_output=True),         # the sum itself is a graph output
], ids=["broadcast-channel", "broadcast-width", "sn-output-shared", "relu-before-add",
        "add-is-graph-output"])
def test_not_fused(variant, rng):
    model, _ = _block(**variant)
    fused = fuse_model(model)
    assert "Add" in [n.op_type for n in fused.graph.node]
    assert not fused_residual_layers(fused)
    assert all(len(n.input) <= 5 for n in fused.graph.node if n.op_type == "SwitchableNorm")
    _run_both(model, fused, rng, other_shape=variant.get("other_shape"))
