"""Lower every ``sn_deploy::SwitchableNorm`` node to standard ONNX ops (runs on any backend).

Per node the work on the activation is four light passes: the per-plane mean (ReduceMean), the
centred sum of squares (Sub, Mul, ReduceSum: two-pass variance, exact on inputs whose mean dwarfs
their spread, where E[x²]−E[x]² loses every digit in float32), and the application
``y = x·A + B`` (one Mul, one Add) with per-(n, c) A = scale/sqrt(var+eps), B = bias − mean·A.
Everything else runs on the tiny (N, C, 1…) statistics, with the per-channel constants (softmaxed
weights × running stats, gamma, beta) folded in numpy when the graph is built.  A fused residual
(``passes/fuse.py``) becomes an Add after the application, before the fused ReLU: the standard-op
graph computes exactly what it computed before the fusion.

Forms measured on one 8x64x56x56 fp32 layer, onnxruntime 1.31 CPU, 2 shared cores, interleaved
runs, min (median) ms at 1 / 2 threads, static shape:

=====================================  ===============  ===============
centred sum of squares, application     1 thread         2 threads
=====================================  ===============  ===============
ReduceSumSquare(d), BatchNorm (1,NC,L)  2.36 (3.05)      2.31 (2.81)
ReduceSumSquare(d), Mul + Add           2.38 (3.07)      2.30 (2.75)
ReduceSum(d·d), Mul + Add  (kept)       1.49 (2.28)      1.51 (1.86)
=====================================  ===============  ===============

onnxruntime's ReduceSumSquare takes a slow generic path where ReduceSum over trailing axes has a
fast one; the application alone is a draw (Mul+Add 0.48 ms, BatchNormalization over the
(1, N·C, L) view 0.45 ms at 1 thread) so the simpler Mul + Add is kept: no reshapes, no Shape
chain for dynamic shapes, and other backends fuse it.  The same holds with dynamic spatial axes.
The pattern does not match onnxruntime's LayerNormalization fusion, whose one-pass variance
would break the offset-input accuracy.

The unbiased IN variance (÷(L−1)) is reproduced exactly: a constant factor for static spatial
sizes, computed from Shape for dynamic ones.  Spatial size 1 makes that variance 0/0 = NaN, as in
the official code: this pass (like the exporter) refuses such static shapes, while with dynamic
spatial axes the decomposed graph returns NaN for them at run time (sn-validate and the server
reject NaN outputs).

Reductions take ``axes`` as an attribute or, from the opset where each op changed (ReduceSum 13,
the others 18), as an input; the form follows the model's default-domain opset.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from sn_deploy import onnx_ops
from sn_deploy.errors import InputError

_FLOAT = np.float32
#: opset from which a Reduce* op takes ``axes`` as an input instead of an attribute
_AXES_INPUT_SINCE = {"ReduceSum": 13}
_AXES_INPUT_DEFAULT = 18


class _Builder:
    """Adds nodes to a graph with unique names derived from the SN layer's name."""

    def __init__(self, graph: gs.Graph, prefix: str):
        self.graph, self.prefix, self.count = graph, prefix, 0
        self.opset = int(graph.opset)

    def _name(self, op: str) -> str:
        self.count += 1
        return f"{self.prefix}/{op}_{self.count}"

    def op(self, op: str, *inputs, attrs: Optional[dict] = None, out: Optional[gs.Variable] = None,
           dtype=_FLOAT) -> gs.Variable:
        name = self._name(op)
        result = out if out is not None else gs.Variable(f"{name}:0", dtype=dtype)
        node = gs.Node(op, name=name, attrs=attrs or {}, inputs=list(inputs), outputs=[result])
        self.graph.nodes.append(node)
        return result

    def const(self, value, name: str, dtype=_FLOAT) -> gs.Constant:
        return gs.Constant(self._name(name), np.ascontiguousarray(np.asarray(value, dtype=dtype)))

    def reduce(self, op: str, x, axes: list[int], keepdims: int = 1, dtype=_FLOAT) -> gs.Variable:
        if self.opset >= _AXES_INPUT_SINCE.get(op, _AXES_INPUT_DEFAULT):
            return self.op(op, x, self.const(axes, "axes", np.int64),
                           attrs={"keepdims": keepdims}, dtype=dtype)
        return self.op(op, x, attrs={"axes": axes, "keepdims": keepdims}, dtype=dtype)


