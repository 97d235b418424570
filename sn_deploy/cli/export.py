"""``sn-export``: checkpoint → model.sn.onnx + model.onnx (+ model.trt.onnx) + parity report."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sn_deploy.cli.common import EXIT_FAILED, device_option, run_app

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="checkpoint (.pth): state_dict, official dict, or DDP"),
    arch: Optional[str] = typer.Option(
        None, "--arch", help="registered name or package.module:factory; default: inferred from "
                             "the checkpoint's keys and shapes"),
    input_shape: Optional[str] = typer.Option(
        None, "--input-shape", help="e.g. 1x3x224x224; default: the architecture's native size "
                                    "with a dynamic batch"),
    output_dir: Optional[Path] = typer.Option(
        None, "--output-dir", "-o", help="folder for the exported files; default: "
                                         "CHECKPOINT_STEM_export beside the checkpoint"),
    dynamic_batch: Optional[bool] = typer.Option(
        None, "--dynamic-batch/--static-batch",
        help="batch axis dynamic (default: static with --input-shape, dynamic without)"),
    dynamic_spatial: bool = typer.Option(False, "--dynamic-spatial", help="spatial axes dynamic"),
    opset: int = typer.Option(18, "--opset", help="default-domain opset (17 or newer)"),
    target: str = typer.Option("onnxruntime", "--target", help="onnxruntime | tensorrt"),
    calibrate_data: Optional[str] = typer.Option(
        None, "--calibrate-data", help="batch-average the BN statistics on this data first"),
    calibrate_batch_size: int = typer.Option(32, "--calibrate-batch-size"),
    calibrate_num_batches: int = typer.Option(200, "--calibrate-num-batches"),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="calibration recipe (YAML)"),
    device: Optional[str] = typer.Option(None, "--device",
                                         help="where --calibrate-data runs: cpu, cuda, cuda:N "
                                              "or mps (default: cuda when visible, else cpu)"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle",
                                      help="allow a pickled nn.Module (runs code from the file)"),
    fuse: bool = typer.Option(True, "--fuse/--no-fuse",
                              help="fold SN→ReLU and SN→Add(residual)[→ReLU] into the SN node"),
    fuse_residual: bool = typer.Option(True, "--fuse-residual/--no-fuse-residual",
                                       help="with --fuse: also fold residual Adds (default on)"),
    cpu_optimize: bool = typer.Option(False, "--cpu-optimize",
                                      help="also write model.cpu.onnx: onnxruntime's CPU layout "
                                           "with SN kept in it (needs make plugins; tied to this "
                                           "CPU's SIMD width, like an engine to its GPU)"),
    triton_repo: Optional[Path] = typer.Option(None, "--triton-repo",
                                               help="also write a Triton model repository here"),
    model_name: str = typer.Option("model", "--model-name", help="name in the Triton repository"),
    atol: float = typer.Option(1e-4, "--atol"),
    rtol: float = typer.Option(1e-4, "--rtol"),
    adopt: bool = typer.Option(True, "--adopt/--no-adopt",
                               help="adopt foreign SN layers (official classes, your copies) as "
                                    "sn_deploy layers (default on)"),
) -> None:
    from sn_deploy.export import parse_shape
    from sn_deploy.pipeline import CalibrationOptions, run_export
    from sn_deploy.report import render_table

    shape = parse_shape(input_shape) if input_shape is not None else None
    calibration = None
    if calibrate_data is not None:
        calibration = CalibrationOptions(calibrate_data, calibrate_batch_size,
                                         calibrate_num_batches, recipe=recipe,
                                         device=device_option(device))
    result = run_export(
        str(checkpoint), arch, shape, output_dir, dynamic_batch=dynamic_batch,
        dynamic_spatial=dynamic_spatial, opset=opset, target=target, calibration=calibration,
        trust_pickle=trust_pickle, fuse=fuse, fuse_residual=fuse_residual,
        cpu_optimize=cpu_optimize, atol=atol, rtol=rtol,
        log=typer.echo, triton_repo=str(triton_repo) if triton_repo else None,
        model_name=model_name, adopt=adopt,
    )
    typer.echo(render_table(result.validation))
    typer.echo(f"report: {result.files['report.json']} and {result.files['report.html']}")
    if not result.passed:
        typer.echo("parity FAILED: see the report", err=True)
        raise typer.Exit(EXIT_FAILED)


main = run_app(app)
