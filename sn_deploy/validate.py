"""Numeric parity of the deployed forms with the PyTorch model, per output and per normalization
layer (SN, and PyTorch's BN/GN/IN/LN).

Runners (PyTorch, ONNX Runtime; TensorRT joins through the same :class:`Runner` protocol) are
separate from the comparison logic.  The tolerance rule is Polygraphy's: an element fails only when
its error exceeds both ``atol`` and ``rtol·|reference|``; any NaN/Inf fails.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Protocol, Sequence, Union

import numpy as np
import onnx
import torch
import torch.nn as nn

from sn_deploy.errors import InputError
from sn_deploy.nn import normalization_layers

LAYER_SUFFIX = ".output"
RULE = "an element fails if |out-ref| > atol and |out-ref| > rtol*|ref|; any NaN/Inf fails"

ModelLike = Union[str, Path, onnx.ModelProto]
Shape = Sequence[Optional[int]]


# --------------------------------------------------------------------------- comparison
@dataclass
class Comparison:
    """Error statistics of one tensor (a graph output or an SN layer's output) vs PyTorch."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    mean_abs: float
    max_rel: float          # over elements whose reference is non-zero
    cosine: float
    failing: int            # elements beyond both atol and rtol·|ref| (or non-finite)
    total: int
    argmax_agreement: Optional[float] = None   # 2-D logits only: fraction of rows, last axis
    reason: str = ""        # why it failed regardless of the counts (NaN/Inf, shape)

    @property
    def passed(self) -> bool:
        return self.failing == 0 and not self.reason


def compare(ref: np.ndarray, out: np.ndarray, atol: float, rtol: float, *,
            name: str = "") -> Comparison:
    """Compare ``out`` with the reference ``ref`` in float64 under the atol-and-rtol rule."""
    ref64 = np.asarray(ref, np.float64)
    out64 = np.asarray(out, np.float64)
    if ref64.shape != out64.shape:
        return Comparison(name, tuple(out64.shape), math.inf, math.inf, math.inf, math.nan,
                          out64.size, out64.size,
                          reason=f"shape {tuple(out64.shape)} != reference {tuple(ref64.shape)}")
    reason = ""
    if not np.all(np.isfinite(out64)):
        reason = f"{int((~np.isfinite(out64)).sum())} NaN/Inf values"
    elif not np.all(np.isfinite(ref64)):
        reason = "the PyTorch reference itself has NaN/Inf values"
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: reported via `reason`
        err = np.abs(out64 - ref64)
        fails = ((err > atol) & (err > rtol * np.abs(ref64))) | ~np.isfinite(err)
        nonzero = ref64 != 0
        rel = err[nonzero] / np.abs(ref64[nonzero])
        finite_rel = rel[np.isfinite(rel)]
        norm = np.linalg.norm(ref64) * np.linalg.norm(out64)
        if norm > 0 and np.isfinite(norm):
            cosine = float(np.dot(ref64.ravel(), out64.ravel()) / norm)
        else:  # a zero vector (or NaN): similar only to itself
            cosine = float(np.array_equal(ref64, out64)) if not reason else math.nan
        max_abs = float(np.nanmax(err)) if err.size else 0.0
        mean_abs = float(np.nanmean(err)) if err.size else 0.0
    agree = None
    if ref64.ndim == 2 and ref64.shape[-1] > 1:
        agree = float((ref64.argmax(-1) == out64.argmax(-1)).mean())
    return Comparison(
        name=name, shape=tuple(ref64.shape), max_abs=max_abs, mean_abs=mean_abs,
        max_rel=float(finite_rel.max()) if finite_rel.size else 0.0,
        cosine=cosine, failing=int(fails.sum()), total=int(err.size),
        argmax_agreement=agree, reason=reason,
    )


# --------------------------------------------------------------------------- runners
class Runner(Protocol):
    """A backend under test: maps named input arrays to named output arrays.

    Optional attributes that :func:`validate` uses when present: ``output_names`` (the model's
    outputs, in order), ``layer_outputs`` (``<layer>.output`` tensors it also returns, for the
    per-layer check), ``fused_relu`` (layers whose output already has the ReLU applied) and
    ``fused_residual`` (``{layer: tensor}``: layers whose output already has that tensor added,
    before the ReLU; the runner also returns the tensor).
    """

    name: str

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class TorchRunner:
    """PyTorch eval forward; optionally captures every normalization layer's output by module name.

    Captured outputs come back in execution order (dict order), which is the order in which
    the per-layer results are reported.
    """

    def __init__(self, model: nn.Module, output_names: Sequence[str], capture_layers: bool):
        self.name = "pytorch"
        self.model = model.eval()
        self.output_names = list(output_names)
        self.capture_layers = capture_layers

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        captured: dict[str, np.ndarray] = {}
        hooks = []
        if self.capture_layers:
            for name, layer in normalization_layers(self.model):
                def hook(mod, args, out, name=name):
                    # copy now: an in-place ReLU after the layer would change the tensor
                    captured[name + LAYER_SUFFIX] = out.detach().cpu().numpy().copy()
                hooks.append(layer.register_forward_hook(hook))
        try:
            with torch.no_grad():
                out = self.model(*[torch.from_numpy(np.ascontiguousarray(v))
                                   for v in inputs.values()])
        except (RuntimeError, ValueError) as exc:
            shapes = ", ".join(str(tuple(v.shape)) for v in inputs.values())
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"the PyTorch model rejects input {shapes}: {first} "
                             "(wrong --arch, --input-shape or --inputs?)") from None
        finally:
            for h in hooks:
                h.remove()
        outs = out if isinstance(out, (tuple, list)) else [out]
        result = {n: o.detach().cpu().numpy() for n, o in zip(self.output_names, outs)}
        result.update(captured)
        return result


