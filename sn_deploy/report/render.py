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


def render_table(report) -> str:
    """Plain-text table: one row per form and output, then the first divergent layer."""
    head = f"{'form':<22} {'output':<14} {'max abs':>10} {'mean abs':>10} {'max rel':>10} " \
           f"{'cosine':>10} {'argmax':>8} {'fail':>8}  result"
    lines = [f"parity vs PyTorch (atol={report.atol:g}, rtol={report.rtol:g}, "
             f"input {'x'.join(map(str, report.input_shape))})", head, "-" * len(head)]
    for form in report.forms:
        for c in form.outputs:
            agree = "-" if c.argmax_agreement is None else f"{100 * c.argmax_agreement:.1f}%"
            verdict = "PASS" if c.passed else f"FAIL {c.reason}".strip()
            lines.append(f"{form.name:<22} {c.name:<14} {_fmt(c.max_abs):>10} {_fmt(c.mean_abs):>10} "
                         f"{_fmt(c.max_rel):>10} {c.cosine:>10.7f} {agree:>8} "
                         f"{c.failing:>8}  {verdict}")
        if form.layers:
            worst = max(form.layers, key=lambda c: c.max_abs)
            first = form.first_divergent_layer
            lines.append(f"{'':<22} {len(form.layers)} SN layers: worst max abs {_fmt(worst.max_abs)} "
                         f"({worst.name}); first divergent layer: {first or 'none'}")
    lines.append("PASSED" if report.passed else "FAILED")
    return "\n".join(lines)


def _chart(report, width: int = 900, height: int = 320) -> str:
    """Per-layer max abs error (log scale), one polyline per form, dashed tolerance line."""
    forms = [f for f in report.forms if f.layers]
    if not forms:
        return "<p>No per-layer data (run with --per-layer).</p>"
    names = [c.name for c in forms[0].layers]
    values = [c.max_abs for f in forms for c in f.layers if c.max_abs > 0 and math.isfinite(c.max_abs)]
    lo = math.floor(math.log10(min(values + [report.atol]) or 1e-12)) if values else -12
    hi = math.ceil(math.log10(max(values + [report.atol]))) if values else 0
    hi = max(hi, lo + 1)
    left, right, top, bottom = 60, 20, 20, 90
    pw, ph = width - left - right, height - top - bottom
    n = max(len(names) - 1, 1)

    def xy(i: int, v: float) -> tuple[float, float]:
        v = min(max(v, 10.0**lo), 10.0**hi) if math.isfinite(v) and v > 0 else 10.0**lo
        return left + pw * i / n, top + ph * (hi - math.log10(v)) / (hi - lo)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="per-layer max abs error">',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>']
    for e in range(lo, hi + 1):
        _, y = xy(0, 10.0**e)
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end">1e{e}</text>')
    _, ty = xy(0, report.atol)
    parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#888" '
                 f'stroke-dasharray="6 4"/><text x="{left + pw - 4}" y="{ty - 4:.1f}" font-size="10" '
                 f'text-anchor="end">atol {report.atol:g}</text>')
    for k, form in enumerate(forms):
        color = PALETTE[k % len(PALETTE)]
        pts = [xy(i, c.max_abs) for i, c in enumerate(form.layers)]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="'
                     + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
        for (x, y), c in zip(pts, form.layers):
            fill = color if c.passed else "#000"
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{fill}">'
                         f'<title>{html.escape(form.name)} {html.escape(c.name)}: '
                         f'{_fmt(c.max_abs)}</title></circle>')
        parts.append(f'<text x="{left + 10 + 160 * k}" y="{height - 8}" font-size="11" '
                     f'fill="{color}">&#9632; {html.escape(form.name)}</text>')
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
    rows = []
    for f in d["forms"]:
        for c in f["outputs"]:
            rows.append("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in (
                f["name"], c["name"], c["max_abs"], c["mean_abs"], c["max_rel"], c["cosine"],
                c["argmax_agreement"], c["failing"], "PASS" if c["passed"] else "FAIL")) + "</tr>")
    layer_rows = []
    for f in d["forms"]:
        for c in f["layers"]:
            cls = "" if c["passed"] else ' class="fail"'
            layer_rows.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in (
                f["name"], c["name"], c["max_abs"], c["max_rel"], c["cosine"])) + "</tr>")
    firsts = "".join(f"<li>{html.escape(f['name'])}: {html.escape(f['first_divergent_layer'] or 'none')}</li>"
                     for f in d["forms"] if f["layers"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>sn_deploy parity report</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ddd;padding:3px 8px;font-size:13px;text-align:right}} th{{background:#f3f3f3}}
.PASSED{{color:#2a7d2a}} .FAILED{{color:#b22}} tr.fail td{{background:#fde8e8}}
</style></head><body>
<h1>Parity report: <span class="{verdict}">{verdict}</span></h1>
<p>Reference: PyTorch eval. Input {html.escape('x'.join(map(str, d['input_shape'])))}.
Rule: {html.escape(d['rule'])} (atol={d['atol']:g}, rtol={d['rtol']:g}).</p>
<h2>Outputs</h2>
<table><tr><th>form</th><th>output</th><th>max abs</th><th>mean abs</th><th>max rel</th><th>cosine</th>
<th>argmax agreement</th><th>failing elements</th><th>result</th></tr>{''.join(rows)}</table>
<h2>Per SN layer</h2>
<p>First divergent layer:</p><ul>{firsts or '<li>per-layer check not run</li>'}</ul>
{_chart(report)}
<table><tr><th>form</th><th>layer</th><th>max abs</th><th>max rel</th><th>cosine</th></tr>{''.join(layer_rows)}</table>
</body></html>
"""


def write_reports(report, json_path=None, html_path=None) -> None:
    """Write the JSON and/or HTML renderings, each atomically."""
    if json_path is not None:
        atomic_write(json_path, json.dumps(report.to_dict(), indent=2, allow_nan=True))
    if html_path is not None:
        atomic_write(html_path, render_html(report))
