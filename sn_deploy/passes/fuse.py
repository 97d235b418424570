"""Fold what directly follows a SwitchableNorm into the node: a ReLU, or a residual Add (+ ReLU).

* SN → Relu becomes the node's ``relu`` attribute.
* SN → Add(other) [→ Relu], a ResNet block's ``relu(sn3(conv3(x)) + residual)``, becomes one node
  with ``other`` as its optional ``residual`` input (and ``relu=1`` when the Relu follows).

Every backend applies these in the same pass that writes the output (native kernels, the TensorRT
plugin, the decomposed graph's final ops), saving one or two full reads and writes of the
activation per fused layer. The SN output keeps its name (``<layer>.output``, used by per-layer
validation) and takes over the consumers of the last folded op. The model's metadata lists the
layers with a fused ReLU under ``sn_deploy.fused_relu`` and maps those with a fused residual to the
residual tensor's name under ``sn_deploy.fused_residual``, so validation compares them with
relu?(PyTorch layer output + that tensor).
"""
from __future__ import annotations

import json
from typing import Optional

import onnx
import onnx_graphsurgeon as gs

from sn_deploy import onnx_ops

FUSED_RELU_KEY = "sn_deploy.fused_relu"
FUSED_RESIDUAL_KEY = "sn_deploy.fused_residual"


def _is_sn(node: gs.Node) -> bool:
    return node.op == onnx_ops.OP_TYPE and node.domain == onnx_ops.DOMAIN


def _is_standard(node: gs.Node, op: str) -> bool:
    return node.op == op and (node.domain or "") in ("", "ai.onnx")


def _sole_consumer(graph: gs.Graph, tensor: gs.Tensor, op: str) -> Optional[gs.Node]:
    """The one standard ``op`` node reading ``tensor``, if it is its only reader and ``tensor`` is
    not a graph output (folding would otherwise change what someone else sees)."""
    if tensor in graph.outputs or len(tensor.outputs) != 1:
        return None
    consumer = tensor.outputs[0]
    return consumer if _is_standard(consumer, op) else None


def _take_over(graph: gs.Graph, out: gs.Variable, folded: gs.Node) -> None:
    """``out`` replaces the folded node's output for all its readers; the node is detached."""
    gone = folded.outputs[0]
    for consumer in list(gone.outputs):
        consumer.inputs = [out if t is gone else t for t in consumer.inputs]
    folded.inputs, folded.outputs = [], []


def fuse_relu(graph: gs.Graph) -> tuple[gs.Graph, list[str]]:
    """Fold every SN → Relu pair where the Relu is the SN output's only consumer."""
    fused = []
    for node in [n for n in graph.nodes if _is_sn(n)]:
        out = node.outputs[0]
        if node.attrs.get(onnx_ops.ATTR_RELU, 0):
            continue
        relu = _sole_consumer(graph, out, "Relu")
        if relu is None or relu.outputs[0] in graph.outputs:
            continue
        _take_over(graph, out, relu)
        node.attrs[onnx_ops.ATTR_RELU] = 1
        fused.append(node.name)
    graph.cleanup().toposort()
    return graph, fused


def _same_shape(a: gs.Tensor, b: gs.Tensor) -> bool:
    """Known, equal shapes (symbolic dims by name) and dtypes: an Add that does not broadcast."""
    if a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
        return False
    if a.dtype is None or a.dtype != b.dtype:
        return False
    return all(isinstance(d, (int, str)) and d == e and d not in ("", -1)
               for d, e in zip(a.shape, b.shape))


def _fusable_sn(graph: gs.Graph, tensor: gs.Tensor) -> Optional[gs.Node]:
    """The SN node producing ``tensor`` when the Add reading it may be folded into it."""
    if len(tensor.inputs) != 1 or not _is_sn(tensor.inputs[0]):
        return None
    node = tensor.inputs[0]
    if node.attrs.get(onnx_ops.ATTR_RELU, 0) or onnx_ops.residual_input(node) is not None:
        return None  # relu(SN) + r is not relu(SN + r); one residual per node
    return node if _sole_consumer(graph, tensor, "Add") is not None else None


