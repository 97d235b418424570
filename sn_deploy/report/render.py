"""Render a :class:`~sn_deploy.validate.ValidationReport`: stdout table, JSON, HTML with a chart.

The HTML is one file with inline CSS and an inline SVG chart (no scripts, no external assets) so
it can be attached to a ticket or a CI artefact and still open anywhere.
"""
from __future__ import annotations

import html
import json
import math

from sn_deploy.atomic import atomic_write

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.3g}"
    return str(v)


def _cos(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.7f}"


def _agree(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _shape(shape) -> str:
    return "x".join(map(str, shape))


def render_table(report) -> str:
    """Plain-text table: one row per form and output, then per form where it first diverges."""
    head = f"{'form':<24} {'output':<12} {'max abs':>9} {'mean abs':>9} {'max rel':>9} " \
           f"{'cosine':>10} {'argmax':>7} {'fail':>9}  result"
    lines = [f"parity vs PyTorch (atol={report.atol:g}, rtol={report.rtol:g}, "
             f"input {_shape(report.input_shape)}; an element fails only beyond both)",
             head, "-" * len(head)]
    for form in report.forms:
        for c in form.outputs:
            verdict = "PASS" if c.passed else f"FAIL {c.reason}".strip()
            lines.append(f"{form.name:<24} {c.name:<12} {_fmt(c.max_abs):>9} {_fmt(c.mean_abs):>9} "
                         f"{_fmt(c.max_rel):>9} {_cos(c.cosine):>10} {_agree(c.argmax_agreement):>7} "
                         f"{c.failing:>9}  {verdict}")
        if form.layers:
            worst = max(form.layers, key=lambda c: c.max_abs if math.isfinite(c.max_abs) else math.inf)
            failing = sum(not c.passed for c in form.layers)
            lines.append(f"{'':<24} {len(form.layers)} SN layers, {failing} beyond tolerance; "
                         f"worst max abs {_fmt(worst.max_abs)} ({worst.name}); "
                         f"first divergent layer: {form.first_divergent_layer or 'none'}")
            first = next((c for c in form.layers if not c.passed), None)
            if first is not None:
                lines.append(f"{'':<24} at {first.name}: max abs {_fmt(first.max_abs)}, "
                             f"{first.failing}/{first.total} elements fail {first.reason}".rstrip())
        if form.missing_layers:
            lines.append(f"{'':<24} not in this form: {len(form.missing_layers)} SN layer(s) "
                         f"({', '.join(form.missing_layers[:5])}"
                         f"{', ...' if len(form.missing_layers) > 5 else ''})")
    lines.append("PASSED" if report.passed else "FAILED")
    return "\n".join(lines)


def _layer_axis(forms) -> list[str]:
    """Every layer any form reports, in first-seen (execution) order: forms may lack some."""
    names: dict[str, None] = {}
    for f in forms:
        names.update((c.name, None) for c in f.layers)
    return list(names)


def _chart(report, width: int = 900, height: int = 340) -> str:
    """Per-layer max abs error (log scale), one polyline per form, dashed atol line.

    Points of failing layers are drawn black; a point above the atol line may still pass
    (its error is within rtol·|ref|), which is why the verdict is drawn per point.
    """
    forms = [f for f in report.forms if f.layers]
    if not forms:
        return "<p>No per-layer data (run with --per-layer).</p>"
    names = _layer_axis(forms)
    index = {n: i for i, n in enumerate(names)}
    values = [c.max_abs for f in forms for c in f.layers if c.max_abs > 0 and math.isfinite(c.max_abs)]
    marks = values + ([report.atol] if report.atol > 0 else [])
    lo = math.floor(math.log10(min(marks))) if marks else -12
    hi = math.ceil(math.log10(max(marks))) if marks else 0
    hi = max(hi, lo + 1)
    left, right, top, bottom = 60, 20, 20, 110
    pw, ph = width - left - right, height - top - bottom
    n = max(len(names) - 1, 1)

    def xy(i: int, v: float) -> tuple[float, float]:
        if not math.isfinite(v):
            v = 10.0**hi            # NaN/Inf: pinned to the top
        v = min(max(v, 10.0**lo), 10.0**hi)  # exact zeros: pinned to the bottom
        return left + pw * i / n, top + ph * (hi - math.log10(v)) / (hi - lo)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="per-layer max abs error, log scale">',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>',
             f'<text x="12" y="{top + ph / 2:.0f}" font-size="11" transform="rotate(-90 12 '
             f'{top + ph / 2:.0f})" text-anchor="middle">max abs error</text>']
    for e in range(lo, hi + 1):
        _, y = xy(0, 10.0**e)
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end">1e{e}</text>')
    if report.atol > 0:
        _, ty = xy(0, report.atol)
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#888" '
                     f'stroke-dasharray="6 4"/><text x="{left + pw - 4}" y="{ty - 4:.1f}" '
                     f'font-size="10" text-anchor="end">atol {report.atol:g}</text>')
    for k, form in enumerate(forms):
        color = PALETTE[k % len(PALETTE)]
        pts = [xy(index[c.name], c.max_abs) for c in form.layers]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="'
                     + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
        for (x, y), c in zip(pts, form.layers):
            fill = color if c.passed else "#000"
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{fill}">'
                         f'<title>{html.escape(form.name)} {html.escape(c.name)}: '
                         f'{_fmt(c.max_abs)}{"" if c.passed else " FAIL"}</title></circle>')
        parts.append(f'<text x="{left + 10 + 200 * k}" y="{height - 8}" font-size="11" '
                     f'fill="{color}">&#9632; {html.escape(form.name)}</text>')
    parts.append(f'<text x="{left + 10 + 200 * len(forms)}" y="{height - 8}" font-size="11">'
                 '&#9679; black: layer beyond tolerance</text>')
    step = max(1, len(names) // 40)
    for i in range(0, len(names), step):
        x, _ = xy(i, 1.0)
        parts.append(f'<text transform="translate({x:.1f},{top + ph + 8}) rotate(60)" '
                     f'font-size="9">{html.escape(names[i])}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def render_html(report) -> str:
    """A self-contained HTML page: verdict, per-output table, per-layer chart and table."""
    d = report.to_dict()
    verdict = "PASSED" if report.passed else "FAILED"
    esc = html.escape
    rows = []
    for f in d["forms"]:
        for c in f["outputs"]:
            cls = "" if c["passed"] else ' class="fail"'
            result = "PASS" if c["passed"] else f"FAIL {c['reason']}".strip()
            rows.append(f"<tr{cls}>" + "".join(f"<td>{esc(v)}</td>" for v in (
                f["name"], c["name"], _shape(c["shape"]), _fmt(c["max_abs"]), _fmt(c["mean_abs"]),
                _fmt(c["max_rel"]), _cos(c["cosine"]), _agree(c["argmax_agreement"]),
                f"{c['failing']}/{c['total']}", result)) + "</tr>")
    layer_rows = []
    for f in d["forms"]:
        for c in f["layers"]:
            cls = "" if c["passed"] else ' class="fail"'
            layer_rows.append(f"<tr{cls}>" + "".join(f"<td>{esc(v)}</td>" for v in (
                f["name"], c["name"], _fmt(c["max_abs"]), _fmt(c["mean_abs"]), _fmt(c["max_rel"]),
                _cos(c["cosine"]), f"{c['failing']}/{c['total']}",
                "PASS" if c["passed"] else f"FAIL {c['reason']}".strip())) + "</tr>")
    firsts = "".join(
        f"<li>{esc(f['name'])}: <b>{esc(f['first_divergent_layer'] or 'none')}</b>"
        + (f" (not in this form: {esc(', '.join(f['missing_layers']))})" if f["missing_layers"] else "")
        + "</li>" for f in d["forms"] if f["layers"] or f["missing_layers"])
    layer_table = (
        "<table><tr><th>form</th><th>layer</th><th>max abs</th><th>mean abs</th><th>max rel</th>"
        f"<th>cosine</th><th>failing</th><th>result</th></tr>{''.join(layer_rows)}</table>"
        if layer_rows else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>sn_deploy parity report: {verdict}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ddd;padding:3px 8px;font-size:13px;text-align:right}} th{{background:#f3f3f3}}
td:first-child,td:nth-child(2){{text-align:left}}
.PASSED{{color:#2a7d2a}} .FAILED{{color:#b22}} tr.fail td{{background:#fde8e8}}
</style></head><body>
<h1>Parity report: <span class="{verdict}">{verdict}</span></h1>
<p>Reference: PyTorch eval. Input {esc(_shape(d['input_shape']))}.
Rule: {esc(d['rule'])} (atol={d['atol']:g}, rtol={d['rtol']:g}).</p>
<h2>Outputs</h2>
<table><tr><th>form</th><th>output</th><th>shape</th><th>max abs</th><th>mean abs</th><th>max rel</th>
<th>cosine</th><th>argmax agreement</th><th>failing elements</th><th>result</th></tr>{''.join(rows)}</table>
<h2>Per SN layer</h2>
<p>First divergent layer (PyTorch execution order):</p><ul>{firsts or '<li>per-layer check not run</li>'}</ul>
{_chart(report)}
{layer_table}
</body></html>
"""


def write_reports(report, json_path=None, html_path=None) -> None:
    """Write the JSON and/or HTML renderings, each atomically (temp file + rename)."""
    if json_path is not None:
        atomic_write(json_path, json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    if html_path is not None:
        atomic_write(html_path, render_html(report))
