"""Which registered architecture a state_dict belongs to, from its key names and shapes alone.

Each architecture's signature (key → shape) is taken from a model built on the meta device (no
memory, no weights) once per process.  Architectures registered from one module form a family that
shares its top-level modules (``conv1``, ``sn1``, ``layer1``…, ``fc``); a state_dict is compared only
with the members of the families whose top-level names it has, so a face checkpoint never builds
the ImageNet ResNets.  The classifier's class count (``fc`` rows) is free: ``num_classes`` is read
from the checkpoint when the model is built.
"""
from __future__ import annotations

import re
from collections import defaultdict
from functools import lru_cache
from typing import Mapping, Sequence

import torch

from sn_deploy.errors import SnDeployError

Shape = tuple[int, ...]
Signature = Mapping[str, Shape]

#: keys whose first axis is the number of classes, read from the checkpoint at build time
CLASS_AXIS_KEYS = ("fc.weight", "fc.bias")


class ArchInferenceError(SnDeployError):
    """The state_dict matches no registered architecture, or several."""

    def __init__(self, problem: str, candidates: Sequence[str], ambiguous: bool):
        self.problem = problem
        self.candidates = list(candidates)
        self.ambiguous = ambiguous
        fix = ("pass --arch with one of them" if ambiguous else
               "pass --arch with a built-in name, or --arch package.module:factory for your "
               "own model")
        super().__init__(f"{problem}; {fix}")


def _registry() -> Mapping:
    from sn_deploy.models import ARCHITECTURES  # late: this module is imported by the registry

    return ARCHITECTURES


@lru_cache(maxsize=None)
def signature(arch: str) -> Signature:
    """Key → shape of a registered architecture's state_dict (built on the meta device, cached)."""
    with torch.device("meta"):
        model = _registry()[arch]()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _top_names(keys) -> frozenset[str]:
    return frozenset(k.split(".", 1)[0] for k in keys)


@lru_cache(maxsize=None)
def _families() -> dict[str, tuple[str, ...]]:
    """Registered names grouped by the module their factory lives in."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name, factory in _registry().items():
        groups[getattr(factory, "__module__", name)].append(name)
    return {fam: tuple(names) for fam, names in groups.items()}


@lru_cache(maxsize=None)
def _family_top_names(family: str) -> frozenset[str]:
    return _top_names(signature(_families()[family][0]))


def _differences(sd_shapes: Signature, sig: Signature) -> int:
    """How many keys are missing, unexpected or of another shape (class axis free)."""
    diff = len(sd_shapes.keys() ^ sig.keys())
    for key in sd_shapes.keys() & sig.keys():
        a, b = sd_shapes[key], sig[key]
        if key in CLASS_AXIS_KEYS and len(a) == len(b) and a[1:] == b[1:]:
            continue
        diff += a != b
    return diff


def _shapes(state_dict: Mapping[str, torch.Tensor]) -> Signature:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def _ranked(state_dict: Mapping[str, torch.Tensor]) -> list[tuple[int, str]]:
    """(differences, name) for the members of every family whose top-level names fit, best first."""
    shapes = _shapes(state_dict)
    top = _top_names(shapes)
    names = [n for fam, members in _families().items() if _family_top_names(fam) == top
             for n in members]
    return sorted((_differences(shapes, signature(n)), n) for n in names)


def matching_architectures(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Every registered architecture whose keys and shapes the state_dict has exactly."""
    return [name for diff, name in _ranked(state_dict) if diff == 0]


def infer_architecture(state_dict: Mapping[str, torch.Tensor], source: str = "the checkpoint") -> str:
    """The one registered architecture the state_dict fits; ArchInferenceError for none or several."""
    ranked = _ranked(state_dict)
    exact = [name for diff, name in ranked if diff == 0]
    if len(exact) == 1:
        return exact[0]
    if exact:
        raise ArchInferenceError(
            f"the keys and shapes of {source} match several built-in architectures "
            f"({', '.join(exact)})", exact, ambiguous=True)
    if ranked:
        closest = [f"{name} ({diff} key{'s differ' if diff != 1 else ' differs'})"
                   for diff, name in ranked[:3]]
        detail = f"closest: {', '.join(closest)}"
        candidates = [name for _, name in ranked[:3]]
    else:
        candidates = _closest_families(_top_names(state_dict))
        top = sorted(_top_names(state_dict))
        shown = ", ".join(top[:6]) + (f" (+{len(top) - 6} more)" if len(top) > 6 else "")
        detail = (f"its top-level modules {shown or '(none)'} are those of none of "
                  f"{', '.join(candidates)}")
    raise ArchInferenceError(
        f"the keys and shapes of {source} match no built-in architecture ({detail})",
        candidates, ambiguous=False)


def _closest_families(top: frozenset[str]) -> list[str]:
    """Families labelled like 'resnetv1sn18/34/50', those sharing most top-level names first."""
    def overlap(fam: str) -> float:
        other = _family_top_names(fam)
        return len(top & other) / max(len(top | other), 1)

    return [_family_label(_families()[fam]) for fam in sorted(_families(), key=overlap, reverse=True)]


def _family_label(names: Sequence[str]) -> str:
    """'resnetv1sn18/34/50/101/152' for names that differ only by their depth."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name in names:
        m = re.fullmatch(r"(.*\D)(\d+)(\D*)", name)
        stem, depth = ((m.group(1), m.group(3)), m.group(2)) if m else ((name, ""), "")
        groups.setdefault(stem, []).append(depth)
    return ", ".join(f"{head}{'/'.join(depths)}{tail}" for (head, tail), depths in groups.items())


def clear_cache() -> None:
    """Forget the cached signatures and families (after the registry has changed)."""
    for cached in (signature, _families, _family_top_names):
        cached.cache_clear()
