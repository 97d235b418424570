"""``sn-build-engine``: build a TensorRT engine from model.trt.onnx with the SwitchableNorm_TRT plugin.

Always prints the equivalent trtexec command. Needs TensorRT's Python package and a GPU; without
them it says so and exits 2, having written nothing. ``--print-trtexec-only`` works anywhere (with
``--fp16`` it also writes the FP16 model the command reads, so the command can be run elsewhere).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sn_deploy.cli.common import fail, run_app

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def build(
    model: Path = typer.Argument(..., help="model.trt.onnx (sn-export --target tensorrt)"),
    plugin_lib: Path = typer.Option(..., "--plugin-lib", help="libsn_trt_plugin.so"),
    output: Path = typer.Option(..., "--output", "-o", help="engine file to write (.plan)"),
    fp16: bool = typer.Option(False, "--fp16", help="FP16 tensors (plugin accumulates in FP32)"),
    min_shape: Optional[str] = typer.Option(None, "--min-shape", help="e.g. 1x3x224x224"),
    opt_shape: Optional[str] = typer.Option(None, "--opt-shape"),
    max_shape: Optional[str] = typer.Option(None, "--max-shape"),
    timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="read and update"),
    print_trtexec_only: bool = typer.Option(False, "--print-trtexec-only",
                                            help="print the trtexec command and stop"),
) -> None:
    from sn_deploy.export import parse_shape, save_model_atomic
    from sn_deploy.passes.fp16 import to_fp16
    from sn_deploy.pipeline import check_writable_dir
    from sn_deploy.runtime.onnxruntime import load_model
    from sn_deploy.runtime.tensorrt import build_engine, require, trtexec_command

    proto = load_model(model)  # clear error for a missing or corrupt file
    if not plugin_lib.is_file():
        fail(f"plugin library '{plugin_lib}' not found; build it with `make plugins` "
             "(needs nvcc and TensorRT headers)")
    check_writable_dir(output.parent)
    shapes = [parse_shape(s) if s else None for s in (min_shape, opt_shape, max_shape)]
    onnx_path = output.with_suffix(".fp16.onnx") if fp16 else model
    typer.echo("equivalent trtexec command" + (f" (reads the FP16 model {onnx_path})" if fp16 else "") + ":")
    typer.echo("  " + trtexec_command(onnx_path, plugin_lib, output, proto.graph.input[0].name,
                                      *shapes, timing_cache=str(timing_cache) if timing_cache else None,
                                      strongly_typed=fp16))
    if not print_trtexec_only:
        require()  # before writing anything
    if fp16:
        save_model_atomic(to_fp16(proto), onnx_path)
        typer.echo(f"wrote {onnx_path}")
    if print_trtexec_only:
        return
    build_engine(onnx_path, plugin_lib, output, *shapes,
                 timing_cache=str(timing_cache) if timing_cache else None)
    typer.echo(f"wrote {output}")


main = run_app(app)
