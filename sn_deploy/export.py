"""PyTorch → ``model.sn.onnx``: every SwitchNorm layer becomes one ``sn_deploy::SwitchableNorm`` node.

During export each SN layer's eval forward is swapped for the custom op
``torch.ops.sn_deploy.switchable_norm`` (the mixing weights already softmaxed, so they become
float attributes), and the dynamo exporter translates that op with an onnxscript function.  A
graph pass then gives every SN node its layer's name, per-layer named float32 (C,) parameters and
a metadata entry with the PyTorch module name, which per-layer validation relies on.
"""
from __future__ import annotations

import ast
import contextlib
import logging
import os
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxscript
import torch
import torch.nn as nn
from onnxscript import FLOAT

from sn_deploy import onnx_ops
from sn_deploy.atomic import atomic_write
from sn_deploy.errors import InputError
from sn_deploy.nn import (
    DegenerateInputError,
    _SwitchNorm,
    switch_norm_layers,
    switchable_norm_1d,
    switchable_norm_spatial,
)

DEFAULT_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "output"


# --------------------------------------------------------------------------- the custom op
@torch.library.custom_op("sn_deploy::switchable_norm", mutates_args=())
def switchable_norm_op(
    x: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    mean_weights: list[float],
    var_weights: list[float],
    eps: float,
) -> torch.Tensor:
    """Eval-mode SN with softmaxed weights given as floats (the op the exporter sees)."""
    mw = torch.tensor(mean_weights, dtype=x.dtype)
    vw = torch.tensor(var_weights, dtype=x.dtype)
    if x.dim() == 2:
        return switchable_norm_1d(x, scale, bias, mw, vw, running_mean, running_var, eps)
    return switchable_norm_spatial(x, scale, bias, mw, vw, running_mean, running_var, eps)


@switchable_norm_op.register_fake
def _(x, scale, bias, running_mean, running_var, mean_weights, var_weights, eps):
    return torch.empty_like(x)


_SN = onnxscript.values.Opset(onnx_ops.DOMAIN, onnx_ops.OPSET_VERSION)


@onnxscript.script(_SN)
def _sn_onnx(
    x: FLOAT,
    scale: FLOAT,
    bias: FLOAT,
    running_mean: FLOAT,
    running_var: FLOAT,
    mean_weights: list[float],
    var_weights: list[float],
    eps: float,
) -> FLOAT:
    return _SN.SwitchableNorm(
        x, scale, bias, running_mean, running_var,
        epsilon=eps, mean_weights=mean_weights, var_weights=var_weights,
    )


def _export_forward(self: _SwitchNorm, x: torch.Tensor) -> torch.Tensor:
    mean_w, var_w = self._export_mixing_weights
    rm = self.running_mean.reshape(-1) if self.using_bn else None
    rv = self.running_var.reshape(-1) if self.using_bn else None
    return switchable_norm_op(
        x, self.weight.reshape(-1), self.bias.reshape(-1), rm, rv, mean_w, var_w, float(self.eps)
    )


@contextlib.contextmanager
def _sn_as_custom_op(model: nn.Module) -> Iterator[None]:
    """Temporarily route every SN layer's forward through the custom op."""
    layers = [m for _, m in switch_norm_layers(model)]
    for m in layers:
        # softmaxed eagerly: inside the trace .tolist() would turn into symbolic floats
        with torch.no_grad():
            m._export_mixing_weights = tuple(w.double().tolist() for w in m.mixing_weights())
        m.forward = types.MethodType(_export_forward, m)
    try:
        yield
    finally:
        for m in layers:
            del m.forward
            del m._export_mixing_weights


# --------------------------------------------------------------------------- shapes
def parse_shape(text: str) -> tuple[int, ...]:
    """``1x3x224x224`` → (1, 3, 224, 224), with a clear error for anything else."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) < 2 or any(d <= 0 for d in dims):
        raise InputError(
            f"invalid shape '{text}': write positive dims separated by 'x', e.g. 1x3x224x224"
        )
    return dims


@dataclass
class LayerShape:
    name: str
    input_shape: tuple[int, ...]


def probe_layer_shapes(model: nn.Module, input_shape: Sequence[int]) -> list[LayerShape]:
    """Run one eager forward to learn every SN layer's input shape, refusing degenerate ones."""
    seen: list[LayerShape] = []
    hooks = []
    for name, layer in switch_norm_layers(model):
        def pre(mod, args, name=name):
            seen.append(LayerShape(name, tuple(args[0].shape)))
        hooks.append(layer.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            model(torch.zeros(tuple(input_shape)))
    except DegenerateInputError:
        last = seen[-1]
        raise InputError(
            f"SN layer '{last.name}' sees input {last.input_shape} at --input-shape "
            f"{'x'.join(map(str, input_shape))}: one spatial element per plane makes the unbiased "
            "instance variance NaN; export with a larger input shape"
        ) from None
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"the model does not accept input shape {'x'.join(map(str, input_shape))} ({first}); "
            "check --input-shape"
        ) from None
    finally:
        for h in hooks:
            h.remove()
    return seen


