"""Specialization of one-hot SN layers: exact replacements, thresholds, reported errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sn_deploy.export import export_sn_onnx
from sn_deploy.models import build_model
from sn_deploy.passes.decompose import decompose_model
from sn_deploy.passes.fuse import fuse_model, fuse_relu_model, fused_residual_layers
from sn_deploy.passes.specialize import measure_specialization, specialize_model
from sn_deploy.runtime.onnxruntime import create_session
from tests.conftest import randomize_sn

ONE_HOT = {"in": [30.0, -30.0, -30.0], "ln": [-30.0, 30.0, -30.0], "bn": [-30.0, -30.0, 30.0]}


def _model(assign: dict[str, str], near: float = 0.0):
    model = randomize_sn(build_model("resnetv1sn18", num_classes=10))
    with torch.no_grad():
        for name, branch in assign.items():
            layer = model.get_submodule(name)
            logits = torch.tensor(ONE_HOT[branch])
            if near:
                logits = torch.tensor([np.log(near / 2)] * 3)
                logits[["in", "ln", "bn"].index(branch)] = float(np.log(1 - near))
            layer.mean_weight.copy_(logits)
            layer.var_weight.copy_(logits)
    return model


def test_one_hot_layers_become_exact_standard_ops():
    assign = {"layer1.0.sn2": "bn", "layer1.1.sn2": "in", "layer2.0.sn2": "ln", "sn1": "bn"}
    model = _model(assign)
    sn = fuse_relu_model(export_sn_onnx(model, (2, 3, 64, 64)))
    spec, done = specialize_model(sn)
    kinds = {s.layer: s.replaced_by for s in done}
    assert kinds["layer1.0.sn2"] == "conv-fold"
    assert kinds["layer1.1.sn2"] == "InstanceNormalization"
    assert kinds["layer2.0.sn2"].startswith("kept")
    assert kinds["sn1"] == "conv-fold"  # its fused ReLU follows the folded Conv
    ops = [n.op_type for n in spec.graph.node]
    assert ops.count("SwitchableNorm") == 20 - 3 and "InstanceNormalization" in ops
    assert "BatchNormalization" not in ops
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    err = measure_specialization(sn, spec, done, x)
    assert err < 1e-4
    assert all(s.max_abs_error < 1e-4 for s in done if s.max_abs_error is not None)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    for form in (spec, decompose_model(spec)):
        np.testing.assert_allclose(create_session(form).run(None, {"input": x})[0], ref,
                                   rtol=1e-4, atol=1e-4)


def test_fused_residual_blocks_specialize_with_their_add_and_relu():
    """A one-hot layer carrying a fused residual (and ReLU): the replacement is followed by the
    residual Add and the ReLU again; the kept layers keep their residual input."""
    assign = {"layer1.0.sn2": "bn", "layer1.1.sn2": "in", "layer2.0.sn2": "ln"}
    model = _model(assign)
    sn = fuse_model(export_sn_onnx(model, (2, 3, 64, 64)))
    residuals = fused_residual_layers(sn)
    assert set(assign) <= set(residuals)
    spec, done = specialize_model(sn)
    kinds = {s.layer: s.replaced_by for s in done}
    assert kinds == {"layer1.0.sn2": "conv-fold", "layer1.1.sn2": "InstanceNormalization",
                     "layer2.0.sn2": "kept: no exact standard form for pure LN"}
    producers = {o: n for n in spec.graph.node for o in n.output}
    for layer in ("layer1.0.sn2", "layer1.1.sn2"):
        relu = producers[f"{layer}.output"]
        add = producers[relu.input[0]]
        assert (relu.op_type, add.op_type) == ("Relu", "Add") and residuals[layer] in add.input
    kept = next(n for n in spec.graph.node if n.name == "layer2.0.sn2")
    assert kept.op_type == "SwitchableNorm" and kept.input[5] == residuals["layer2.0.sn2"]
    x = np.random.default_rng(3).standard_normal((2, 3, 64, 64)).astype(np.float32)
    assert measure_specialization(sn, spec, done, x) < 1e-4
    assert all(s.max_abs_error < 1e-4 for s in done if s.max_abs_error is not None)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    for form in (spec, decompose_model(spec)):
        np.testing.assert_allclose(create_session(form).run(None, {"input": x})[0], ref,
                                   rtol=1e-4, atol=1e-4)


def test_nothing_replaced_by_default_when_not_one_hot():
    model = _model({"layer1.0.sn2": "bn"}, near=0.02)
    spec, done = specialize_model(export_sn_onnx(model, (1, 3, 64, 64)))
    assert done == []


def test_threshold_prunes_and_reports_the_cost():
    model = _model({"layer1.0.sn2": "bn", "layer1.1.sn2": "in"}, near=0.02)
    sn = export_sn_onnx(model, (1, 3, 64, 64))
    spec, done = specialize_model(sn, threshold=0.05)
    assert {s.layer for s in done} == {"layer1.0.sn2", "layer1.1.sn2"}
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    err = measure_specialization(sn, spec, done, x)
    assert err > 0 and all(s.max_abs_error is not None and s.max_abs_error > 0 for s in done)


@pytest.mark.parametrize("threshold", [-0.1, 1.0])
def test_threshold_range(threshold):
    from sn_deploy.cli.specialize import check_threshold
    from sn_deploy.errors import InputError

    with pytest.raises(InputError, match="prune-threshold"):
        check_threshold(threshold)


def test_bn_without_a_conv_becomes_batchnormalization():
    model = randomize_sn(build_model("demo_sn_net", num_classes=10))
    with torch.no_grad():  # SwitchNorm1d after a Linear: weights [LN, BN]
        model.sn4.mean_weight.copy_(torch.tensor([-30.0, 30.0]))
        model.sn4.var_weight.copy_(torch.tensor([-30.0, 30.0]))
    sn = fuse_relu_model(export_sn_onnx(model, (4, 1, 8, 8)))
    spec, done = specialize_model(sn)
    assert [(s.layer, s.replaced_by) for s in done] == [("sn4", "BatchNormalization")]
    x = np.random.default_rng(2).standard_normal((4, 1, 8, 8)).astype(np.float32)
    assert measure_specialization(sn, spec, done, x) < 1e-5
