"""The export job behind ``sn-export``: checkpoint → (calibrate) → model.sn.onnx → model.onnx → parity.

Every file is written atomically, in one transaction: when a step fails, the files this run wrote
are removed again, files it replaced get their previous contents back and folders it created are
removed, so an output directory never holds a half-finished export.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from sn_deploy.atomic import makedirs, transaction, transactional
from sn_deploy.errors import InputError

if TYPE_CHECKING:
    import torch.nn as nn

    from sn_deploy.adopt import AdoptionSummary

TARGETS = ("onnxruntime", "tensorrt")


@dataclass
class CalibrationOptions:
    data: str
    batch_size: int = 32
    num_batches: int = 200
    order: str = "random"
    seed: int = 0
    recipe: Optional[str] = None
    device: object = None  # str | torch.device | None: where the pass runs (None: CUDA if visible)


@dataclass
class ExportResult:
    output_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    num_sn_layers: int = 0
    validation: object = None  # ValidationReport
    calibration: object = None  # CalibrationResult
    adoption: Optional[AdoptionSummary] = None
    #: the ONNX forms written that ONNX Runtime runs (validated; model.trt.onnx is in ``files``)
    models: list[Path] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.validation is None or bool(self.validation.passed)


def check_writable_dir(path: Path) -> Path:
    """Create the output folder and prove it is writable before any work is done.

    A folder created here is removed again if the surrounding transaction fails.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"output directory '{path}' is a file; choose another --output-dir")
    try:
        makedirs(path)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe."):
            pass
    except OSError as exc:
        raise InputError(
            f"output directory '{path}' is not writable ({exc.strerror or exc}); "
            "choose another --output-dir"
        ) from None
    return path


def default_output_dir(checkpoint: str | os.PathLike) -> Path:
    """``<folder>/<stem>_export``: beside the checkpoint and named after it."""
    path = Path(checkpoint)
    return path.with_name(f"{path.stem}_export")


def resolve_input_shape(arch: Optional[str], input_shape: Optional[Sequence[int]],
                        dynamic_batch: Optional[bool]) -> tuple[tuple[int, ...], bool, str]:
    """``(shape, dynamic_batch, how it was chosen)``: the given shape, or the architecture's
    native one with a dynamic batch (``dynamic_batch=None``: dynamic only for the native default)."""
    from sn_deploy.models import native_input_shape

    if input_shape is not None:
        return tuple(input_shape), bool(dynamic_batch), "given"
    native = native_input_shape(arch) if arch else None
    if native is None:
        raise InputError(f"no native input shape is known for "
                         f"{f'--arch {arch}' if arch else 'this model'}; pass --input-shape "
                         "(e.g. 1x3x224x224)")
    return native, dynamic_batch is not False, f"the native size of {arch}"


def _shape_text(shape: Sequence[int], dynamic_batch: bool) -> str:
    return "x".join(map(str, shape)) + (" (batch dynamic)" if dynamic_batch else "")