def _inv_count_minus_one(b: _Builder, node: gs.Node, x: gs.Variable, axes: list[int]
                         ) -> gs.Tensor:
    """1/(L−1) for the L elements reduced over: a constant when static, else from Shape."""
    dims = [x.shape[a] if x.shape is not None else None for a in axes]
    if all(isinstance(d, int) and d > 0 for d in dims):
        L = int(np.prod(dims))
        if L < 2:
            raise InputError(
                f"SwitchableNorm '{node.name}' normalizes over {L} element per plane (input "
                f"{tuple(x.shape)}): the unbiased variance is NaN; use a larger input shape"
            )
        return b.const(1.0 / (L - 1), "inv_l_minus_1")
    shp = b.op("Shape", x, dtype=np.int64)
    picked = b.op("Gather", shp, b.const(axes, "count_axes", np.int64), attrs={"axis": 0},
                  dtype=np.int64)
    L = b.op("Cast", b.reduce("ReduceProd", picked, [0], keepdims=0, dtype=np.int64),
             attrs={"to": onnx.TensorProto.FLOAT})
    return b.op("Reciprocal", b.op("Sub", L, b.const(1.0, "one")))


def _centred_moments(b: _Builder, node: gs.Node, x: gs.Variable, axes: list[int]
                     ) -> tuple[gs.Variable, gs.Variable]:
    """Mean and unbiased variance over ``axes`` (keepdims), two-pass: sum((x−mean)²)/(L−1)."""
    mean = b.reduce("ReduceMean", x, axes)
    d = b.op("Sub", x, mean)
    ss = b.reduce("ReduceSum", b.op("Mul", d, d), axes)
    return mean, b.op("Mul", ss, _inv_count_minus_one(b, node, x, axes))


def _attrs(node: gs.Node) -> tuple[float, np.ndarray, np.ndarray, bool]:
    eps = float(node.attrs.get(onnx_ops.ATTR_EPSILON, 1e-5))
    try:
        mw = np.asarray(node.attrs[onnx_ops.ATTR_MEAN_WEIGHTS], np.float64).reshape(-1)
        vw = np.asarray(node.attrs[onnx_ops.ATTR_VAR_WEIGHTS], np.float64).reshape(-1)
    except KeyError as exc:
        raise InputError(f"SwitchableNorm '{node.name}' lacks the {exc} attribute; "
                         "re-export the model with sn-export") from None
    return eps, mw, vw, bool(node.attrs.get(onnx_ops.ATTR_RELU, 0))


def _constant_input(node: gs.Node, index: int) -> Optional[np.ndarray]:
    if index >= len(node.inputs) or node.inputs[index].name == "":
        return None
    t = node.inputs[index]
    if not isinstance(t, gs.Constant):
        raise InputError(
            f"SwitchableNorm '{node.name}': input {index} ('{t.name}') must be an initializer to "
            "be decomposed; fold constants first"
        )
    return np.asarray(t.values, np.float64).reshape(-1)


def _check(node: gs.Node, rank: Optional[int], x: gs.Variable, scale, beta, rm, rv, mw, vw
           ) -> None:
    """Refuse inconsistent nodes with a message, not an IndexError deep in numpy."""
    where = f"SwitchableNorm '{node.name}'"
    if rank is None or rank < 2:
        raise InputError(f"{where}: input rank {'unknown' if rank is None else rank}; the input "
                         "must be (N, C) or (N, C, *spatial) with a known rank")
    if scale is None or beta is None:
        raise InputError(f"{where}: scale and bias inputs are required")
    if (rm is None) != (rv is None):
        raise InputError(f"{where}: running_mean and running_var come together or not at all")
    C = scale.size
    sizes = {a.size for a in (beta, rm, rv) if a is not None}
    channels = x.shape[1] if x.shape is not None and len(x.shape) > 1 else None
    if sizes - {C} or (isinstance(channels, int) and channels != C):
        raise InputError(f"{where}: per-channel inputs disagree on C (scale has {C})")
    expected = 2 if (rank == 2 or rm is None) else 3
    if rank == 2 and rm is None:
        raise InputError(f"{where}: rank-2 input (SwitchNorm1d) needs running statistics")
    if mw.size != expected or vw.size != expected:
        raise InputError(f"{where}: expected {expected} mean/var weights, got {mw.size}/{vw.size}")


def _residual(node: gs.Node, x: gs.Variable) -> Optional[gs.Tensor]:
    """The fused residual input, refused when its known shape differs from X's (a broadcast)."""
    r = onnx_ops.residual_input(node)
    if r is None:
        return None
    known = lambda t: t.shape is not None and all(isinstance(d, int) for d in t.shape)  # noqa: E731
    if known(r) and known(x) and tuple(r.shape) != tuple(x.shape):
        raise InputError(f"SwitchableNorm '{node.name}': residual shape {tuple(r.shape)} differs "
                         f"from the input's {tuple(x.shape)}; a fused residual cannot broadcast")
    return r