def _with_layer_outputs(model: onnx.ModelProto, extra: Sequence[str] = ()
                        ) -> tuple[onnx.ModelProto, list[str]]:
    """A copy whose SN outputs (``<layer>.output``) are extra graph outputs, in graph order; the
    tensors named in ``extra`` (fused residuals) become outputs too. Returns the SN outputs.

    Types and shapes come from ONNX shape inference where it knows them (it does for the
    registered SwitchableNorm schema); otherwise the output is left untyped, which ONNX
    Runtime accepts.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    produced = [o for n in model.graph.node for o in n.output]
    wanted = [t for t in produced if t.endswith(LAYER_SUFFIX)]
    others = set(produced) - set(wanted)
    added = wanted + [t for t in dict.fromkeys(extra) if t in others]
    existing = {o.name for o in model.graph.output}
    known = {vi.name: vi for vi in model.graph.value_info}
    if any(t not in known for t in added):
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
            known.update({vi.name: vi for vi in inferred.graph.value_info})
        except Exception:  # an op without a schema: untyped outputs still run
            pass
    for t in added:
        if t in existing:
            continue
        vi = known.get(t)
        if vi is not None and vi.type.tensor_type.elem_type:
            model.graph.output.append(vi)
        else:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    return model, wanted


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
               "tensor(double)": np.float64}


class OnnxRuntimeRunner:
    """One ONNX form in an ONNX Runtime session (custom op registered when the graph needs it)."""

    def __init__(self, model: ModelLike, name: str, per_layer: bool,
                 threads: Optional[int] = None):
        from sn_deploy.passes.fuse import fused_relu_layers, fused_residual_layers
        from sn_deploy.runtime.onnxruntime import create_session, load_model

        from sn_deploy.passes.nchwc import nchwc_block_of

        proto = load_model(model)
        self.fused_relu = fused_relu_layers(proto)
        self.fused_residual = fused_residual_layers(proto)
        self.layer_outputs: list[str] = []
        declared = {o.name for o in proto.graph.output}
        # model.cpu.onnx keeps layer outputs in onnxruntime's blocked layout: compared per output
        # (its layers are the model.sn.onnx ones, compared per layer there)
        self.compares_layers = per_layer and nchwc_block_of(proto) is None
        if self.compares_layers:
            proto, self.layer_outputs = _with_layer_outputs(proto, self.fused_residual.values())
        hidden = set(self.layer_outputs) | (set(self.fused_residual.values()) - declared)
        self.name = name
        self.session = create_session(proto, threads=threads)
        self.inputs = self.session.get_inputs()
        self.output_names = [o.name for o in self.session.get_outputs() if o.name not in hidden]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {i.name: np.asarray(v, _ORT_DTYPES.get(i.type, None))
                 for i, v in zip(self.inputs, inputs.values())}
        names = [o.name for o in self.session.get_outputs()]
        try:
            values = self.session.run(names, feeds)
        except Exception as exc:  # onnxruntime's pybind errors have no common public base
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"ONNX Runtime cannot run '{self.name}': {first}") from None
        return dict(zip(names, values))


# --------------------------------------------------------------------------- the report
@dataclass
class FormResult:
    """One form under test: per-output results decide pass/fail; per-layer ones localise."""

    name: str
    outputs: list[Comparison] = field(default_factory=list)
    layers: list[Comparison] = field(default_factory=list)
    first_divergent_layer: Optional[str] = None
    missing_layers: list[str] = field(default_factory=list)  # SN layers without an output here

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(c.passed for c in self.outputs)


def _finite_or_none(value):
    """Strict JSON has no NaN/Infinity: write null (the ``reason`` field says why)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class ValidationReport:
    atol: float
    rtol: float
    input_shape: tuple[int, ...]
    forms: list[FormResult] = field(default_factory=list)
    adoption: Optional[dict] = None  # AdoptionSummary.to_json() of the PyTorch reference

    @property
    def passed(self) -> bool:
        return bool(self.forms) and all(f.passed for f in self.forms)

    def to_dict(self) -> dict:
        """A JSON-safe dict (non-finite numbers become null)."""
        def comp(c: Comparison) -> dict:
            d = {k: _finite_or_none(v) for k, v in asdict(c).items()}
            d["shape"] = list(c.shape)
            d["passed"] = c.passed
            return d

        return {
            "passed": self.passed, "atol": self.atol, "rtol": self.rtol, "rule": RULE,
            "reference": "pytorch",
            "input_shape": list(self.input_shape),
            **({"adoption": self.adoption} if self.adoption is not None else {}),
            "forms": [{
                "name": f.name, "passed": f.passed,
                "first_divergent_layer": f.first_divergent_layer,
                "missing_layers": list(f.missing_layers),
                "outputs": [comp(c) for c in f.outputs],
                "layers": [comp(c) for c in f.layers],
            } for f in self.forms],
        }


