"""Adoption: SN layers that are not sn_deploy's own become sn_deploy layers, in place.

Most SN models were trained with the official classes (``SwitchNorm1d/2d/3d``,
``SyncSwitchableNorm2d``, Sparse SN's ``SSN2d``) or a user's copy of them.  A module is an SN
layer *by structure*, whatever its class is called: parameters ``weight``, ``bias``,
``mean_weight``, ``var_weight``, running statistics ``running_mean``/``running_var`` exactly when
it has a BN branch, ``mean_fixed``/``var_fixed``/``radius`` for Sparse SN, and no other state.
The rank (1d/2d/3d) comes from the shape of ``weight``, the branches from ``mean_weight``.

Each such module is replaced, under the same name, by the equivalent :mod:`sn_deploy.nn` layer
holding the very same Parameter and buffer objects (no copy), with the layer's own ``eps``,
``momentum`` and flags, so ``state_dict`` keys and values do not change and checkpoints load
before or after adoption.  The replacement computes the official maths on any device (the official
``SyncSwitchableNorm2d`` forward needs CUDA; one process's SyncSN is SN).  A module that looks
like SN but is inconsistent is refused with one line naming it and what is wrong: adopting it
would change what the model computes or which keys its checkpoints have.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from sn_deploy.errors import SnDeployError
from sn_deploy.nn import SparseSwitchNorm2d, SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, _SwitchNorm

#: the names that mark a module as SN-like (any one of them makes it a candidate)
SN_MARKERS = ("mean_weight", "var_weight")
AFFINE = ("weight", "bias")
RUNNING = ("running_mean", "running_var")
SPARSE = ("mean_fixed", "var_fixed", "radius")
_TARGETS = {2: SwitchNorm1d, 4: SwitchNorm2d, 5: SwitchNorm3d}


class AdoptionError(SnDeployError):
    """A module looks like an SN layer but cannot be adopted as one."""


@dataclass
class AdoptedLayer:
    path: str           # the module's qualified name in the model (unchanged by adoption)
    original: str       # the original class, ``module.QualName``
    adopted_as: str     # the sn_deploy class now in its place


@dataclass
class AdoptionSummary:
    """What :func:`adopt_sn_layers` did: the adopted layers and the sn_deploy layers found."""

    layers: list[AdoptedLayer] = field(default_factory=list)
    native: int = 0     # SN layers that already were sn_deploy layers

    @property
    def counts(self) -> dict[str, int]:
        """Adopted layers per original class name, in first-seen order."""
        return dict(Counter(layer.original.rsplit(".", 1)[-1] for layer in self.layers))

    def line(self) -> str:
        """The one line every command prints."""
        kinds = ", ".join(f"{n} {cls}" for cls, n in self.counts.items())
        own = f"; {self.native} sn_deploy SN layer{'s' * (self.native != 1)} as they are" \
            if self.native else ""
        if not self.layers:
            return f"adopted 0 SN layers{own or ' (the model has no SN layer)'}"
        return f"adopted {len(self.layers)} SN layer{'s' * (len(self.layers) != 1)} " \
               f"as sn_deploy layers ({kinds}){own}"

    def to_json(self) -> dict:
        return {"adopted": len(self.layers), "counts": self.counts, "native": self.native,
                "layers": [vars(layer) for layer in self.layers]}


def _qualname(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _own_state(module: nn.Module) -> tuple[dict, dict]:
    params = {k: v for k, v in module._parameters.items() if v is not None}
    buffers = {k: v for k, v in module._buffers.items() if v is not None}
    return params, buffers


def is_sn_like(module: nn.Module) -> bool:
    """A candidate for adoption: not an sn_deploy layer, and holds SN's mixing weights."""
    if isinstance(module, _SwitchNorm):
        return False
    params, buffers = _own_state(module)
    return any(k in params or k in buffers for k in SN_MARKERS)


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def _check(path: str, module: nn.Module) -> type:
    """The sn_deploy class to adopt ``module`` as; AdoptionError naming what is inconsistent."""
    where = f"SN-like module '{path or '<root>'}' ({type(module).__name__})"

    def refuse(problem: str) -> AdoptionError:
        return AdoptionError(f"{where} cannot be adopted: {problem}; fix the module or pass "
                             "--no-adopt (adopt=False) to export it as plain ops")

    params, buffers = _own_state(module)
    missing = [k for k in AFFINE + SN_MARKERS if k not in params]
    if missing:
        in_buffers = [k for k in missing if k in buffers]
        what = f"{', '.join(in_buffers)} {'is a buffer' if len(in_buffers) == 1 else 'are buffers'}" \
            f", not a parameter" if in_buffers else f"no parameter {', '.join(missing)}"
        raise refuse(what)
    if list(module.children()):
        raise refuse(f"it has submodules ({', '.join(n for n, _ in module.named_children())})")
    known = set(AFFINE + SN_MARKERS + RUNNING + SPARSE)
    extra = sorted(set(params) - known) + sorted(set(buffers) - known)
    if extra:
        raise refuse(f"it holds state sn_deploy's layer would drop ({', '.join(extra)})")
    weight, bias, mw, vw = (params[k] for k in AFFINE + SN_MARKERS)
    rank = weight.dim()
    if rank not in _TARGETS or weight.shape[0] != 1 or any(d != 1 for d in weight.shape[2:]):
        raise refuse(f"weight has shape {_shape(weight)}, expected 1xC (1d), 1xCx1x1 (2d) or "
                     "1xCx1x1x1 (3d)")
    c = int(weight.shape[1])
    if tuple(bias.shape) != tuple(weight.shape):
        raise refuse(f"bias has shape {_shape(bias)} but weight {_shape(weight)}")
    if mw.dim() != 1 or tuple(vw.shape) != tuple(mw.shape):
        raise refuse(f"mean_weight {_shape(mw)} and var_weight {_shape(vw)} must be two vectors "
                     "of the same length")
    branches = int(mw.shape[0])
    has_running = [k for k in RUNNING if k in buffers]
    sparse = [k for k in SPARSE if k in buffers or k in params]
    if rank == 2 and branches != 2:
        raise refuse(f"a 1d SN layer mixes 2 branches [LN, BN], this one has {branches} mixing "
                     "weights")
    if rank > 2 and branches not in (2, 3):
        raise refuse(f"unknown branch count {branches}: SN mixes 3 branches [IN, LN, BN] or 2 "
                     "[IN, LN] (using_bn=False)")
    using_bn = rank == 2 or branches == 3
    declared = getattr(module, "using_bn", None)
    if rank > 2 and declared is not None and bool(declared) != using_bn:
        raise refuse(f"using_bn={declared} but it has {branches} mixing weights")
    if using_bn and len(has_running) != 2:
        lacking = [k for k in RUNNING if k not in buffers]
        raise refuse(f"it has a BN branch but no buffer {', '.join(lacking)}")
    if not using_bn and has_running:
        raise refuse(f"it has {', '.join(has_running)} but no BN branch (2 mixing weights)")
    if using_bn:
        want = (1, c) if rank == 2 else (1, c, 1)
        for k in RUNNING:
            if tuple(buffers[k].shape) != want:
                raise refuse(f"{k} has shape {_shape(buffers[k])}, expected "
                             f"{'x'.join(map(str, want))} for {c} channels")
    num_features = getattr(module, "num_features", None)
    if isinstance(num_features, int) and num_features != c:
        raise refuse(f"num_features={num_features} but weight has {c} channels")
    eps = getattr(module, "eps", None)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (eps > 0 and math.isfinite(eps)):
        raise refuse(f"eps is {eps!r}, expected a positive number")
    if sparse:
        if len(sparse) != 3 or rank != 4 or branches != 3:
            lacking = [k for k in SPARSE if k not in sparse]
            raise refuse("Sparse SN needs buffers mean_fixed, var_fixed and radius on a 2d layer "
                         "with 3 branches" + (f" (no {', '.join(lacking)})" if lacking else ""))
        for k in SPARSE:
            if k not in buffers or buffers[k].numel() != 1:
                raise refuse(f"{k} must be a one-element buffer")
        return SparseSwitchNorm2d
    return _TARGETS[rank]


