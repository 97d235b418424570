"""ONNX Runtime sessions for all three model forms, with providers chosen by what is really there.

* ``model.onnx`` (standard ops) runs as is.
* ``model.sn.onnx`` needs the ``sn_deploy::SwitchableNorm`` kernel. Preferred: the native
  custom-op library ``libsn_ort_op.so`` (C++, the CPU kernel; the same file Triton's onnxruntime
  backend loads). Fallback when it is not built: an onnxruntime-extensions Python custom op,
  registered as ``onnx_op(op_type="sn_deploy::SwitchableNorm")`` (0.15 splits ``domain::type``,
  so the node keeps its own domain and opset import). What that bridge cannot do, found by
  trying 0.15: it reads only int64/float/string *scalar* attributes (a FLOATS attribute fails
  session creation with "Attribute name and type don't match" whether declared dt_float or
  dt_string), and it takes a fixed input list (an empty optional input is "marked single but has
  an empty string"). So its session is built from an in-memory copy whose SN nodes carry the
  weight lists as JSON strings and all six inputs (absent running stats or residual → an empty
  tensor); the
  file on disk is untouched. The op computes with the compiled CPU kernel
  (:func:`sn_deploy.ops.switchable_norm_cpu`) when it loads, else with the float64 reference
  cast to the input dtype; :func:`implementation` says which. It is float32 only, and slow on
  large tensors (the bridge copies outputs through Python lists): it is there for comparison.

The CUDA provider is requested only when a CUDA driver and device are present (libcuda via
ctypes, cuDeviceGetCount ≥ 1), so CPU machines with onnxruntime-gpu see no provider-loading
errors; sessions log at severity ERROR and above only.
"""
from __future__ import annotations

import ctypes
import functools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
import onnx

from sn_deploy import onnx_ops
from sn_deploy.errors import InputError

if TYPE_CHECKING:
    import onnxruntime

ModelLike = Union[str, os.PathLike, onnx.ModelProto]


@functools.lru_cache(maxsize=1)
def cuda_device_count() -> int:
    """CUDA devices visible through the driver API (0 without a driver): no CUDA toolkit needed."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = []
    if cuda_device_count() > 0 and "CUDAExecutionProvider" in available:
        providers.append("CUDAExecutionProvider")
    return providers + ["CPUExecutionProvider"]


def load_model(model: ModelLike) -> onnx.ModelProto:
    """A ModelProto from a path or as given; clear InputError for a missing or unreadable file."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise InputError(f"ONNX model '{path}' not found; check the path")
    if path.stat().st_size == 0:
        raise InputError(f"'{path}' is empty (0 bytes), not an ONNX model; re-export it with "
                         "sn-export")
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # protobuf raises several types for garbage
        raise InputError(f"'{path}' is not a readable ONNX model ({type(exc).__name__}); "
                         "re-export it with sn-export") from None
    missing = [what for what, present in (
        ("nodes", proto.graph.node), ("inputs", proto.graph.input),
        ("outputs", proto.graph.output), ("opset", proto.opset_import)) if not present]
    if missing:  # garbage or a cut-off file can parse as a protobuf with parts missing
        raise InputError(f"'{path}' is not a complete ONNX model (no graph {', '.join(missing)}; "
                         "truncated or not ONNX); re-export it with sn-export")
    return proto


def has_sn_nodes(model: onnx.ModelProto) -> bool:
    return any(n.domain == onnx_ops.DOMAIN and n.op_type == onnx_ops.OP_TYPE
               for n in model.graph.node)


