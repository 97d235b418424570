"""SN → ReLU folding: structure, numerics in every ONNX form, per-layer validation still exact."""
from __future__ import annotations

import numpy as np
import onnx
import torch

from sn_deploy.export import export_sn_onnx
from sn_deploy.models import build_model
from sn_deploy.passes.decompose import decompose_model
from sn_deploy.passes.fuse import fuse_relu_model, fused_relu_layers
from sn_deploy.runtime.onnxruntime import create_session
from sn_deploy.validate import make_inputs, validate
from tests.conftest import randomize_sn


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