def _attr(module: nn.Module, name: str, default):
    value = getattr(module, name, default)
    return default if value is None else value


def _build(module: nn.Module, cls: type) -> _SwitchNorm:
    """The sn_deploy layer holding ``module``'s own Parameter and buffer objects."""
    params, buffers = _own_state(module)
    c = int(params["weight"].shape[1])
    defaults = cls(1)  # the class's own defaults (momentum differs between 1d/2d/3d/SSN)
    kwargs = dict(eps=float(module.eps), momentum=float(_attr(module, "momentum", defaults.momentum)),
                  using_moving_average=bool(_attr(module, "using_moving_average", True)),
                  last_gamma=bool(_attr(module, "last_gamma", False)))
    if cls in (SwitchNorm2d, SwitchNorm3d):
        kwargs["using_bn"] = params["mean_weight"].shape[0] == 3
    with torch.device("meta"):  # nothing allocated: every tensor is replaced below
        new = cls(c, **kwargs)
    new.eps = module.eps  # exactly the layer's own value and type
    for name in new._parameters:
        new._parameters[name] = params[name]
    for name in list(new._buffers):
        new._buffers[name] = buffers[name]
    new.train(module.training)
    return new


def adopt_sn_layers(model: nn.Module) -> tuple[nn.Module, AdoptionSummary]:
    """Replace every foreign SN layer of ``model`` in place; returns (model, summary).

    The model object is modified and returned; only when ``model`` itself is a foreign SN layer
    is the returned module a new one.  Nothing is changed when any layer is refused: every
    candidate is checked before the first replacement.
    """
    summary = AdoptionSummary()
    plan: list[tuple[str, nn.Module, type]] = []
    for path, module in model.named_modules():
        if isinstance(module, _SwitchNorm):
            summary.native += 1
        elif is_sn_like(module):
            plan.append((path, module, _check(path, module)))
    replaced: dict[int, nn.Module] = {}
    for path, module, cls in plan:
        replaced[id(module)] = _build(module, cls)
        summary.layers.append(AdoptedLayer(path, _qualname(module), cls.__name__))
    if not replaced:
        return model, summary
    if id(model) in replaced:
        return replaced[id(model)], summary
    # every place a replaced module sits (a module shared under two names is replaced in both)
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in replaced:
                parent._modules[name] = replaced[id(child)]
    return model, summary


def maybe_adopt(model: nn.Module, adopt: bool = True) -> tuple[nn.Module, Optional[AdoptionSummary]]:
    """:func:`adopt_sn_layers` unless adoption is turned off (``--no-adopt``): (model, None)."""
    return adopt_sn_layers(model) if adopt else (model, None)
