"""Keep every SN layer inside onnxruntime's blocked NCHWc layout (CPU), between its convolutions.

onnxruntime's CPU provider runs convolutions in NCHWc (channels in blocks of 8 or 16, the block
set by the machine's SIMD width), and its layout pass leaves any op it does not know, the
SwitchableNorm custom op included, in plain NCHW: every SN layer then sits between a ReorderOutput
and a ReorderInput, about a fifth of ResNet-50's time.  This pass works on the graph onnxruntime
itself optimized and saved (see ``runtime.onnxruntime.optimize_for_this_cpu``): each
``ReorderOutput → SwitchableNorm → ReorderInput`` becomes one ``SwitchableNormNchwc`` that reads
and writes the blocked layout (``libsn_ort_op.so``), and a reorder is kept only where a consumer
needs plain NCHW (global pooling, a graph output).  A fused residual that arrives in NCHWc is
taken as is.  The result is tied to the block size, like an engine is tied to its GPU.
"""
from __future__ import annotations

from typing import Optional

import onnx
import onnx_graphsurgeon as gs

from sn_deploy import onnx_ops

NCHWC_DOMAIN = "com.microsoft.nchwc"
OP_TYPE = "SwitchableNormNchwc"
BLOCK_KEY = "sn_deploy.nchwc_block"


def _is_reorder(node: gs.Node, op: str) -> bool:
    return node.op == op and node.domain == NCHWC_DOMAIN and int(node.attrs.get("channels_last", 0)) == 0


def _producer(t: gs.Tensor):
    return t.inputs[0] if len(t.inputs) == 1 else None


def keep_sn_in_nchwc(graph: gs.Graph, block: int) -> gs.Graph:
    """Replace ReorderOutput → SwitchableNorm (→ ReorderInput) chains by SwitchableNormNchwc."""
    for node in [n for n in graph.nodes
                 if n.op == onnx_ops.OP_TYPE and n.domain == onnx_ops.DOMAIN]:
        src = _producer(node.inputs[0])
        if src is None or not _is_reorder(src, "ReorderOutput"):
            continue  # not fed by an NCHWc convolution: leave the plain op
        channels = int(src.attrs["channels"])
        inputs = [src.inputs[0], *node.inputs[1:5]]
        if len(node.inputs) > 5 and node.inputs[5].name:
            residual = node.inputs[5]
            rsrc = _producer(residual)
            if rsrc is not None and _is_reorder(rsrc, "ReorderOutput"):
                inputs.append(rsrc.inputs[0])
            else:
                blocked = gs.Variable(f"{residual.name}.nchwc", dtype=residual.dtype)
                graph.nodes.append(gs.Node("ReorderInput", name=f"{node.name}/ReorderResidual",
                                           domain=NCHWC_DOMAIN, attrs={"channels_last": 0},
                                           inputs=[residual], outputs=[blocked]))
                inputs.append(blocked)
        y = node.outputs[0]
        y_blocked = gs.Variable(f"{y.name}.nchwc", dtype=y.dtype)
        attrs = dict(node.attrs)
        attrs.update(channels=channels, block=int(block))
        node.inputs.clear()
        node.outputs.clear()
        graph.nodes.append(gs.Node(OP_TYPE, name=node.name, domain=onnx_ops.DOMAIN, attrs=attrs,
                                   inputs=inputs, outputs=[y_blocked]))
        needs_plain = y in graph.outputs
        for consumer in list(y.outputs):
            if not _is_reorder(consumer, "ReorderInput"):
                needs_plain = True
                continue
            reordered = consumer.outputs[0]
            for user in list(reordered.outputs):
                for i, t in enumerate(list(user.inputs)):
                    if t is reordered:
                        user.inputs[i] = y_blocked
            if reordered in graph.outputs:  # the blocked tensor itself is the graph output
                at = graph.outputs.index(reordered)
                y_blocked.name = reordered.name
                reordered.name = f"{reordered.name}.unused"
                graph.outputs[at] = y_blocked
            consumer.inputs.clear()
            consumer.outputs.clear()
        if needs_plain:
            graph.nodes.append(gs.Node("ReorderOutput", name=f"{node.name}/ReorderOutput",
                                       domain=NCHWC_DOMAIN,
                                       attrs={"channels": channels, "channels_last": 0},
                                       inputs=[y_blocked], outputs=[y]))
    return graph.cleanup().toposort()


def keep_sn_in_nchwc_model(model: onnx.ModelProto, block: int) -> onnx.ModelProto:
    """Model-level wrapper: the pass, the NCHWc opset import kept, the block size recorded."""
    out = gs.export_onnx(keep_sn_in_nchwc(gs.import_onnx(model), block))
    present = {o.domain for o in out.opset_import}
    for o in model.opset_import:
        if o.domain not in present:
            out.opset_import.append(o)
    kept = [p for p in model.metadata_props if p.key != BLOCK_KEY]
    del out.metadata_props[:]
    for p in kept:
        out.metadata_props.add(key=p.key, value=p.value)
    out.metadata_props.add(key=BLOCK_KEY, value=str(int(block)))
    out.ir_version = model.ir_version
    return out


def nchwc_block_of(model: onnx.ModelProto) -> Optional[int]:
    """The NCHWc block size a model.cpu.onnx was made for (None: not such a model)."""
    value = next((p.value for p in model.metadata_props if p.key == BLOCK_KEY), None)
    return int(value) if value is not None else None


def nchwc_layers(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if n.op_type == OP_TYPE and n.domain == onnx_ops.DOMAIN)