# --------------------------------------------------------------------------- inputs
def make_inputs(spec: str, input_shape: Shape, seed: int = 0) -> np.ndarray:
    """``random`` (seeded standard normal) or a ``.npy`` file shaped for the model.

    ``input_shape`` may hold ``None`` for a dynamic axis: a ``.npy`` then fixes it, while
    ``random`` needs every axis concrete.  A ``.npy`` always sets the batch unless the
    model's batch axis is static.
    """
    shape = tuple(None if d is None else int(d) for d in input_shape)
    if spec == "random":
        if any(d is None for d in shape):
            raise InputError(f"input shape {_shape_text(shape)} has dynamic axes; "
                             "pass --input-shape for random inputs")
        return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    path = Path(spec.rpartition(":")[0] if ".npz:" in spec else spec)
    if not path.is_file():
        raise InputError(f"--inputs '{spec}' not found: give 'random' or an existing .npy file")
    from sn_deploy.data import load_array

    arr = load_array(spec, "--inputs")
    if arr.dtype.kind not in "fiu":
        raise InputError(f"--inputs '{spec}' holds {getattr(arr, 'dtype', type(arr).__name__)} "
                         "data; give a numeric .npy array")
    fits = arr.ndim == len(shape) and all(
        d is None or a == d for i, (a, d) in enumerate(zip(arr.shape, shape)) if i > 0)
    if fits and shape[0] is not None and arr.shape[0] != shape[0]:
        raise InputError(f"--inputs '{spec}' has batch {arr.shape[0]}, but the model's batch "
                         f"axis is fixed at {shape[0]}; give {shape[0]} samples")
    if not fits or arr.size == 0:
        raise InputError(
            f"--inputs '{spec}' has shape {tuple(arr.shape)}, but the model takes "
            f"{_shape_text(('N',) + shape[1:])}; give an array of that shape or --input-shape"
        )
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(arr)):
        raise InputError(f"--inputs '{spec}' contains NaN/Inf values")
    return arr


