"""Replace SN layers whose mixing weights select one branch with that branch's cheaper exact form.

Sparse Switchable Normalization learns exactly one-hot weights; a user may also accept weights
within ``threshold`` of one-hot (``prune_threshold``; never applied by default, and the report says
what it cost). A branch is selected when both its mean and its variance weight are ≥ 1 − threshold;
the other branches are then dropped, which is exact only at threshold 0.

* pure BN → a per-channel affine folded into the producing Conv (weights rescaled, bias added)
  when that Conv feeds only this layer, else a BatchNormalization node; onnxruntime and TensorRT
  then keep the convolution in their fast layouts.
* pure IN → InstanceNormalization. ONNX's op uses the biased variance, SN the unbiased one
  (÷(L−1)); with a static plane size L the two agree exactly after
  ``eps' = eps·(L−1)/L`` and ``scale' = scale·√((L−1)/L)``.
* pure LN → kept as SwitchableNorm: ONNX LayerNormalization normalizes by the biased variance
  over all C·L values, SN's LN branch by ``mean_c(unbiased var_in) + spread of the means``, which
  is not a rescaling of it, so no standard op is exact.

What the node had folded in (``passes/fuse.py``) is put back after the replacement: the residual as
an Add, then the ReLU, so a fused ResNet block specializes like an unfused one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from sn_deploy import onnx_ops


@dataclass
class Specialization:
    layer: str
    weights: tuple[float, ...]
    replaced_by: str  # "conv-fold", "BatchNormalization", "InstanceNormalization", "kept: ..."
    max_abs_error: Optional[float] = None  # filled in by measure_specialization


def _branch(node: gs.Node, rank: int, threshold: float) -> Optional[str]:
    mw = np.asarray(node.attrs[onnx_ops.ATTR_MEAN_WEIGHTS], np.float64)
    vw = np.asarray(node.attrs[onnx_ops.ATTR_VAR_WEIGHTS], np.float64)
    names = ("ln", "bn") if rank == 2 else ("in", "ln", "bn")[: len(mw)]
    for k, name in enumerate(names):
        if mw[k] >= 1.0 - threshold and vw[k] >= 1.0 - threshold:
            return name
    return None


def _values(node: gs.Node, i: int) -> np.ndarray:
    return np.asarray(node.inputs[i].values, np.float64).reshape(-1)


def _fold_into_conv(graph: gs.Graph, node: gs.Node, a: np.ndarray, b: np.ndarray) -> bool:
    """Scale the producing Conv's weights and bias by the BN affine, when the Conv feeds only SN."""
    x = node.inputs[0]
    if len(x.inputs) != 1 or len(x.outputs) != 1 or x in graph.outputs:
        return False
    conv = x.inputs[0]
    if conv.op != "Conv" or not isinstance(conv.inputs[1], gs.Constant) or int(conv.attrs.get("group", 1)) != 1:
        return False
    w = np.asarray(conv.inputs[1].values, np.float64)
    bias = np.asarray(conv.inputs[2].values, np.float64) if len(conv.inputs) > 2 else np.zeros(w.shape[0])
    shape = (-1,) + (1,) * (w.ndim - 1)
    conv.inputs[1] = gs.Constant(f"{node.name}.folded_weight", (w * a.reshape(shape)).astype(np.float32))
    new_bias = gs.Constant(f"{node.name}.folded_bias", (bias * a + b).astype(np.float32))
    conv.inputs = conv.inputs[:2] + [new_bias]
    conv.outputs = _tail(graph, node, node.outputs[0])
    node.outputs = []
    return True


def _tail(graph: gs.Graph, node: gs.Node, out: gs.Variable) -> list[gs.Variable]:
    """Where the replacement writes: ``out`` directly, or through the node's fused residual (an
    Add) and fused ReLU, which are re-created as standard ops in that order."""
    residual = onnx_ops.residual_input(node)
    if residual is not None:
        mid = gs.Variable(f"{node.name}.pre_residual", dtype=out.dtype)
        after = _tail_relu(graph, node, out)
        graph.nodes.append(gs.Node("Add", name=f"{node.name}/residual",
                                   inputs=[mid, residual], outputs=after))
        return [mid]
    return _tail_relu(graph, node, out)


def _tail_relu(graph: gs.Graph, node: gs.Node, out: gs.Variable) -> list[gs.Variable]:
    if not node.attrs.get(onnx_ops.ATTR_RELU, 0):
        return [out]
    mid = gs.Variable(f"{node.name}.pre_relu", dtype=out.dtype)
    graph.nodes.append(gs.Node("Relu", name=f"{node.name}/relu", inputs=[mid], outputs=[out]))
    return [mid]