def fuse_residual(graph: gs.Graph) -> tuple[gs.Graph, dict[str, str], list[str]]:
    """Fold SN → Add(other) [→ Relu] into the SN node (``residual`` input, ``relu=1``).

    The Add must be the SN output's only reader, its other operand must have exactly the SN
    output's shape and type (no broadcast) and its output must not be a graph output; the Relu is
    folded too when it is the Add's only reader. When both operands qualify (a downsampling
    block: ``sn3(...) + downsample(x)``), the first one, the block's main path, takes the Add.
    Returns the graph, ``{layer: residual tensor name}`` and the layers that also took a ReLU.
    """
    residuals: dict[str, str] = {}
    relus: list[str] = []
    for add in [n for n in graph.nodes if _is_standard(n, "Add")]:
        if len(add.inputs) != 2 or add.outputs[0] in graph.outputs:
            continue
        a, b = add.inputs
        if a is b:
            continue
        for sn_out, other in ((a, b), (b, a)):
            node = _fusable_sn(graph, sn_out)
            if node is not None and _same_shape(sn_out, other):
                break
        else:
            continue
        relu = _sole_consumer(graph, add.outputs[0], "Relu")
        if relu is not None and relu.outputs[0] in graph.outputs:
            relu = None
        _take_over(graph, sn_out, add)
        if relu is not None:
            _take_over(graph, sn_out, relu)
            node.attrs[onnx_ops.ATTR_RELU] = 1
            relus.append(node.name)
        slots = list(node.inputs)[: onnx_ops.INPUT_RESIDUAL]  # absent running stats: empty names
        slots += [gs.Variable.empty() for _ in range(onnx_ops.INPUT_RESIDUAL - len(slots))]
        node.inputs = slots + [other]
        residuals[node.name] = other.name
    graph.cleanup().toposort()
    return graph, residuals, relus


# --------------------------------------------------------------------------- metadata
def _metadata(model: onnx.ModelProto, key: str) -> Optional[str]:
    return next((p.value for p in model.metadata_props if p.key == key), None)


def _set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    keep = [(p.key, p.value) for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    for k, v in keep + [(key, value)]:
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v


def fused_relu_layers(model: onnx.ModelProto) -> set[str]:
    value = _metadata(model, FUSED_RELU_KEY)
    return set(json.loads(value)) if value else set()


def set_fused_relu_layers(model: onnx.ModelProto, layers) -> None:
    _set_metadata(model, FUSED_RELU_KEY, json.dumps(sorted(layers)))


def fused_residual_layers(model: onnx.ModelProto) -> dict[str, str]:
    """``{layer: name of the tensor added to its output}`` for layers with a fused residual."""
    value = _metadata(model, FUSED_RESIDUAL_KEY)
    return dict(json.loads(value)) if value else {}


def set_fused_residual_layers(model: onnx.ModelProto, layers: dict[str, str]) -> None:
    _set_metadata(model, FUSED_RESIDUAL_KEY, json.dumps(dict(sorted(layers.items()))))


# --------------------------------------------------------------------------- model level
def fuse_model(model: onnx.ModelProto, residual: bool = True) -> onnx.ModelProto:
    """Both folds on a model.sn.onnx (residual first: its Relu belongs after the Add), with the
    metadata validation needs; ``residual=False`` folds ReLUs only. Shapes are inferred first:
    a residual is folded only where both Add operands have known, equal shapes."""
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model) if residual else model)
    residuals: dict[str, str] = {}
    relus: list[str] = []
    if residual:
        graph, residuals, relus = fuse_residual(graph)
    graph, more = fuse_relu(graph)
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    out.producer_name = model.producer_name
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    set_fused_relu_layers(out, fused_relu_layers(model) | set(relus) | set(more))
    if residuals or fused_residual_layers(model):
        set_fused_residual_layers(out, {**fused_residual_layers(model), **residuals})
    onnx.checker.check_model(out)
    return onnx.shape_inference.infer_shapes(out)


def fuse_relu_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """SN → Relu folding only; residual Adds stay graph ops (``sn-export --no-fuse-residual``)."""
    return fuse_model(model, residual=False)
