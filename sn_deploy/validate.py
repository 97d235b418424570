"""Numeric parity of the deployed forms with the PyTorch model, per output and per SN layer.

Runners (PyTorch, ONNX Runtime; TensorRT joins through the same ``Runner`` protocol) are separate
from the comparison logic.  The tolerance rule is Polygraphy's: an element fails only when its
error exceeds both ``atol`` and ``rtol·|reference|``; any NaN/Inf fails.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Protocol, Sequence, Union

import numpy as np
import onnx
import torch
import torch.nn as nn

from sn_deploy.errors import InputError
from sn_deploy.nn import switch_norm_layers

LAYER_SUFFIX = ".output"


# --------------------------------------------------------------------------- comparison
@dataclass
class Comparison:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    mean_abs: float
    max_rel: float
    cosine: float
    failing: int
    total: int
    argmax_agreement: Optional[float] = None
    reason: str = ""

    @property
    def passed(self) -> bool:
        return self.failing == 0 and not self.reason


def compare(name: str, ref: np.ndarray, out: np.ndarray, atol: float, rtol: float) -> Comparison:
    """Compare one tensor with its reference (float64 arithmetic)."""
    ref64 = np.asarray(ref, np.float64)
    out64 = np.asarray(out, np.float64)
    if ref64.shape != out64.shape:
        return Comparison(name, tuple(out64.shape), np.inf, np.inf, np.inf, 0.0, out64.size,
                          out64.size, reason=f"shape {out64.shape} != reference {ref64.shape}")
    reason = ""
    if not np.all(np.isfinite(out64)):
        reason = f"{int((~np.isfinite(out64)).sum())} NaN/Inf values"
    elif not np.all(np.isfinite(ref64)):
        reason = "the PyTorch reference itself has NaN/Inf values"
    with np.errstate(invalid="ignore", divide="ignore"):
        err = np.abs(out64 - ref64)
        rel = err / np.abs(ref64)
        fails = (err > atol) & (err > rtol * np.abs(ref64))
        fails |= ~np.isfinite(err)
        denom = np.linalg.norm(ref64) * np.linalg.norm(out64)
        cosine = float(np.dot(ref64.ravel(), out64.ravel()) / denom) if denom > 0 else \
            float(np.array_equal(ref64, out64))
    finite_rel = rel[np.isfinite(rel)]
    agree = None
    if ref64.ndim == 2 and ref64.shape[1] > 1:
        agree = float((ref64.argmax(1) == out64.argmax(1)).mean())
    return Comparison(
        name=name, shape=tuple(ref64.shape),
        max_abs=float(np.nanmax(err)) if err.size else 0.0,
        mean_abs=float(np.nanmean(err)) if err.size else 0.0,
        max_rel=float(finite_rel.max()) if finite_rel.size else 0.0,
        cosine=cosine, failing=int(fails.sum()), total=int(err.size),
        argmax_agreement=agree, reason=reason,
    )


# --------------------------------------------------------------------------- runners
class Runner(Protocol):
    """A backend that maps input arrays to named output arrays."""

    name: str

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class TorchRunner:
    """PyTorch eval forward; optionally captures every SN layer's output by module name."""

    def __init__(self, model: nn.Module, output_names: Sequence[str], capture_layers: bool):
        self.name = "pytorch"
        self.model = model.eval()
        self.output_names = list(output_names)
        self.capture_layers = capture_layers

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        captured: dict[str, np.ndarray] = {}
        hooks = []
        if self.capture_layers:
            for name, layer in switch_norm_layers(self.model):
                def hook(mod, args, out, name=name):
                    captured[name + LAYER_SUFFIX] = out.detach().cpu().numpy().copy()
                hooks.append(layer.register_forward_hook(hook))
        try:
            with torch.no_grad():
                out = self.model(*[torch.from_numpy(v) for v in inputs.values()])
        finally:
            for h in hooks:
                h.remove()
        outs = out if isinstance(out, (tuple, list)) else [out]
        result = {n: o.detach().cpu().numpy() for n, o in zip(self.output_names, outs)}
        result.update(captured)
        return result


def _with_layer_outputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy whose SN outputs (``<layer>.output``) are extra graph outputs, in graph order."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    produced = [o for n in model.graph.node for o in n.output]
    wanted = [t for t in produced if t.endswith(LAYER_SUFFIX)]
    existing = {o.name for o in model.graph.output}
    for t in wanted:
        if t not in existing:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    return model, wanted