def specialize(graph: gs.Graph, threshold: float = 0.0) -> tuple[gs.Graph, list[Specialization]]:
    """Replace one-hot (within ``threshold``) SN layers; returns the graph and what was done."""
    done: list[Specialization] = []
    for node in [n for n in graph.nodes if n.op == onnx_ops.OP_TYPE and n.domain == onnx_ops.DOMAIN]:
        x = node.inputs[0]
        rank = len(x.shape) if x.shape is not None else 0
        branch = _branch(node, rank, threshold)
        if branch is None:
            continue
        weights = tuple(float(v) for v in node.attrs[onnx_ops.ATTR_MEAN_WEIGHTS])
        eps = float(node.attrs.get(onnx_ops.ATTR_EPSILON, 1e-5))
        scale, beta = _values(node, 1), _values(node, 2)
        out = node.outputs[0]
        if branch == "bn":
            rm, rv = _values(node, 3), _values(node, 4)
            a = scale / np.sqrt(rv + eps)
            b = beta - rm * a
            if rank >= 3 and _fold_into_conv(graph, node, a, b):
                node.inputs = []
                done.append(Specialization(node.name, weights, "conv-fold"))
                continue
            consts = [gs.Constant(f"{node.name}.{k}", v.astype(np.float32))
                      for k, v in (("scale", scale), ("bias", beta), ("running_mean", rm), ("running_var", rv))]
            graph.nodes.append(gs.Node("BatchNormalization", name=node.name, attrs={"epsilon": eps},
                                       inputs=[x, *consts], outputs=_tail(graph, node, out)))
            done.append(Specialization(node.name, weights, "BatchNormalization"))
        elif branch == "in":
            dims = list(x.shape[2:])
            if not all(isinstance(d, int) and d > 1 for d in dims):
                done.append(Specialization(node.name, weights, "kept: dynamic or size-1 plane (IN needs a static L)"))
                continue
            L = float(np.prod(dims))
            consts = [gs.Constant(f"{node.name}.scale", (scale * np.sqrt((L - 1) / L)).astype(np.float32)),
                      gs.Constant(f"{node.name}.bias", beta.astype(np.float32))]
            graph.nodes.append(gs.Node("InstanceNormalization", name=node.name,
                                       attrs={"epsilon": eps * (L - 1) / L},
                                       inputs=[x, *consts], outputs=_tail(graph, node, out)))
            done.append(Specialization(node.name, weights, "InstanceNormalization"))
        else:
            done.append(Specialization(node.name, weights, "kept: no exact standard form for pure LN"))
            continue
        node.inputs, node.outputs = [], []
    graph.cleanup().toposort()
    return graph, done


def specialize_model(model: onnx.ModelProto, threshold: float = 0.0
                     ) -> tuple[onnx.ModelProto, list[Specialization]]:
    graph, done = specialize(gs.import_onnx(model), threshold)
    out = gs.export_onnx(graph)
    if not any(n.domain == onnx_ops.DOMAIN for n in out.graph.node):
        kept = [o for o in out.opset_import if o.domain != onnx_ops.DOMAIN]
        del out.opset_import[:]
        out.opset_import.extend(kept)
    out.ir_version = model.ir_version
    out.producer_name = model.producer_name
    out.metadata_props.extend(model.metadata_props)
    onnx.checker.check_model(out)
    return onnx.shape_inference.infer_shapes(out), done


def measure_specialization(original: onnx.ModelProto, specialized: onnx.ModelProto,
                           done: list[Specialization], inputs: np.ndarray) -> float:
    """Max |output difference| of the specialized model vs the original on ``inputs``; each
    replaced layer's own output error is filled in where its output tensor survived."""
    from sn_deploy.runtime.onnxruntime import create_session
    from sn_deploy.validate import _with_layer_outputs

    ref_model, names = _with_layer_outputs(original)
    spec_model, spec_names = _with_layer_outputs(specialized)
    feed = {original.graph.input[0].name: inputs}
    ref = dict(zip([o.name for o in ref_model.graph.output], create_session(ref_model).run(None, feed)))
    got = dict(zip([o.name for o in spec_model.graph.output], create_session(spec_model).run(None, feed)))
    for s in done:
        t = f"{s.layer}.output"
        if t in ref and t in got:
            s.max_abs_error = float(np.abs(ref[t].astype(np.float64) - got[t]).max())
    out_name = original.graph.output[0].name
    return float(np.abs(ref[out_name].astype(np.float64) - got[out_name]).max())
