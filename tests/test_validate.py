"""Parity checks: the tolerance rule, per-layer localisation, reports."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from sn_deploy.export import export_sn_onnx
from sn_deploy.models import build_model
from sn_deploy.passes.decompose import decompose_model
from sn_deploy.report import render_html, render_table, write_reports
from sn_deploy.validate import compare, make_inputs, validate
from sn_deploy.errors import InputError
from tests.conftest import randomize_sn


def test_rule_needs_both_atol_and_rtol():
    ref = np.array([1000.0, 1.0, 0.0])
    # 0.05 on 1000 exceeds atol but is within rtol: passes
    assert compare("o", ref, ref + [0.05, 0, 0], atol=1e-4, rtol=1e-4).passed
    # 0.5 on 1000 exceeds both
    c = compare("o", ref, ref + [0.5, 0, 0], atol=1e-4, rtol=1e-4)
    assert not c.passed and c.failing == 1
    # tiny absolute error on a zero reference: within atol
    assert compare("o", ref, ref + [0, 0, 5e-5], atol=1e-4, rtol=1e-4).passed


def test_nan_and_shape_fail():
    ref = np.ones((2, 3))
    bad = ref.copy()
    bad[0, 0] = np.nan
    c = compare("o", ref, bad, 1e-4, 1e-4)
    assert not c.passed and "NaN" in c.reason
    assert not compare("o", ref, np.ones((3, 2)), 1e-4, 1e-4).passed


def test_cosine_and_argmax():
    ref = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    out = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    c = compare("o", ref, out, 1e-4, 1e-4)
    assert c.argmax_agreement == 0.5 and 0 < c.cosine < 1


@pytest.fixture(scope="module")
def exported():
    model = randomize_sn(build_model("resnetv1sn18", num_classes=10))
    sn = export_sn_onnx(model, (2, 3, 64, 64))
    return model, sn, decompose_model(sn)


def test_clean_export_passes_per_layer(exported):
    model, sn, dec = exported
    x = make_inputs("random", (2, 3, 64, 64))
    report = validate(model, [dec, sn], x, per_layer=True)
    assert report.passed, render_table(report)
    for form in report.forms:
        assert len(form.layers) == 20 and form.first_divergent_layer is None
        assert [c.name for c in form.layers][:3] == ["sn1", "layer1.0.sn1", "layer1.0.sn2"]


def _corrupt(sn: onnx.ModelProto, layer: str) -> onnx.ModelProto:
    bad = onnx.ModelProto.FromString(sn.SerializeToString())
    for init in bad.graph.initializer:
        if init.name == f"{layer}.weight":
            arr = onnx.numpy_helper.to_array(init) * 1.5
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    return bad


def test_corruption_is_localised(exported):
    model, sn, _ = exported
    bad_sn = _corrupt(sn, "layer2.1.sn1")
    x = make_inputs("random", (2, 3, 64, 64))
    report = validate(model, [decompose_model(bad_sn), bad_sn], x, per_layer=True)
    assert not report.passed
    for form in report.forms:
        assert form.first_divergent_layer == "layer2.1.sn1"
        names = [c.name for c in form.layers]
        assert all(c.passed for c in form.layers[: names.index("layer2.1.sn1")])


def test_reports(exported, tmp_path):
    model, sn, dec = exported
    report = validate(model, [dec], make_inputs("random", (2, 3, 64, 64)), per_layer=True)
    write_reports(report, tmp_path / "r.json", tmp_path / "r.html")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passed"] and data["forms"][0]["layers"][0]["name"] == "sn1"
    assert {"max_abs", "mean_abs", "max_rel", "cosine", "argmax_agreement", "passed"} <= \
        set(data["forms"][0]["outputs"][0])
    page = (tmp_path / "r.html").read_text()
    assert "<svg" in page and "layer4.1.sn2" in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page
    assert "<script" not in page and "PASSED" in render_table(report)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "r.json"]
    assert "PASSED" in render_html(report)


def test_make_inputs_errors(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 1, 8, 8), np.float32))
    assert make_inputs(str(tmp_path / "x.npy"), (1, 1, 8, 8)).shape == (4, 1, 8, 8)
    with pytest.raises(InputError, match="has shape"):
        make_inputs(str(tmp_path / "x.npy"), (1, 3, 8, 8))
    with pytest.raises(InputError, match="not found"):
        make_inputs(str(tmp_path / "nope.npy"), (1, 3, 8, 8))
