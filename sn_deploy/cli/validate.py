"""``sn-validate``: numeric parity of ONNX forms (and TensorRT engines) with the PyTorch model.

Per output and, with --per-layer, per SN layer. Exit 0 on pass, 1 on a parity failure, 2 on a
usage or input error.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import typer

from sn_deploy.cli.common import EXIT_FAILED, fail, run_app

app = typer.Typer(add_completion=False, help=__doc__)

Dims = tuple[Optional[int], ...]


def _onnx_input_dims(paths: Sequence[Path]) -> Dims:
    """The input shape every ``--onnx`` form accepts; None marks a dynamic axis."""
    from sn_deploy.runtime.onnxruntime import load_model

    merged: Optional[list[Optional[int]]] = None
    for path in paths:
        dims = [d.dim_value if d.HasField("dim_value") else None
                for d in load_model(path).graph.input[0].type.tensor_type.shape.dim]
        if merged is None:
            merged = dims
        elif len(dims) != len(merged) or any(
                a is not None and b is not None and a != b for a, b in zip(dims, merged)):
            fail(f"the --onnx models take different input shapes ({_text(merged)} vs "
                 f"{_text(dims)} in '{path}'); validate forms of one export together")
        else:
            merged = [a if a is not None else b for a, b in zip(merged, dims)]
    return tuple(merged or ())


def _text(dims) -> str:
    return "x".join("?" if d is None else str(d) for d in dims)


def _resolve_dims(model_dims: Optional[Dims], input_shape: Optional[str], batch: Optional[int],
                  inputs: str, where: str) -> Dims:
    """Shape for make_inputs: --input-shape checked against the model, --batch applied to
    random inputs; dynamic axes stay None for a .npy to fix."""
    from sn_deploy.export import parse_shape

    dims: Dims
    if input_shape:
        given = parse_shape(input_shape)
        if model_dims is not None and (len(given) != len(model_dims) or any(
                m is not None and g != m for g, m in zip(given, model_dims))):
            fail(f"--input-shape {input_shape} does not fit {where}, which takes "
                 f"{_text(model_dims)} ('?' = dynamic)")
        dims = given if inputs == "random" else \
            (model_dims[0] if model_dims else None,) + tuple(given[1:])
    elif model_dims is not None:
        dims = model_dims
    else:
        fail("pass --input-shape when validating engines only")
    if inputs != "random":
        return dims
    if batch is not None:
        if model_dims and model_dims[0] is not None and model_dims[0] != batch:
            fail(f"--batch {batch} does not fit {where}, whose batch axis is fixed at "
                 f"{model_dims[0]}")
        dims = (batch,) + tuple(dims[1:])
    elif dims[0] is None:
        dims = (1,) + tuple(dims[1:])
    if any(d is None for d in dims[1:]):
        fail(f"{where} has dynamic axes ({_text(dims)}); pass --input-shape for random inputs")
    return dims


def _check_report_path(path: Optional[Path], option: str) -> None:
    """Fail before the (slow) validation, not after it, when a report cannot be written."""
    from sn_deploy.errors import InputError
    from sn_deploy.pipeline import check_writable_dir

    if path is None:
        return
    if path.is_dir():
        fail(f"{option} '{path}' is a directory; give a file name")
    try:
        check_writable_dir(path.parent)
    except InputError as exc:
        fail(f"{option} '{path}': {exc}".replace("--output-dir", option))


@app.command()
def validate(
    checkpoint: Path = typer.Argument(..., help="checkpoint (.pth) of the PyTorch reference"),
    arch: Optional[str] = typer.Option(
        None, "--arch", help="registered name or package.module:factory; default: inferred from "
                             "the checkpoint's keys and shapes"),
    onnx_models: List[Path] = typer.Option([], "--onnx", help="ONNX model (repeatable)"),
    engines: List[Path] = typer.Option([], "--engine", help="TensorRT engine (repeatable)"),
    plugin_lib: Optional[Path] = typer.Option(None, "--plugin-lib",
                                              help="libsn_trt_plugin.so, with --engine"),
    inputs: str = typer.Option("random", "--inputs", help="random | FILE.npy (N,C,H,W)"),
    input_shape: Optional[str] = typer.Option(
        None, "--input-shape", help="e.g. 1x3x224x224; default: the ONNX input shape"),
    batch: Optional[int] = typer.Option(
        None, "--batch", help="batch of random inputs (default 1 on a dynamic batch axis); "
                              "with FILE.npy: use its first N samples"),
    seed: int = typer.Option(0, "--seed", help="seed of random inputs"),
    atol: float = typer.Option(1e-4, "--atol"),
    rtol: float = typer.Option(1e-4, "--rtol"),
    per_layer: bool = typer.Option(False, "--per-layer", help="compare every SN layer's output"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the JSON report here"),
    html_out: Optional[Path] = typer.Option(None, "--html", help="write the HTML report here"),
    threads: Optional[int] = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle",
                                      help="allow a pickled whole model (runs its code)"),
    adopt: bool = typer.Option(True, "--adopt/--no-adopt",
                               help="adopt foreign SN layers (official classes, your copies) as "
                                    "sn_deploy layers (default on)"),
) -> None:
    from sn_deploy.checkpoint import load_checkpoint
    from sn_deploy.report import render_table, write_reports
    from sn_deploy.validate import make_inputs
    from sn_deploy.validate import validate as run_validation

    if not onnx_models and not engines:
        fail("nothing to compare: give --onnx MODEL and/or --engine PLAN")
    for p in list(onnx_models) + list(engines):
        if not p.is_file():
            fail(f"'{p}' not found; check --onnx/--engine")
    if atol < 0 or rtol < 0:
        fail(f"--atol and --rtol must be >= 0 (got {atol:g}, {rtol:g})")
    if batch is not None and batch < 1:
        fail(f"--batch must be >= 1 (got {batch})")
    if threads is not None and threads < 1:
        fail(f"--threads must be >= 1 (got {threads})")
    _check_report_path(json_out, "--json")
    _check_report_path(html_out, "--html")

    model_dims = _onnx_input_dims(onnx_models) if onnx_models else None
    where = f"'{onnx_models[0]}'" if onnx_models else "the engine"
    dims = _resolve_dims(model_dims, input_shape, batch, inputs, where)
    if inputs != "random" and batch is not None:   # the first --batch samples of the file
        x = make_inputs(inputs, (None,) + tuple(dims[1:]))
        if len(x) < batch:
            fail(f"--batch {batch} but '{inputs}' holds only {len(x)} samples")
        if dims[0] is not None and dims[0] != batch:
            fail(f"--batch {batch} does not fit {where}, whose batch axis is fixed at {dims[0]}")
        x = x[:batch]
    else:
        x = make_inputs(inputs, dims, seed=seed)

    runners = []
    if engines:
        from sn_deploy.runtime.tensorrt import EngineRunner

        if plugin_lib is None or not plugin_lib.is_file():
            fail("--engine needs --plugin-lib pointing at libsn_trt_plugin.so")
        runners = [EngineRunner(e, plugin_lib) for e in engines]

    loaded = load_checkpoint(checkpoint, arch, trust_pickle=trust_pickle, adopt=adopt)
    for line in loaded.notes():
        typer.echo(line)
    report = run_validation(loaded.model, onnx_models, x, atol=atol, rtol=rtol,
                            per_layer=per_layer, threads=threads, extra_runners=runners)
    report.adoption = loaded.adoption.to_json() if loaded.adoption is not None else None
    typer.echo(render_table(report))
    write_reports(report, json_out, html_out)
    if not report.passed:
        raise typer.Exit(EXIT_FAILED)


main = run_app(app)