def _lower_node(graph: gs.Graph, node: gs.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    eps, mw, vw, relu = _attrs(node)
    scale, beta = _constant_input(node, 1), _constant_input(node, 2)
    rm, rv = _constant_input(node, 3), _constant_input(node, 4)
    rank = len(x.shape) if x.shape is not None else (len(y.shape) if y.shape is not None else None)
    _check(node, rank, x, scale, beta, rm, rv, mw, vw)
    residual = _residual(node, x)
    C = scale.size
    b = _Builder(graph, node.name or "sn")
    node.outputs = []  # detach: y gets a new producer below
    is_half = (y.dtype if y.dtype is not None else x.dtype) == np.float16
    xf = b.op("Cast", x, attrs={"to": onnx.TensorProto.FLOAT}) if is_half else x
    if is_half:
        xf.shape = x.shape  # the static-size check reads it
    stat_shape = (1, C) + (1,) * (rank - 2)

    if rank == 2:
        # SwitchNorm1d: LN over C (unbiased), BN from running stats; weights [LN, BN]
        mean_ln, var_ln = _centred_moments(b, node, xf, [1])
        mean = b.op("Add", b.op("Mul", mean_ln, b.const(mw[0], "w_ln")),
                    b.const((mw[1] * rm).reshape(stat_shape), "bn_mean"))
        var = b.op("Add", b.op("Mul", var_ln, b.const(vw[0], "v_ln")),
                   b.const((vw[1] * rv).reshape(stat_shape), "bn_var"))
    else:
        mean_in, var_in = _centred_moments(b, node, xf, list(range(2, rank)))
        mean_ln = b.reduce("ReduceMean", mean_in, [1])
        dm = b.op("Sub", mean_in, mean_ln)
        var_ln = b.op("Add", b.reduce("ReduceMean", var_in, [1]),
                      b.reduce("ReduceMean", b.op("Mul", dm, dm), [1]))
        mean = b.op("Add", b.op("Mul", mean_in, b.const(mw[0], "w_in")),
                    b.op("Mul", mean_ln, b.const(mw[1], "w_ln")))
        var = b.op("Add", b.op("Mul", var_in, b.const(vw[0], "v_in")),
                   b.op("Mul", var_ln, b.const(vw[1], "v_ln")))
        if rm is not None:  # w2·running_mean and v2·running_var folded per channel
            mean = b.op("Add", mean, b.const((mw[2] * rm).reshape(stat_shape), "bn_mean"))
            var = b.op("Add", var, b.const((vw[2] * rv).reshape(stat_shape), "bn_var"))
    # on the (N, C, 1…) statistics: A = gamma/sqrt(var + eps), B = beta − mean·A
    a = b.op("Div", b.const(scale.reshape(stat_shape), "scale"),
             b.op("Sqrt", b.op("Add", var, b.const(eps, "eps"))))
    shift = b.op("Sub", b.const(beta.reshape(stat_shape), "bias"), b.op("Mul", mean, a))
    final = None if (is_half or relu or residual is not None) else y
    result = b.op("Add", b.op("Mul", xf, a), shift, out=final)
    if residual is not None:  # summed in float32, like the kernels
        rf = b.op("Cast", residual, attrs={"to": onnx.TensorProto.FLOAT}) if is_half else residual
        result = b.op("Add", result, rf, out=None if (is_half or relu) else y)
    if relu:
        result = b.op("Relu", result, out=None if is_half else y)
    if is_half:
        b.op("Cast", result, attrs={"to": onnx.TensorProto.FLOAT16}, out=y, dtype=np.float16)


def is_sn_node(node: gs.Node) -> bool:
    return node.op == onnx_ops.OP_TYPE and node.domain == onnx_ops.DOMAIN


def decompose(graph: gs.Graph) -> gs.Graph:
    """Replace every SwitchableNorm node with standard ops; each keeps its output tensor name.

    Raises :class:`~sn_deploy.errors.InputError` for nodes that cannot be lowered (parameters
    that are not initializers, unknown rank, a static shape with one element per plane).
    """
    for node in [n for n in graph.nodes if is_sn_node(n)]:
        _lower_node(graph, node)
        node.inputs = []
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return graph


def decompose_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Decompose a model.sn.onnx; the ``sn_deploy`` opset import is dropped when no node uses it.

    Shapes are inferred first so every SN input has a known rank, and the result is checked and
    shape-inferred again.
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = decompose(gs.import_onnx(inferred))
    out = gs.export_onnx(graph, do_type_check=True)
    if not any(n.domain == onnx_ops.DOMAIN for n in out.graph.node):
        kept = [o for o in out.opset_import if o.domain != onnx_ops.DOMAIN]
        del out.opset_import[:]
        out.opset_import.extend(kept)
    out.ir_version = model.ir_version
    out.producer_name = model.producer_name or "sn_deploy"
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)  # e.g. which layers carry a fused ReLU
    onnx.checker.check_model(out)
    return onnx.shape_inference.infer_shapes(out)
