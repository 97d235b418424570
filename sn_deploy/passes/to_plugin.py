"""Map ``sn_deploy::SwitchableNorm`` nodes to TensorRT's ``SwitchableNorm_TRT`` plugin nodes.

onnx-tensorrt imports an op it does not know through its fallback plugin importer: it looks the
plugin creator up by op type, ``plugin_version`` and ``plugin_namespace``, and turns the
attributes the creator lists in ``getFieldNames`` into plugin fields (floats → kFLOAT32, ints →
kINT32, tensors → their type; see onnx-tensorrt's ``loadFields``). So the
per-channel constants move from inputs into float32 tensor attributes and the node keeps the input
X, plus the fused residual as a second input where ``passes/fuse.py`` folded one (field
``residual=1``). onnx-tensorrt dispatches on the op type alone (the domain is not looked at), so the nodes
live in the ``trt.plugins`` domain, as NVIDIA ModelOpt writes them, and the model still passes
``onnx.checker``, which rejects an unknown op in the default domain (``domain=""`` is available
for tools that insist on it; the checker is skipped then). A directly following Relu that is the
only consumer can be folded into the plugin's ``relu`` field.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from sn_deploy import onnx_ops

PLUGIN_OP = "SwitchableNorm_TRT"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""
PLUGIN_DOMAIN = "trt.plugins"
_PARAMS = ("scale", "bias", "running_mean", "running_var")


def _is_sn(node: gs.Node) -> bool:
    return node.op == onnx_ops.OP_TYPE and node.domain == onnx_ops.DOMAIN


def _foldable_relu(graph: gs.Graph, node: gs.Node) -> Optional[gs.Node]:
    """The standard Relu reading ``node``'s output, if it is the only reader and that output is
    not itself a graph output (folding would otherwise change what someone else sees)."""
    out = node.outputs[0]
    if out in graph.outputs or len(out.outputs) != 1:
        return None
    consumer = out.outputs[0]
    return consumer if consumer.op == "Relu" and (consumer.domain or "") in ("", "ai.onnx") else None


def to_plugin(graph: gs.Graph, fuse_relu: bool = True, domain: str = PLUGIN_DOMAIN) -> gs.Graph:
    """Rewrite every SwitchableNorm node into a SwitchableNorm_TRT plugin node."""
    for node in [n for n in graph.nodes if _is_sn(n)]:
        x = node.inputs[0]
        if x.shape is None:
            raise ValueError(f"SwitchableNorm '{node.name}': input rank unknown; run shape inference")
        attrs = {
            "plugin_version": PLUGIN_VERSION,
            "plugin_namespace": PLUGIN_NAMESPACE,
            "epsilon": float(node.attrs.get(onnx_ops.ATTR_EPSILON, 1e-5)),
            "mean_weights": [float(v) for v in node.attrs[onnx_ops.ATTR_MEAN_WEIGHTS]],
            "var_weights": [float(v) for v in node.attrs[onnx_ops.ATTR_VAR_WEIGHTS]],
            "relu": int(node.attrs.get(onnx_ops.ATTR_RELU, 0)),
            "rank2": int(len(x.shape) == 2),
        }
        residual = onnx_ops.residual_input(node)
        attrs["residual"] = int(residual is not None)
        for name, tensor in zip(_PARAMS, node.inputs[1:onnx_ops.INPUT_RESIDUAL]):
            if tensor.name == "":
                continue
            if not isinstance(tensor, gs.Constant):
                raise ValueError(f"SwitchableNorm '{node.name}': '{name}' must be an initializer")
            attrs[name] = onnx.numpy_helper.from_array(
                np.ascontiguousarray(tensor.values, dtype=np.float32).reshape(-1), name)
        relu = _foldable_relu(graph, node) if fuse_relu else None
        outputs = list(node.outputs)
        if relu is not None:
            attrs["relu"] = 1
            outputs = list(relu.outputs)
            relu.outputs = []
            relu.inputs = []
        inputs = [x] if residual is None else [x, residual]
        plugin = gs.Node(PLUGIN_OP, name=node.name, domain=domain, attrs=attrs, inputs=inputs,
                         outputs=[])
        node.inputs, node.outputs = [], []
        plugin.outputs = outputs
        graph.nodes.append(plugin)
    graph.cleanup().toposort()
    return graph


def to_plugin_model(model: onnx.ModelProto, fuse_relu: bool = True,
                    domain: str = PLUGIN_DOMAIN) -> onnx.ModelProto:
    """``model.sn.onnx`` → ``model.trt.onnx`` (opset imports updated, checked unless domain is "")."""
    graph = to_plugin(gs.import_onnx(model), fuse_relu=fuse_relu, domain=domain)
    out = gs.export_onnx(graph)
    opsets = {o.domain: o.version for o in out.opset_import if o.domain != onnx_ops.DOMAIN}
    if domain and any(n.domain == domain for n in out.graph.node):
        opsets.setdefault(domain, 1)
    del out.opset_import[:]
    out.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in opsets.items())
    out.ir_version = model.ir_version
    out.producer_name = model.producer_name or "sn_deploy"
    if domain:
        onnx.checker.check_model(out)
    return out