@transactional
def run_export(
    checkpoint: str,
    arch: Optional[str] = None,
    input_shape: Optional[Sequence[int]] = None,
    output_dir: Optional[str | os.PathLike] = None,
    *,
    dynamic_batch: Optional[bool] = None,
    dynamic_spatial: bool = False,
    opset: int = 18,
    target: str = "onnxruntime",
    calibration: Optional[CalibrationOptions] = None,
    trust_pickle: bool = False,
    fuse: bool = True,
    fuse_residual: bool = True,
    cpu_optimize: bool = False,
    triton_repo: Optional[str] = None,
    model_name: str = "model",
    validate_inputs: str = "random",
    atol: float = 1e-4,
    rtol: float = 1e-4,
    adopt: bool = True,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Run the whole export job; returns what was written and the parity report.

    Only ``checkpoint`` is required: ``arch`` is then inferred from its keys and shapes,
    ``input_shape`` is the architecture's native size with a dynamic batch, and ``output_dir`` is
    :func:`default_output_dir`; each inferred choice is logged.
    """
    from sn_deploy.checkpoint import check_checkpoint_path, load_checkpoint

    check_target(target)
    check_checkpoint_path(checkpoint)
    out = check_writable_dir(Path(output_dir) if output_dir is not None
                             else default_output_dir(checkpoint))
    if calibration is not None:  # a device that cannot be used fails before the slow work
        from sn_deploy.device import resolve_device

        resolve_device(calibration.device)
    loaded = load_checkpoint(checkpoint, arch, trust_pickle=trust_pickle, adopt=adopt)
    for line in loaded.notes():
        log(line)
    input_shape, dynamic_batch, how = resolve_input_shape(loaded.arch or arch, input_shape,
                                                          dynamic_batch)
    if how != "given":
        log(f"input: {_shape_text(input_shape, dynamic_batch)}, {how} (--input-shape to change)")
    if output_dir is None:
        log(f"output folder: {out} (--output-dir to change)")
    return export_model(
        loaded.model, input_shape, out, dynamic_batch=dynamic_batch,
        dynamic_spatial=dynamic_spatial, opset=opset, target=target, calibration=calibration,
        fuse=fuse, fuse_residual=fuse_residual, cpu_optimize=cpu_optimize,
        triton_repo=triton_repo, model_name=model_name, validate_inputs=validate_inputs,
        atol=atol, rtol=rtol, adoption=loaded.adoption, log=log)


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise InputError(f"unknown --target '{target}': use {' or '.join(TARGETS)}")
    return target


def export_model(
    model: nn.Module,
    input_shape: Sequence[int],
    output_dir: str | os.PathLike,
    *,
    dynamic_batch: bool = False,
    dynamic_spatial: bool = False,
    opset: int = 18,
    target: str = "onnxruntime",
    calibration: Optional[CalibrationOptions] = None,
    fuse: bool = True,
    fuse_residual: bool = True,
    cpu_optimize: bool = False,
    triton_repo: Optional[str] = None,
    model_name: str = "model",
    validate_inputs: str = "random",
    atol: float = 1e-4,
    rtol: float = 1e-4,
    adoption: Optional[AdoptionSummary] = None,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """The export job on a model already built (and adopted): it is put in eval mode."""
    from sn_deploy import calibrate as calib
    from sn_deploy import validate as val
    from sn_deploy.export import export_sn_onnx, save_model_atomic
    from sn_deploy.nn import switch_norm_layers
    from sn_deploy.passes.decompose import decompose_model
    from sn_deploy.passes.fuse import fuse_model
    from sn_deploy.report import write_reports

    check_target(target)
    out = check_writable_dir(Path(output_dir))
    calibration_device = None
    if calibration is not None:  # a device that cannot be used fails before the slow work
        from sn_deploy.device import resolve_device

        calibration_device = resolve_device(calibration.device)
    model = model.eval()
    result = ExportResult(output_dir=out, adoption=adoption)
    result.num_sn_layers = len(switch_norm_layers(model))
    if result.num_sn_layers == 0:
        log("note: the model has no SwitchNorm layer; exporting it as a plain ONNX model")

    if calibration is not None:
        result.calibration = calib.calibrate_from_data(
            model, calibration.data, recipe=calibration.recipe, batch_size=calibration.batch_size,
            num_batches=calibration.num_batches, order=calibration.order, seed=calibration.seed,
            device=calibration_device)
        log(f"calibrated {result.num_sn_layers} SN layers on {calibration.num_batches} batches "
            f"of {calibration.batch_size} on {result.calibration.device} "
            f"({result.calibration.images_per_second:.0f} images/s)")

    written: list[Path] = []
    with transaction() as tx:
        sn_onnx = export_sn_onnx(model, input_shape, dynamic_batch=dynamic_batch,
                                 dynamic_spatial=dynamic_spatial, opset=opset)
        if fuse:
            sn_onnx = fuse_model(sn_onnx, residual=fuse_residual)
        written.append(save_model_atomic(sn_onnx, out / "model.sn.onnx"))
        decomposed = decompose_model(sn_onnx)
        written.append(save_model_atomic(decomposed, out / "model.onnx"))
        forms = [out / "model.onnx", out / "model.sn.onnx"]
        if cpu_optimize:
            from sn_deploy.runtime.onnxruntime import optimize_for_this_cpu

            cpu = optimize_for_this_cpu(sn_onnx)
            written.append(save_model_atomic(cpu, out / "model.cpu.onnx"))
            forms.append(out / "model.cpu.onnx")
        if target == "tensorrt":
            from sn_deploy.passes.to_plugin import to_plugin_model

            written.append(save_model_atomic(to_plugin_model(sn_onnx), out / "model.trt.onnx"))
        result.files = {p.name: p for p in written}
        log(f"wrote {', '.join(p.name for p in written)} to {out}")
        if triton_repo is not None:
            from sn_deploy.triton import write_triton_repo

            repo = check_writable_dir(Path(triton_repo))
            tx.watch(repo)  # the model folders it makes go again if a later step fails
            entries = write_triton_repo(repo, model_name, decomposed,
                                        tensorrt=target == "tensorrt")
            written.extend(entries)
            log(f"wrote Triton model repository entries under {repo}")

        inputs = val.make_inputs(validate_inputs, tuple(input_shape), seed=0)
        result.validation = val.validate(model, forms, inputs, atol=atol, rtol=rtol,
                                         per_layer=result.num_sn_layers > 0)
        if adoption is not None:
            result.validation.adoption = adoption.to_json()
        result.models = forms
        json_path, html_path = out / "report.json", out / "report.html"
        write_reports(result.validation, json_path, html_path)
        written.extend([json_path, html_path])
        result.files.update({"report.json": json_path, "report.html": html_path})
    return result