class OnnxRuntimeRunner:
    def __init__(self, model: Union[str, Path, onnx.ModelProto], name: str,
                 per_layer: bool, threads: Optional[int] = None):
        from sn_deploy.runtime.onnxruntime import load_model, create_session

        from sn_deploy.passes.fuse import fused_relu_layers

        proto = load_model(model)
        self.fused_relu = fused_relu_layers(proto)
        self.layer_outputs: list[str] = []
        if per_layer:
            proto, self.layer_outputs = _with_layer_outputs(proto)
        self.name = name
        self.session = create_session(proto, threads=threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()
                             if o.name not in self.layer_outputs]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = dict(zip(self.input_names, inputs.values()))
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feeds)))


# --------------------------------------------------------------------------- the report
@dataclass
class FormResult:
    name: str
    outputs: list[Comparison] = field(default_factory=list)
    layers: list[Comparison] = field(default_factory=list)
    first_divergent_layer: Optional[str] = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.outputs)


@dataclass
class ValidationReport:
    atol: float
    rtol: float
    input_shape: tuple[int, ...]
    forms: list[FormResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(f.passed for f in self.forms)

    def to_dict(self) -> dict:
        def comp(c: Comparison) -> dict:
            d = asdict(c)
            d["passed"] = c.passed
            return d

        return {
            "passed": self.passed, "atol": self.atol, "rtol": self.rtol,
            "rule": "an element fails if |out-ref| > atol and |out-ref| > rtol*|ref|; NaN/Inf fail",
            "input_shape": list(self.input_shape),
            "forms": [{
                "name": f.name, "passed": f.passed,
                "first_divergent_layer": f.first_divergent_layer,
                "outputs": [comp(c) for c in f.outputs],
                "layers": [comp(c) for c in f.layers],
            } for f in self.forms],
        }


def make_inputs(spec: str, input_shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """``random`` (seeded standard normal) or a ``.npy`` file of the model's input rank/channels."""
    shape = tuple(int(d) for d in input_shape)
    if spec == "random":
        return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"--inputs '{spec}' not found: give 'random' or an existing .npy file")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InputError(f"--inputs '{spec}' is not a readable .npy array ({exc})") from None
    if arr.ndim != len(shape) or arr.shape[1:] != shape[1:]:
        raise InputError(
            f"--inputs '{spec}' has shape {arr.shape}, but the model takes "
            f"Nx{'x'.join(map(str, shape[1:]))}; give an array of that shape or --input-shape"
        )
    return np.ascontiguousarray(arr, dtype=np.float32)


def _layer_order(form: FormResult, names: list[str]) -> None:
    order = {n: i for i, n in enumerate(names)}
    form.layers.sort(key=lambda c: order.get(c.name + LAYER_SUFFIX, len(order)))


def validate(
    model: nn.Module,
    onnx_models: Sequence[Union[str, Path, onnx.ModelProto]],
    inputs: np.ndarray,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    per_layer: bool = False,
    threads: Optional[int] = None,
    extra_runners: Sequence[Runner] = (),
) -> ValidationReport:
    """PyTorch eval vs each ONNX form (and any extra runner) on the same inputs."""
    runners: list = []
    for i, m in enumerate(onnx_models):
        name = Path(m).name if isinstance(m, (str, Path)) else f"model[{i}]"
        runners.append(OnnxRuntimeRunner(m, name, per_layer, threads))
    runners.extend(extra_runners)
    output_names = runners[0].output_names if runners and hasattr(runners[0], "output_names") \
        else ["output"]
    torch_runner = TorchRunner(model, output_names, per_layer)
    feeds = {"input": inputs}
    ref = torch_runner.run(feeds)
    report = ValidationReport(atol, rtol, tuple(inputs.shape))
    for runner in runners:
        got = runner.run(feeds)
        form = FormResult(runner.name)
        for out_name in output_names:
            if out_name in got:
                form.outputs.append(compare(out_name, ref[out_name], got[out_name], atol, rtol))
        if per_layer:
            layer_names = getattr(runner, "layer_outputs", [])
            fused = getattr(runner, "fused_relu", set())
            for t in layer_names:
                if t in ref and t in got:
                    layer = t[: -len(LAYER_SUFFIX)]
                    expected = np.maximum(ref[t], 0) if layer in fused else ref[t]
                    form.layers.append(compare(layer, expected, got[t], atol, rtol))
            _layer_order(form, layer_names)
            form.first_divergent_layer = next((c.name for c in form.layers if not c.passed), None)
        report.forms.append(form)
    return report
