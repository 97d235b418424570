"""The ``sn_deploy::SwitchableNorm`` ONNX operator: its schema and attribute names, in one place.

Inputs: ``X`` (N, C, *spatial) or (N, C); ``scale``, ``bias`` (C,); optional ``running_mean``,
``running_var`` (C,), present exactly when the layer has a BN branch; optional ``residual``, same
shape and type as ``X``, a fused skip connection (empty names fill the running-stat slots when a
layer without BN branch has one).
Attributes: ``epsilon``; ``mean_weights``/``var_weights``, the already-softmaxed mixing weights in
branch order ([IN, LN, BN], [IN, LN] without running stats, or [LN, BN] for rank-2 input, i.e.
SwitchNorm1d); ``relu`` (0/1), a fused ReLU on the output.
Output: ``Y = relu?(SN(X) + residual)``, same shape and type as ``X``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import onnx
from onnx import defs, helper

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

DOMAIN = "sn_deploy"
OP_TYPE = "SwitchableNorm"
OPSET_VERSION = 1

ATTR_EPSILON = "epsilon"
ATTR_MEAN_WEIGHTS = "mean_weights"
ATTR_VAR_WEIGHTS = "var_weights"
ATTR_RELU = "relu"

#: input slots, in schema order
INPUT_X, INPUT_SCALE, INPUT_BIAS, INPUT_RUNNING_MEAN, INPUT_RUNNING_VAR, INPUT_RESIDUAL = range(6)

#: metadata key on each SwitchableNorm node holding the PyTorch module's qualified name
LAYER_NAME_KEY = "sn_deploy.layer"


def _schema() -> defs.OpSchema:
    T = "T"
    P = "P"
    param = defs.OpSchema.FormalParameter
    optional = defs.OpSchema.FormalParameterOption.Optional
    return defs.OpSchema(
        OP_TYPE,
        DOMAIN,
        OPSET_VERSION,
        doc=__doc__,
        inputs=[
            param("X", T, "input, (N, C, *spatial) or (N, C)"),
            param("scale", P, "per-channel gamma, (C,)"),
            param("bias", P, "per-channel beta, (C,)"),
            param("running_mean", P, "BN-branch mean, (C,)", param_option=optional),
            param("running_var", P, "BN-branch variance, (C,)", param_option=optional),
            param("residual", T, "fused skip connection added before the ReLU, X's shape",
                  param_option=optional),
        ],
        outputs=[param("Y", T, "normalized output, same shape as X")],
        type_constraints=[
            (T, ["tensor(float)", "tensor(float16)"], "activation type"),
            (P, ["tensor(float)", "tensor(float16)"], "parameter type"),
        ],
        attributes=[
            defs.OpSchema.Attribute(
                ATTR_EPSILON, helper.make_attribute(ATTR_EPSILON, 1e-5), "added once to the variance"
            ),
            defs.OpSchema.Attribute(
                ATTR_MEAN_WEIGHTS, defs.OpSchema.AttrType.FLOATS, "softmaxed mean weights"
            ),
            defs.OpSchema.Attribute(
                ATTR_VAR_WEIGHTS, defs.OpSchema.AttrType.FLOATS, "softmaxed variance weights"
            ),
            defs.OpSchema.Attribute(
                ATTR_RELU, helper.make_attribute(ATTR_RELU, 0), "1: apply ReLU to the output"
            ),
        ],
    )


def residual_input(node: gs.Node) -> Optional[gs.Tensor]:
    """The fused residual tensor of a SwitchableNorm node (an onnx-graphsurgeon Node), or None."""
    i = INPUT_RESIDUAL
    return node.inputs[i] if len(node.inputs) > i and node.inputs[i].name else None


def _infer(ctx) -> None:
    """Y has the type and shape of X."""
    ctx.set_output_type(0, ctx.get_input_type(0))


def register_schema() -> None:
    """Register the schema once per process so onnx.checker and shape inference accept the op."""
    if not defs.has(OP_TYPE, DOMAIN):
        schema = _schema()
        schema.set_type_and_shape_inference_function(_infer)
        defs.register_schema(schema)


def opset_import() -> onnx.OperatorSetIdProto:
    return onnx.helper.make_opsetid(DOMAIN, OPSET_VERSION)


register_schema()
