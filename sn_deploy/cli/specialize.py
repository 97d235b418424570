"""``sn-specialize``: replace SN layers with one-hot mixing weights by cheaper exact standard ops.

Never prunes near-one-hot layers unless ``--prune-threshold`` says so; the report gives, per
replaced layer, what replaced it and the measured max output error against the input model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from sn_deploy.cli.common import run_app
from sn_deploy.errors import InputError

app = typer.Typer(add_completion=False, help=__doc__)


def check_threshold(t: float) -> float:
    if not 0.0 <= t < 0.5:
        raise InputError(f"--prune-threshold {t} is out of range: use 0 (exact one-hot only) up to "
                         "below 0.5")
    return t


@app.command()
def specialize(
    model: Path = typer.Argument(..., help="model.sn.onnx"),
    output: Path = typer.Option(..., "--output", "-o", help="specialized model.sn.onnx"),
    prune_threshold: float = typer.Option(0.0, "--prune-threshold",
                                          help="treat weights within this of one-hot as one-hot"),
    input_shape: Optional[str] = typer.Option(None, "--input-shape",
                                              help="for measuring the error (default: the model's)"),
    report: Optional[Path] = typer.Option(None, "--report", help="per-layer JSON report"),
) -> None:
    import numpy as np

    from sn_deploy.atomic import atomic_write
    from sn_deploy.export import parse_shape, save_model_atomic
    from sn_deploy.passes.specialize import measure_specialization, specialize_model
    from sn_deploy.pipeline import check_writable_dir
    from sn_deploy.runtime.onnxruntime import load_model

    check_threshold(prune_threshold)
    proto = load_model(model)
    check_writable_dir(output.parent)
    if input_shape:
        shape = parse_shape(input_shape)
    else:
        dims = proto.graph.input[0].type.tensor_type.shape.dim
        shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in dims)
    spec, done = specialize_model(proto, prune_threshold)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    err = measure_specialization(proto, spec, done, x) if done else 0.0
    save_model_atomic(spec, output)
    for s in done:
        e = "-" if s.max_abs_error is None else f"{s.max_abs_error:.3g}"
        typer.echo(f"  {s.layer:<28} {s.replaced_by:<24} max abs error {e}")
    typer.echo(f"{sum(not s.replaced_by.startswith('kept') for s in done)} layers replaced; "
               f"output max abs error vs the input model {err:.3g}; wrote {output}")
    if report is not None:
        atomic_write(report, json.dumps({"prune_threshold": prune_threshold, "output_max_abs_error": err,
                                         "layers": [vars(s) for s in done]}, indent=2))


main = run_app(app)