@functools.lru_cache(maxsize=None)
def nchwc_block_size() -> int:
    """The channel block of onnxruntime's NCHWc layout on this CPU (8 with AVX2, 16 with
    AVX-512): a 4-channel tensor reordered by onnxruntime itself comes out padded to one block."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    node = helper.make_node("ReorderInput", ["x"], ["y"], domain="com.microsoft.nchwc",
                            channels_last=0)
    graph = helper.make_graph(
        [node], "nchwc_block_probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    probe = helper.make_model(graph, ir_version=9, opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft.nchwc", 1)])
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        return int(sess.run(None, {"x": np.zeros((1, 4, 1, 1), np.float32)})[0].shape[1])
    except Exception:  # noqa: BLE001 - a build or CPU without NCHWc kernels
        return 0


def optimize_for_this_cpu(model: ModelLike, threads: Optional[int] = None) -> onnx.ModelProto:
    """model.sn.onnx → model.cpu.onnx: onnxruntime's own full optimization (NCHWc convolutions,
    fusions) saved, then every SN layer kept in NCHWc (:mod:`sn_deploy.passes.nchwc`).

    Like a TensorRT engine, the result belongs to this kind of CPU (its NCHWc block size is
    recorded and checked when a session is created) and needs ``libsn_ort_op.so``.
    """
    import tempfile

    import onnxruntime as ort

    from sn_deploy.passes.nchwc import keep_sn_in_nchwc_model

    proto = load_model(model)
    native = native_op_library()
    if native is None:
        raise InputError("the CPU-optimized form needs the native op library: build it with "
                         "`make plugins`")
    block = nchwc_block_size()
    if block == 0:
        raise InputError("this onnxruntime build or CPU has no NCHWc kernels: deploy model.onnx "
                         "or model.sn.onnx instead")
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = f"{tmp}/optimized.onnx"
        if threads:
            opts.intra_op_num_threads = threads
        opts.register_custom_ops_library(str(native))
        try:
            ort.InferenceSession(proto.SerializeToString(), sess_options=opts,
                                 providers=["CPUExecutionProvider"])
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"ONNX Runtime cannot load the model: {first}") from None
        optimized = onnx.load(f"{tmp}/optimized.onnx")
    for p in proto.metadata_props:  # keep sn_deploy's metadata (fused layers, producer notes)
        if not any(q.key == p.key for q in optimized.metadata_props):
            optimized.metadata_props.add(key=p.key, value=p.value)
    return keep_sn_in_nchwc_model(optimized, block)


# --------------------------------------------------------------------------- the custom op
def native_op_library() -> Optional[Path]:
    """``libsn_ort_op.so`` when it is built (``make plugins``), else None."""
    from sn_deploy import ops

    path = ops.library_path("sn_ort_op")
    return path if path.is_file() else None


def implementation() -> str:
    """Which kernel backs the SwitchableNorm custom op in this process."""
    if native_op_library() is not None:
        return "native-ort-op"
    return _pyop_implementation()


def _pyop_implementation() -> str:
    try:
        from sn_deploy import ops

        if ops.available():
            return "native-cpu"
    except ImportError:
        pass
    return "reference"


def _compute(x, scale, bias, running_mean, running_var, residual, mean_weights, var_weights, eps,
             relu):
    rm = running_mean if running_mean.size else None
    rv = running_var if running_var.size else None
    res = np.ascontiguousarray(residual) if residual.size else None
    if _pyop_implementation() == "native-cpu":
        from sn_deploy import ops

        return ops.switchable_norm_cpu(x, scale, bias, rm, rv, mean_weights, var_weights, eps,
                                       relu=relu, residual=res)
    from sn_deploy import reference

    y = reference.switchable_norm(x, scale, bias, mean_weights, var_weights, rm, rv, eps=eps,
                                  relu=relu, residual=res)
    return y.astype(x.dtype)


@functools.lru_cache(maxsize=1)
def _register_pyop() -> None:
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    f = PyCustomOpDef.dt_float

    @onnx_op(op_type=f"{onnx_ops.DOMAIN}::{onnx_ops.OP_TYPE}", inputs=[f] * 6, outputs=[f],
             attrs={"epsilon": PyCustomOpDef.dt_float, "mean_weights": PyCustomOpDef.dt_string,
                    "var_weights": PyCustomOpDef.dt_string, "relu": PyCustomOpDef.dt_int64})
    def switchable_norm(x, scale, bias, running_mean, running_var, residual, **attrs):
        return _compute(
            np.ascontiguousarray(x), scale, bias, running_mean, running_var, residual,
            np.asarray(json.loads(attrs["mean_weights"]), np.float32),
            np.asarray(json.loads(attrs["var_weights"]), np.float32),
            float(attrs["epsilon"]), bool(attrs.get("relu", 0)),
        )


def _for_pyop(model: onnx.ModelProto) -> onnx.ModelProto:
    """In-memory copy with SN nodes in the form the Python custom-op bridge can call.

    Same domain and op type; weight lists as JSON strings, all six inputs present.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    empty_name = "sn_deploy.empty"
    needs_empty = False
    for node in model.graph.node:
        if node.domain != onnx_ops.DOMAIN or node.op_type != onnx_ops.OP_TYPE:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        del node.attribute[:]
        node.attribute.extend([
            onnx.helper.make_attribute(onnx_ops.ATTR_EPSILON,
                                       float(attrs.get(onnx_ops.ATTR_EPSILON, 1e-5))),
            onnx.helper.make_attribute(onnx_ops.ATTR_MEAN_WEIGHTS,
                                       json.dumps(list(attrs[onnx_ops.ATTR_MEAN_WEIGHTS]))),
            onnx.helper.make_attribute(onnx_ops.ATTR_VAR_WEIGHTS,
                                       json.dumps(list(attrs[onnx_ops.ATTR_VAR_WEIGHTS]))),
            onnx.helper.make_attribute(onnx_ops.ATTR_RELU, int(attrs.get(onnx_ops.ATTR_RELU, 0))),
        ])
        inputs = [i if i else empty_name for i in node.input]
        inputs += [empty_name] * (6 - len(inputs))
        needs_empty |= empty_name in inputs
        del node.input[:]
        node.input.extend(inputs)
        del node.metadata_props[:]
    if needs_empty:
        model.graph.initializer.append(
            onnx.numpy_helper.from_array(np.zeros(0, np.float32), empty_name))
    return model