def _shape_text(shape) -> str:
    return "x".join("?" if d is None else str(d) for d in shape)


# --------------------------------------------------------------------------- validate
def _form_names(models: Sequence[ModelLike]) -> list[str]:
    """File names, or parent/name where two forms share a file name."""
    names = [Path(m).name if isinstance(m, (str, Path)) else f"model[{i}]"
             for i, m in enumerate(models)]
    return [f"{Path(m).parent.name}/{n}" if names.count(n) > 1 and isinstance(m, (str, Path))
            else n for n, m in zip(names, models)]


def validate(
    model: nn.Module,
    onnx_models: Sequence[ModelLike],
    inputs: np.ndarray,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    per_layer: bool = False,
    threads: Optional[int] = None,
    extra_runners: Sequence[Runner] = (),
) -> ValidationReport:
    """PyTorch eval vs each ONNX form (and any extra runner) on the same inputs.

    The verdict is per output; with ``per_layer`` every SN layer's output is compared too, in
    PyTorch execution order, and the first one beyond tolerance is named as where the form
    starts to diverge.
    """
    if atol < 0 or rtol < 0:
        raise InputError(f"tolerances must be >= 0 (atol={atol}, rtol={rtol})")
    runners: list = [OnnxRuntimeRunner(m, n, per_layer, threads)
                     for m, n in zip(onnx_models, _form_names(onnx_models))]
    runners.extend(extra_runners)
    if not runners:
        raise InputError("nothing to compare: give at least one ONNX model or engine")
    output_names = list(getattr(runners[0], "output_names", None) or ["output"])
    feeds = {"input": np.ascontiguousarray(inputs, dtype=np.float32)}
    ref = TorchRunner(model, output_names, per_layer).run(feeds)
    # a layer whose output *is* a model output (a final LayerNorm, say) is compared as that output
    executed = [t for t in ref if t.endswith(LAYER_SUFFIX) and t not in output_names
                and not any(ref[t].shape == ref[o].shape and np.array_equal(ref[t], ref[o])
                            for o in output_names if o in ref)]
    report = ValidationReport(atol, rtol, tuple(inputs.shape))
    for runner in runners:
        got = runner.run(feeds)
        form = FormResult(runner.name)
        for out_name in output_names:
            if out_name in got:
                form.outputs.append(compare(ref[out_name], got[out_name], atol, rtol,
                                            name=out_name))
            else:
                form.outputs.append(Comparison(out_name, (), math.inf, math.inf, math.inf,
                                               math.nan, 0, 0, reason="output missing"))
        if per_layer and getattr(runner, "compares_layers", hasattr(runner, "layer_outputs")):
            fused = getattr(runner, "fused_relu", set())
            residuals = getattr(runner, "fused_residual", {})
            for t in executed:
                layer = t[: -len(LAYER_SUFFIX)]
                # a fused residual is this form's own tensor: the check isolates the layer itself
                residual = (got.get(residuals[layer], feeds.get(residuals[layer]))
                            if layer in residuals else None)
                if t not in got or (layer in residuals and residual is None):
                    form.missing_layers.append(layer)
                    continue
                expected = ref[t] if residual is None else ref[t].astype(np.float64) + residual
                expected = np.maximum(expected, 0) if layer in fused else expected
                form.layers.append(compare(expected, got[t], atol, rtol, name=layer))
            form.first_divergent_layer = next((c.name for c in form.layers if not c.passed), None)
        report.forms.append(form)
    return report
