"""``sn-decompose``: lower model.sn.onnx's SwitchableNorm nodes to standard ONNX ops."""
from __future__ import annotations

import tempfile
from pathlib import Path

import typer

from sn_deploy.cli.common import run_app
from sn_deploy.errors import InputError

app = typer.Typer(add_completion=False, help=__doc__)


def _check_output(path: Path) -> None:
    """Refuse an output that cannot be written before any work is done (nothing left behind)."""
    if path.is_dir():
        raise InputError(f"output '{path}' is a directory; give a file name, e.g. -o model.onnx")
    parent = path.parent
    if not parent.is_dir():
        raise InputError(f"output folder '{parent}' does not exist; create it or choose another -o")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".probe."):
            pass
    except OSError as exc:
        raise InputError(f"output folder '{parent}' is not writable ({exc.strerror or exc}); "
                         "choose another -o") from None


def _check_input(proto, path: Path) -> None:
    """Garbage bytes can parse as an (empty) ModelProto: insist on a graph the checker accepts."""
    import onnx

    if not proto.graph.node or not proto.opset_import:
        raise InputError(f"'{path}' is not an ONNX model (no graph or opset); "
                         "give the model.sn.onnx written by sn-export")
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:  # ValidationError, or a schema error for an unknown op
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"'{path}' is not a valid ONNX model ({first})") from None


@app.command()
def decompose(
    model: Path = typer.Argument(..., help="model.sn.onnx (SwitchableNorm custom-op form)"),
    output: Path = typer.Option(..., "--output", "-o", help="decomposed model.onnx to write"),
) -> None:
    """Write OUTPUT: MODEL with every sn_deploy::SwitchableNorm node as standard ONNX ops."""
    from sn_deploy.export import save_model_atomic
    from sn_deploy.passes.decompose import decompose_model
    from sn_deploy.runtime.onnxruntime import has_sn_nodes, load_model

    if model.is_dir():
        raise InputError(f"'{model}' is a directory; give the model.sn.onnx file")
    proto = load_model(model)
    _check_input(proto, model)
    _check_output(output)
    if not has_sn_nodes(proto):
        typer.echo(f"note: '{model}' has no SwitchableNorm node; written unchanged", err=True)
    save_model_atomic(decompose_model(proto), output)
    typer.echo(f"wrote {output}")


main = run_app(app)