def _sn_elem_types(model: onnx.ModelProto) -> set[int]:
    """Element types of the SN nodes' X inputs, as far as the model states them."""
    known = {v.name: v.type.tensor_type.elem_type
             for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]}
    return {known.get(n.input[0], onnx.TensorProto.FLOAT) for n in model.graph.node
            if n.domain == onnx_ops.DOMAIN and n.op_type == onnx_ops.OP_TYPE}


# --------------------------------------------------------------------------- sessions
def create_session(
    model: ModelLike,
    *,
    threads: Optional[int] = None,
    providers: Optional[list[str]] = None,
    spinning: bool = False,
    native_op: bool = True,
) -> "onnxruntime.InferenceSession":
    """An InferenceSession for any of the model forms (custom op registered when needed).

    ``threads`` sets the intra-op pool (None: onnxruntime's default, one per core); ``spinning``
    lets idle pool threads busy-wait (lower latency, burns cores: off by default so a server's
    workers do not starve each other); ``providers`` overrides :func:`default_providers`;
    ``native_op=False`` forces the Python custom op (for comparing the two).
    """
    import onnxruntime as ort

    from sn_deploy.passes.nchwc import nchwc_block_of

    proto = load_model(model)
    block = nchwc_block_of(proto)
    if block is not None:
        made_for = f"this model.cpu.onnx was optimized for onnxruntime's NCHWc block {block}; "
        here = nchwc_block_size()
        if here != block:
            raise InputError(made_for + f"this CPU uses {here or 'no NCHWc'}: rebuild it here "
                             "with sn-export --cpu-optimize, or deploy model.onnx")
        if native_op_library() is None or not native_op:
            raise InputError(made_for + "it needs the native op library (make plugins)")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if block is not None:
        opts.register_custom_ops_library(str(native_op_library()))
    elif has_sn_nodes(proto):
        native = native_op_library() if native_op else None
        if native is not None:
            opts.register_custom_ops_library(str(native))
        else:
            from onnxruntime_extensions import get_library_path

            if _sn_elem_types(proto) - {onnx.TensorProto.FLOAT}:
                raise InputError(
                    "the Python SwitchableNorm op runs float32 models only: build the native op "
                    "library (make plugins) or run the decomposed model.onnx")
            _register_pyop()
            opts.register_custom_ops_library(get_library_path())
            proto = _for_pyop(proto)
    try:
        return ort.InferenceSession(proto.SerializeToString(), sess_options=opts,
                                    providers=providers or default_providers())
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"ONNX Runtime cannot load the model: {first}") from None


def run(session: "onnxruntime.InferenceSession", feeds: dict[str, np.ndarray], outputs: Optional[list[str]] = None
        ) -> dict[str, np.ndarray]:
    """Run and return ``{output name: array}`` (all outputs unless ``outputs`` names some)."""
    names = outputs or [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def session_info(session: "onnxruntime.InferenceSession") -> dict:
    """Providers and the I/O signature, for logs and the server's metadata."""
    io = lambda ts: [{"name": t.name, "shape": t.shape, "type": t.type} for t in ts]  # noqa: E731
    return {"providers": session.get_providers(), "inputs": io(session.get_inputs()),
            "outputs": io(session.get_outputs())}
