"""Report renderings: a self-contained HTML page with its chart, strict JSON, atomic writes."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from sn_deploy.report import render_html, render_table, write_reports
from sn_deploy.report import render as render_mod
from sn_deploy.validate import FormResult, ValidationReport, compare

LAYERS = ["sn1", "layer1.0.sn1", "layer1.0.sn2", "layer1.0.downsample.1", "fc.sn"]


def _report(diverge_at: int | None = None, nan_output: bool = False) -> ValidationReport:
    """Two forms over five layers; the second one diverges from ``diverge_at`` on."""
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 10))
    report = ValidationReport(atol=1e-4, rtol=1e-4, input_shape=(2, 3, 16, 16))
    for k, name in enumerate(["model.onnx", "model.sn.onnx"]):
        form = FormResult(name)
        bad = k == 1 and diverge_at is not None
        out = ref + (1e-2 if bad else 1e-7)
        if nan_output and k == 1:
            out = out.copy()
            out[0, 0] = np.nan
        form.outputs.append(compare(ref, out, 1e-4, 1e-4, name="output"))
        for i, layer in enumerate(LAYERS):
            delta = 10.0 ** (i - 3) if bad and i >= diverge_at else 1e-7 * (i + 1)
            form.layers.append(compare(ref, ref + delta, 1e-4, 1e-4, name=layer))
        form.first_divergent_layer = next((c.name for c in form.layers if not c.passed), None)
        report.forms.append(form)
    return report


def _no_external_assets(page: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", page, re.I)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert "<img" not in page.lower() and "@import" not in page


def test_html_is_self_contained_with_an_inline_chart():
    page = render_html(_report(diverge_at=2))
    _no_external_assets(page)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count("<svg") == 1 and "</svg>" in page
    chart = page[page.index("<svg"): page.index("</svg>")]
    for layer in LAYERS:
        assert layer in chart and layer in page
    assert chart.count("<polyline") == 2             # one series per form
    assert "stroke-dasharray" in chart and "atol 0.0001" in chart   # the tolerance line
    assert re.search(r">1e-\d+<", chart)             # log-scale decade labels
    assert "FAILED" in page and "layer1.0.sn2" in page[page.index("First divergent"):]


def test_chart_points_sit_on_a_log_scale():
    report = _report(diverge_at=1)
    chart = render_mod._chart(report)
    lines = re.findall(r'<polyline[^>]*points="([^"]+)"', chart)
    ys = [float(p.split(",")[1]) for p in lines[1].split()]
    # the failing form's errors grow tenfold per layer from layer 1 on: equal steps upwards
    steps = np.diff(ys[1:])
    assert np.all(steps < 0) and np.allclose(steps, steps[0], atol=0.2)


def test_html_without_per_layer_data_says_so():
    report = _report()
    for form in report.forms:
        form.layers.clear()
    page = render_html(report)
    _no_external_assets(page)
    assert "run with --per-layer" in page and "PASSED" in page


def test_table_names_the_first_divergent_layer():
    text = render_table(_report(diverge_at=2))
    assert "first divergent layer: layer1.0.sn2" in text and "first divergent layer: none" in text
    assert text.splitlines()[-1] == "FAILED"
    assert render_table(_report()).splitlines()[-1] == "PASSED"


def _strict_json(text: str):
    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=no_constants)


def test_json_schema_and_strictness(tmp_path):
    report = _report(diverge_at=3, nan_output=True)
    write_reports(report, tmp_path / "r.json", None)
    data = _strict_json((tmp_path / "r.json").read_text())
    assert set(data) >= {"passed", "atol", "rtol", "rule", "input_shape", "forms"}
    assert data["passed"] is False and data["input_shape"] == [2, 3, 16, 16]
    form = data["forms"][1]
    assert set(form) >= {"name", "passed", "first_divergent_layer", "missing_layers",
                         "outputs", "layers"}
    assert form["first_divergent_layer"] == "layer1.0.downsample.1"
    keys = {"name", "shape", "max_abs", "mean_abs", "max_rel", "cosine", "argmax_agreement",
            "failing", "total", "reason", "passed"}
    assert keys <= set(form["outputs"][0]) and keys <= set(form["layers"][0])
    out = form["outputs"][0]
    assert "1 NaN/Inf" in out["reason"] and not out["passed"] and out["failing"] == 20
    assert out["cosine"] is None                          # NaN is written as null
    assert math.isclose(out["max_abs"], 1e-2)             # over the finite elements
    assert [c["name"] for c in form["layers"]] == LAYERS
    assert data["forms"][0]["passed"] is True
    assert math.isclose(data["forms"][0]["outputs"][0]["cosine"], 1.0)


def test_write_reports_is_atomic(tmp_path, monkeypatch):
    report = _report()
    json_path, html_path = tmp_path / "r.json", tmp_path / "r.html"
    write_reports(report, json_path, html_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "r.json"]
    old = html_path.read_text()

    def broken(_report):
        raise RuntimeError("disk full")
    monkeypatch.setattr(render_mod, "render_html", broken)
    with pytest.raises(RuntimeError):
        write_reports(_report(diverge_at=0), None, html_path)
    assert html_path.read_text() == old                  # the old report survives intact

    monkeypatch.setattr(render_mod, "atomic_write", _failing_after_temp_write(render_mod.atomic_write))
    with pytest.raises(OSError):
        write_reports(_report(diverge_at=0), json_path, None)
    assert _strict_json(json_path.read_text())["passed"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "r.json"]  # no temp files


def _failing_after_temp_write(atomic_write):
    """atomic_write whose rename step fails, as a full disk or a killed process would."""
    import os

    def write(path, data):
        real_replace = os.replace

        def boom(src, dst):
            raise OSError("simulated failure at rename")
        os.replace = boom
        try:
            return atomic_write(path, data)
        finally:
            os.replace = real_replace
    return write
