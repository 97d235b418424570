"""Parity checks: the tolerance rule, runners, per-layer localisation of a corrupted layer."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from sn_deploy.errors import InputError
from sn_deploy.export import export_sn_onnx
from sn_deploy.models import build_model
from sn_deploy.nn import switch_norm_layers
from sn_deploy.passes.decompose import decompose_model
from sn_deploy.report import render_table
from sn_deploy.validate import TorchRunner, compare, make_inputs, validate
from tests.conftest import randomize_sn

# 64x64, not 32x32: at 32x32 layer4 sees 1x1 planes, where SN's unbiased IN variance is undefined
RESNET_SHAPE = (2, 3, 64, 64)


# --------------------------------------------------------------------------- the rule
def test_rule_needs_both_atol_and_rtol():
    ref = np.array([1000.0, 1.0, 0.0])
    # 0.05 on 1000 is beyond atol but within rtol (0.1): passes
    assert compare(ref, ref + [0.05, 0, 0], atol=1e-4, rtol=1e-4).passed
    # 0.5 on 1000 is beyond both
    c = compare(ref, ref + [0.5, 0, 0], atol=1e-4, rtol=1e-4)
    assert not c.passed and c.failing == 1 and c.total == 3
    # beyond rtol of a zero reference but within atol: passes
    assert compare(ref, ref + [0, 0, 5e-5], atol=1e-4, rtol=1e-4).passed
    assert not compare(ref, ref + [0, 0, 2e-4], atol=1e-4, rtol=1e-4).passed
    c = compare(ref, ref + [0.5, 0.25, 2e-4], atol=1e-4, rtol=1e-4)
    assert c.max_abs == 0.5 and c.max_rel == 0.25   # max rel over non-zero references
    assert np.isclose(c.mean_abs, (0.5 + 0.25 + 2e-4) / 3)


def test_non_finite_and_shape_fail_with_a_reason():
    ref = np.ones((2, 3))
    for bad_value in (np.nan, np.inf):
        bad = ref.copy()
        bad[0, 0] = bad_value
        c = compare(ref, bad, 1e-4, 1e-4)
        assert not c.passed and c.failing == 1 and "NaN/Inf" in c.reason
    # a NaN in the reference is a failure too, with its own reason
    c = compare(np.full((2, 2), np.nan), np.zeros((2, 2)), 1e-4, 1e-4)
    assert not c.passed and "reference" in c.reason
    c = compare(ref, np.ones((3, 2)), 1e-4, 1e-4)
    assert not c.passed and "shape" in c.reason


def test_cosine_and_argmax():
    ref = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    out = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    c = compare(ref, out, 1e-4, 1e-4)
    assert c.argmax_agreement == 0.5 and np.isclose(c.cosine, 24 / 28)
    same = compare(ref, ref * 1.0, 1e-4, 1e-4, name="logits")
    assert same.passed and same.argmax_agreement == 1.0 and np.isclose(same.cosine, 1.0)
    assert same.name == "logits"
    assert compare(np.zeros(4), np.zeros(4), 0, 0).cosine == 1.0
    assert compare(np.ones((2, 3, 4)), np.ones((2, 3, 4)), 0, 0).argmax_agreement is None


# --------------------------------------------------------------------------- inputs
def test_make_inputs(tmp_path):
    x = make_inputs("random", (2, 1, 8, 8), seed=3)
    assert x.dtype == np.float32 and x.shape == (2, 1, 8, 8)
    assert np.array_equal(x, make_inputs("random", (2, 1, 8, 8), seed=3))
    with pytest.raises(InputError, match="dynamic"):
        make_inputs("random", (1, 1, None, None))

    np.save(tmp_path / "x.npy", np.zeros((4, 1, 8, 8), np.float64))
    got = make_inputs(str(tmp_path / "x.npy"), (None, 1, 8, 8))
    assert got.shape == (4, 1, 8, 8) and got.dtype == np.float32
    assert make_inputs(str(tmp_path / "x.npy"), (None, 1, None, None)).shape == (4, 1, 8, 8)
    with pytest.raises(InputError, match="has shape"):
        make_inputs(str(tmp_path / "x.npy"), (None, 3, 8, 8))
    with pytest.raises(InputError, match="has shape"):
        make_inputs(str(tmp_path / "x.npy"), (None, 1, 8))
    with pytest.raises(InputError, match="fixed at 1"):
        make_inputs(str(tmp_path / "x.npy"), (1, 1, 8, 8))
    with pytest.raises(InputError, match="not found"):
        make_inputs(str(tmp_path / "nope.npy"), (1, 1, 8, 8))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(InputError, match="not a NumPy file"):
        make_inputs(str(tmp_path / "junk.npy"), (1, 1, 8, 8))
    np.save(tmp_path / "s.npy", np.array([["a"]]))
    with pytest.raises(InputError, match="numeric"):
        make_inputs(str(tmp_path / "s.npy"), (1, 1))
    np.save(tmp_path / "nan.npy", np.full((1, 1, 8, 8), np.nan))
    with pytest.raises(InputError, match="NaN"):
        make_inputs(str(tmp_path / "nan.npy"), (None, 1, 8, 8))


def test_torch_runner_turns_a_shape_error_into_an_input_error():
    model = build_model("demo_sn_net", num_classes=10)
    with pytest.raises(InputError, match=r"rejects input \(1, 3, 8, 8\)"):
        TorchRunner(model, ["output"], False).run({"input": np.zeros((1, 3, 8, 8), np.float32)})


# --------------------------------------------------------------------------- small model
@pytest.fixture(scope="module")
def demo():
    model = randomize_sn(build_model("demo_sn_net", num_classes=10), seed=1)
    sn = export_sn_onnx(model, (2, 1, 8, 8), dynamic_batch=True)
    return model, sn


class _Perturbed:
    """A runner outside ONNX Runtime (as TensorRT's is): output = reference-like model + delta."""

    def __init__(self, model, delta):
        self.name, self.model, self.delta = "perturbed", model, delta

    def run(self, inputs):
        out = TorchRunner(self.model, ["output"], False).run(inputs)["output"]
        return {"output": out + self.delta}


def test_extra_runner_protocol(demo):
    model, _ = demo
    x = make_inputs("random", (3, 1, 8, 8))
    assert validate(model, [], x, extra_runners=[_Perturbed(model, 0.0)], per_layer=True).passed
    report = validate(model, [], x, extra_runners=[_Perturbed(model, 1e-2)], per_layer=True)
    form = report.forms[0]
    assert not report.passed and form.name == "perturbed"
    assert form.layers == [] and form.missing_layers == []   # no per-layer view: not "missing"
    with pytest.raises(InputError, match="nothing to compare"):
        validate(model, [], x)


def test_layer_absent_from_a_form_is_listed(demo):
    model, sn = demo
    renamed = onnx.ModelProto.FromString(sn.SerializeToString())
    for node in renamed.graph.node:
        node.output[:] = ["sn2.renamed" if t == "sn2.output" else t for t in node.output]
        node.input[:] = ["sn2.renamed" if t == "sn2.output" else t for t in node.input]
    report = validate(model, [renamed], make_inputs("random", (2, 1, 8, 8)), per_layer=True)
    form = report.forms[0]
    assert report.passed and form.missing_layers == ["sn2"]
    assert [c.name for c in form.layers] == ["sn1", "sn3", "sn4"]
    assert "not in this form: 1 SN layer(s) (sn2)" in render_table(report)


# --------------------------------------------------------------------------- ResNet-18
@pytest.fixture(scope="module")
def resnet():
    model = randomize_sn(build_model("resnetv1sn18", num_classes=10))
    sn = export_sn_onnx(model, RESNET_SHAPE)
    return model, sn, decompose_model(sn)


def test_clean_export_passes_per_output_and_per_layer(resnet):
    model, sn, dec = resnet
    x = make_inputs("random", RESNET_SHAPE)
    report = validate(model, [dec, sn], x, per_layer=True)
    assert report.passed, render_table(report)
    assert [f.name for f in report.forms] == ["model[0]", "model[1]"]
    layer_names = [n for n, _ in switch_norm_layers(model)]   # = execution order for ResNet
    for form in report.forms:
        assert form.passed and form.outputs[0].argmax_agreement == 1.0
        assert [c.name for c in form.layers] == layer_names and len(layer_names) == 20
        assert all(c.passed for c in form.layers) and form.first_divergent_layer is None
        assert form.missing_layers == []


def _with_epsilon(sn: onnx.ModelProto, layer: str, eps: float) -> onnx.ModelProto:
    bad = onnx.ModelProto.FromString(sn.SerializeToString())
    node = next(n for n in bad.graph.node if n.name == layer)
    next(a for a in node.attribute if a.name == "epsilon").f = eps
    return bad


def _with_scaled_weight(sn: onnx.ModelProto, layer: str, factor: float) -> onnx.ModelProto:
    bad = onnx.ModelProto.FromString(sn.SerializeToString())
    node = next(n for n in bad.graph.node if n.name == layer)
    init = next(i for i in bad.graph.initializer if i.name == node.input[1])  # scale
    init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * factor, init.name))
    return bad


def _assert_localised(report, layer):
    assert not report.passed
    for form in report.forms:
        assert not form.outputs[0].passed
        assert form.first_divergent_layer == layer, render_table(report)
        names = [c.name for c in form.layers]
        assert all(c.passed for c in form.layers[: names.index(layer)])
        assert not form.layers[names.index(layer)].passed
    assert f"first divergent layer: {layer}" in render_table(report)


def test_corrupted_epsilon_is_caught_and_localised(demo):
    model, sn = demo
    bad_sn = _with_epsilon(sn, "sn3", 1.0)
    report = validate(model, [decompose_model(bad_sn), bad_sn], make_inputs("random", (4, 1, 8, 8)),
                      per_layer=True)
    _assert_localised(report, "sn3")


def test_corrupted_branch_layer_is_localised_in_execution_order(resnet):
    """The downsample SN runs beside the block's main path: later layers diverge, earlier don't."""
    model, sn, _ = resnet
    layer = "layer2.0.downsample.1"
    bad_sn = _with_scaled_weight(sn, layer, 1.5)
    x = make_inputs("random", RESNET_SHAPE, seed=1)
    _assert_localised(validate(model, [decompose_model(bad_sn), bad_sn], x, per_layer=True), layer)
