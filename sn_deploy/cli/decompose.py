"""``sn-decompose``: lower model.sn.onnx's SwitchableNorm nodes to standard ONNX ops."""
from __future__ import annotations

from pathlib import Path

import typer

from sn_deploy.cli.common import run_app

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def decompose(
    model: Path = typer.Argument(..., help="model.sn.onnx"),
    output: Path = typer.Option(..., "--output", "-o", help="decomposed model to write"),
) -> None:
    from sn_deploy.export import save_model_atomic
    from sn_deploy.passes.decompose import decompose_model
    from sn_deploy.pipeline import check_writable_dir
    from sn_deploy.runtime.onnxruntime import load_model

    proto = load_model(model)
    check_writable_dir(output.parent)
    save_model_atomic(decompose_model(proto), output)
    typer.echo(f"wrote {output}")


main = run_app(app)
