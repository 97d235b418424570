"""Fold a ReLU that directly follows a SwitchableNorm into the node's ``relu`` attribute.

Every backend applies it in the same pass that writes the output (native kernels, the TensorRT
plugin, the decomposed graph's final op), saving one full read and write of the activation per
fused layer. The SN output keeps its name (``<layer>.output``, used by per-layer validation) and
takes over the ReLU's consumers; the fused layers are listed in the model's metadata under
``sn_deploy.fused_relu`` so validation compares them with ReLU(PyTorch layer output).
"""
from __future__ import annotations

import json

import onnx
import onnx_graphsurgeon as gs

from sn_deploy import onnx_ops

FUSED_RELU_KEY = "sn_deploy.fused_relu"


def fuse_relu(graph: gs.Graph) -> tuple[gs.Graph, list[str]]:
    """Fold every SN → Relu pair where the Relu is the SN output's only consumer."""
    fused = []
    for node in [n for n in graph.nodes if n.op == onnx_ops.OP_TYPE and n.domain == onnx_ops.DOMAIN]:
        out = node.outputs[0]
        if out in graph.outputs or len(out.outputs) != 1 or node.attrs.get(onnx_ops.ATTR_RELU, 0):
            continue
        relu = out.outputs[0]
        relu_out = relu.outputs[0]
        if relu.op != "Relu" or relu_out in graph.outputs:
            continue
        for consumer in list(relu_out.outputs):
            consumer.inputs = [out if t is relu_out else t for t in consumer.inputs]
        relu.inputs, relu.outputs = [], []
        node.attrs[onnx_ops.ATTR_RELU] = 1
        fused.append(node.name)
    graph.cleanup().toposort()
    return graph, fused


def fused_relu_layers(model: onnx.ModelProto) -> set[str]:
    for prop in model.metadata_props:
        if prop.key == FUSED_RELU_KEY:
            return set(json.loads(prop.value))
    return set()


def set_fused_relu_layers(model: onnx.ModelProto, layers) -> None:
    keep = [(p.key, p.value) for p in model.metadata_props if p.key != FUSED_RELU_KEY]
    del model.metadata_props[:]
    for k, v in keep + [(FUSED_RELU_KEY, json.dumps(sorted(layers)))]:
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v


def fuse_relu_model(model: onnx.ModelProto) -> onnx.ModelProto:
    graph, fused = fuse_relu(gs.import_onnx(model))
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    out.producer_name = model.producer_name
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    set_fused_relu_layers(out, fused_relu_layers(model) | set(fused))
    onnx.checker.check_model(out)
    return onnx.shape_inference.infer_shapes(out)
