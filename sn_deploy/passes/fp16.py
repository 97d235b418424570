"""Convert a graph's float32 tensors to float16 (for strongly typed TensorRT FP16 engines).

TensorRT 11 networks are strongly typed: precision comes from the tensor types in the ONNX graph,
not from a builder flag. This pass retypes graph inputs/outputs, intermediate value infos,
float32 initializers and Constant nodes, and Cast-to-float nodes. Plugin fields are node
attributes, not tensors, so SwitchableNorm_TRT keeps its float32 weights and accumulates in
float32 whatever the I/O type.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper


def _retype(value_info: onnx.ValueInfoProto) -> None:
    tt = value_info.type.tensor_type
    if tt.elem_type == TensorProto.FLOAT:
        tt.elem_type = TensorProto.FLOAT16


def _half(tensor: onnx.TensorProto) -> onnx.TensorProto:
    arr = numpy_helper.to_array(tensor)
    if arr.dtype != np.float32:
        return tensor
    if np.abs(arr).max(initial=0) > 65504:
        raise ValueError(f"tensor '{tensor.name}' has values beyond the float16 range")
    return numpy_helper.from_array(arr.astype(np.float16), tensor.name)


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every float32 tensor in float16."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        _retype(vi)
    for i, init in enumerate(g.initializer):
        g.initializer[i].CopyFrom(_half(init))
    for node in g.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
            elif node.op_type == "Constant" and attr.name == "value" and attr.HasField("t"):
                attr.t.CopyFrom(_half(attr.t))
    return model