# --------------------------------------------------------------------------- export
def _dynamic_shapes(rank: int, dynamic_batch: bool, dynamic_spatial: bool):
    dims: dict[int, object] = {}
    if dynamic_batch:
        dims[0] = torch.export.Dim("batch", min=1, max=4096)
    if dynamic_spatial:
        for axis in range(2, rank):
            dims[axis] = torch.export.Dim.DYNAMIC
    return (dims,) if dims else None


def _example_shape(shape: tuple[int, ...], dynamic_batch: bool) -> tuple[int, ...]:
    # torch.export specialises dims whose example value is 1; trace a dynamic batch with 2.
    return (max(shape[0], 2),) + shape[1:] if dynamic_batch else shape


def _down_convert(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """The dynamo exporter writes opset 18+; older targets go through onnx's version converter.

    The converter leaves ``noop_with_empty_axes`` on Reduce* nodes, an attribute that only exists
    from opset 18: with its default value 0 the older ops behave the same, so it is dropped.
    """
    from onnx import version_converter

    out = version_converter.convert_version(model, opset)
    for node in out.graph.node:
        if node.op_type.startswith("Reduce"):
            keep = [a for a in node.attribute
                    if not (a.name == "noop_with_empty_axes" and a.i == 0)]
            del node.attribute[:]
            node.attribute.extend(keep)
    return out


def _torch_export(model: nn.Module, shape, dynamic_batch, dynamic_spatial, opset) -> onnx.ModelProto:
    example = torch.randn(_example_shape(shape, dynamic_batch))
    with _sn_as_custom_op(model), warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=max(opset, DEFAULT_OPSET),
            input_names=[INPUT_NAME],
            dynamic_shapes=_dynamic_shapes(len(shape), dynamic_batch, dynamic_spatial),
            custom_translation_table={torch.ops.sn_deploy.switchable_norm.default: _sn_onnx},
            verbose=False,
            report=False,
        )
    return program.model_proto


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter prints progress lines and warnings; users get our own output instead."""
    names = ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch.export",
             "torch._dynamo", "onnxscript", "torch.fx.experimental")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        try:
            yield
        finally:
            for lg, lv in zip(loggers, levels):
                lg.setLevel(lv)


NameScopes = dict[str, list[str]]


def name_scopes(model: onnx.ModelProto) -> NameScopes:
    """Node name → the exporter's module name scopes (metadata that onnx-graphsurgeon drops)."""
    scopes: NameScopes = {}
    for node in model.graph.node:
        for prop in node.metadata_props:
            if prop.key == "pkg.torch.onnx.name_scopes":
                with contextlib.suppress(ValueError, SyntaxError):
                    scopes[node.name] = [str(s) for s in ast.literal_eval(prop.value)]
    return scopes


def _layer_name_of(node: gs.Node, known: set[str], scopes: NameScopes) -> Optional[str]:
    for scope in reversed(scopes.get(node.name, [])):
        if scope in known:
            return scope
    return None


def name_sn_nodes(graph: gs.Graph, model: nn.Module, call_order: Sequence[str],
                  scopes: Optional[NameScopes] = None) -> gs.Graph:
    """Give each SN node its layer's name, named float32 parameters and layer metadata.

    Nodes are matched to layers through the exporter's name-scope metadata, falling back to the
    forward call order (the graph keeps it).
    """
    layers = dict(switch_norm_layers(model))
    sn_nodes = [n for n in graph.nodes if n.op == onnx_ops.OP_TYPE and n.domain == onnx_ops.DOMAIN]
    if len(sn_nodes) != len(call_order):
        raise InputError(
            f"the exported graph has {len(sn_nodes)} SwitchableNorm nodes but the model called "
            f"{len(call_order)} SN layers; SN layers called more than once are not supported"
        )
    used: set[str] = set()
    for node, fallback in zip(sn_nodes, call_order):
        name = _layer_name_of(node, set(layers), scopes or {}) or fallback
        if name in used:
            name = fallback
        used.add(name)
        layer = layers[name]
        node.name = name
        consts = [
            gs.Constant(f"{name}.{k}", np.ascontiguousarray(
                getattr(layer, k).detach().float().reshape(-1).numpy()))
            for k in ("weight", "bias", "running_mean", "running_var")
            if getattr(layer, k) is not None
        ]
        node.inputs = [node.inputs[0], *consts]
        node.outputs[0].name = f"{name}.output"
        node.attrs[onnx_ops.ATTR_RELU] = 0
        node.attrs = {k: node.attrs[k] for k in sorted(node.attrs)}
    graph.cleanup().toposort()
    return graph


