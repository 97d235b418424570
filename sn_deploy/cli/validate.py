"""``sn-validate``: numeric parity of ONNX forms with the PyTorch model, per output and per layer.

Exit 0 on pass, 1 on a parity failure, 2 on a usage or input error.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from sn_deploy.cli.common import EXIT_FAILED, fail, run_app

app = typer.Typer(add_completion=False, help=__doc__)


def _input_shape_from_onnx(path: Path, batch: int) -> tuple[int, ...]:
    from sn_deploy.runtime.onnxruntime import load_model

    dims = load_model(path).graph.input[0].type.tensor_type.shape.dim
    shape = []
    for i, d in enumerate(dims):
        if d.HasField("dim_value"):
            shape.append(d.dim_value)
        elif i == 0:
            shape.append(batch)
        else:
            fail(f"'{path}' has dynamic axis {i} ({d.dim_param}); pass --input-shape")
    return tuple(shape)


@app.command()
def validate(
    checkpoint: Path = typer.Argument(..., help="checkpoint (.pth) of the PyTorch reference"),
    arch: str = typer.Option(..., "--arch", help="registered name or package.module:factory"),
    onnx_models: List[Path] = typer.Option([], "--onnx", help="ONNX model (repeatable)"),
    engines: List[Path] = typer.Option([], "--engine", help="TensorRT engine (repeatable)"),
    plugin_lib: Optional[Path] = typer.Option(None, "--plugin-lib",
                                              help="libsn_trt_plugin.so, with --engine"),
    inputs: str = typer.Option("random", "--inputs", help="random | FILE.npy"),
    input_shape: Optional[str] = typer.Option(None, "--input-shape",
                                              help="default: the ONNX input shape"),
    batch: int = typer.Option(1, "--batch", help="batch for random inputs on a dynamic axis"),
    seed: int = typer.Option(0, "--seed"),
    atol: float = typer.Option(1e-4, "--atol"),
    rtol: float = typer.Option(1e-4, "--rtol"),
    per_layer: bool = typer.Option(False, "--per-layer", help="compare every SN layer's output"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the JSON report here"),
    html_out: Optional[Path] = typer.Option(None, "--html", help="write the HTML report here"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle"),
) -> None:
    from sn_deploy.checkpoint import load_checkpoint
    from sn_deploy.export import parse_shape
    from sn_deploy.report import render_table, write_reports
    from sn_deploy.validate import make_inputs
    from sn_deploy.validate import validate as run_validation

    if not onnx_models and not engines:
        fail("nothing to compare: give --onnx MODEL and/or --engine PLAN")
    for p in list(onnx_models) + list(engines):
        if not p.is_file():
            fail(f"'{p}' not found; check --onnx/--engine")
    runners = []
    if engines:
        from sn_deploy.runtime.tensorrt import EngineRunner

        if plugin_lib is None or not plugin_lib.is_file():
            fail("--engine needs --plugin-lib pointing at libsn_trt_plugin.so")
        runners = [EngineRunner(e, plugin_lib) for e in engines]
    if input_shape:
        shape = parse_shape(input_shape)
    elif onnx_models:
        shape = _input_shape_from_onnx(onnx_models[0], batch)
    else:
        fail("pass --input-shape when validating engines only")
    model = load_checkpoint(checkpoint, arch, trust_pickle=trust_pickle).model
    x = make_inputs(inputs, shape, seed=seed)
    report = run_validation(model, onnx_models, x, atol=atol, rtol=rtol, per_layer=per_layer,
                            threads=threads, extra_runners=runners)
    typer.echo(render_table(report))
    write_reports(report, json_out, html_out)
    if not report.passed:
        raise typer.Exit(EXIT_FAILED)


main = run_app(app)