def name_norm_outputs(graph: gs.Graph, model: nn.Module, scopes: NameScopes) -> gs.Graph:
    """Name the output of each BN/GN/IN/LN layer ``<layer>.output`` so that per-layer validation
    covers them like SN layers.

    The exporter lowers such a layer to one or more standard nodes (GroupNorm: Reshape,
    InstanceNormalization, Reshape, Mul, Add) tagged with the module's name scope; the last of
    them produces the layer's output.  A layer whose output is a graph output keeps that name.
    """
    from sn_deploy.nn import STANDARD_NORM_TYPES

    norms = {n for n, m in model.named_modules() if isinstance(m, STANDARD_NORM_TYPES)}
    last: dict[str, gs.Node] = {}
    for node in graph.nodes:
        name = _layer_name_of(node, norms, scopes)
        if name is not None:
            last[name] = node
    graph_outputs = {id(t) for t in graph.outputs}
    for name, node in last.items():
        out = node.outputs[0]
        if id(out) not in graph_outputs:
            out.name = f"{name}.output"
    return graph


def _set_metadata(model: onnx.ModelProto) -> None:
    """SN nodes carry their layer name; other nodes keep only the exporter's module namespace."""
    for node in model.graph.node:
        if node.op_type == onnx_ops.OP_TYPE and node.domain == onnx_ops.DOMAIN:
            del node.metadata_props[:]
            entry = node.metadata_props.add()
            entry.key, entry.value = onnx_ops.LAYER_NAME_KEY, node.name
        else:
            keep = [(p.key, p.value) for p in node.metadata_props if p.key == "namespace"]
            del node.metadata_props[:]
            for k, v in keep:
                e = node.metadata_props.add()
                e.key, e.value = k, v


def _rename_outputs(graph: gs.Graph) -> None:
    outs = graph.outputs
    for i, t in enumerate(outs):
        t.name = OUTPUT_NAME if len(outs) == 1 else f"{OUTPUT_NAME}_{i}"


def export_sn_onnx(
    model: nn.Module,
    input_shape: Sequence[int],
    dynamic_batch: bool = False,
    dynamic_spatial: bool = False,
    opset: int = DEFAULT_OPSET,
) -> onnx.ModelProto:
    """Export an eval-mode model with one ``sn_deploy::SwitchableNorm`` node per SN layer."""
    if opset < 17:
        raise InputError(f"--opset {opset} is too old: use 17 or newer")
    shape = tuple(int(d) for d in input_shape)
    model = model.eval()
    probed = probe_layer_shapes(model, shape)
    call_order = [p.name for p in probed]
    proto = _torch_export(model, shape, dynamic_batch, dynamic_spatial, opset)
    scopes = name_scopes(proto)  # before the version converter, which drops node metadata
    if opset < DEFAULT_OPSET:
        proto = _down_convert(proto, opset)
    graph = gs.import_onnx(proto)
    graph = name_sn_nodes(graph, model, call_order, scopes)
    graph = name_norm_outputs(graph, model, scopes)
    _rename_outputs(graph)
    out = gs.export_onnx(graph)
    if not any(o.domain == onnx_ops.DOMAIN for o in out.opset_import):
        out.opset_import.append(onnx_ops.opset_import())
    _set_metadata(out)
    out.producer_name = "sn_deploy"
    out.ir_version = proto.ir_version
    onnx.checker.check_model(out)
    return onnx.shape_inference.infer_shapes(out)


def save_model_atomic(model: onnx.ModelProto, path: os.PathLike | str) -> Path:
    """Write an ONNX model via a temp file and a rename: never half-written."""
    return atomic_write(path, model.SerializeToString())
