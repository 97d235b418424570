"""Safe, strict checkpoint loading, and saving calibrated weights back in the same layout.

``torch.load(weights_only=True)`` by default: a checkpoint is data, and unpickling arbitrary
objects runs code.  A pickled whole ``nn.Module`` loads only with ``trust_pickle=True``.
Matching is strict (the official loader's ``strict=False`` silently loads half a model).
Without an architecture, the one registered architecture whose keys and shapes the checkpoint has
is used (:mod:`sn_deploy.models.infer`).  A training wrapper's extra parts (the official face
models' ``ArcFaceWithLoss``: ``basemodel.*`` backbone, ``head.*`` classifier) are set aside: the
backbone is deployed, the other keys are reported as dropped and written back unchanged.
"""
from __future__ import annotations

import copy
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from sn_deploy.adopt import AdoptionSummary, maybe_adopt
from sn_deploy.atomic import atomic_path
from sn_deploy.errors import SnDeployError
from sn_deploy.models import ARCHITECTURES, UnknownArchError, build_model
from sn_deploy.models.infer import infer_architecture, matching_architectures

DDP_PREFIX = "module."
WRAPPER_KEYS = ("state_dict", "model")
#: the official face models' training wrapper (ArcFaceWithLoss): backbone, and what is not deployed
BACKBONE_PREFIX = "basemodel."
TRAINING_ONLY_PREFIXES = ("head.",)


def _numpy_scalar_globals() -> list:
    """numpy scalars (e.g. ``best_prec1``) are plain data; allow them under weights_only.

    Only scalars and their dtypes: ndarray reconstruction stays refused.
    """
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    dtype_classes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return [scalar, np.dtype, *dtype_classes]


class CheckpointError(SnDeployError):
    """The checkpoint cannot be read or does not fit the architecture."""


@dataclass
class LoadedCheckpoint:
    """A model with its weights, plus what is needed to write the weights back the same way."""

    model: nn.Module
    container: Any           # the object torch.load returned
    wrapper_key: Optional[str]  # 'state_dict' / 'model' / None for a bare state_dict
    prefixed: bool           # keys carried the DDP 'module.' prefix
    path: Path
    arch: Optional[str] = None    # the registered architecture whose layout the model has
    arch_source: str = "given"    # 'given', 'inferred' (from keys and shapes), 'pickled' module
    backbone_prefix: str = ""     # 'basemodel.' when the model is a training wrapper's backbone
    dropped: dict = field(default_factory=dict)  # keys outside the backbone, kept for writing back

    def dropped_note(self) -> Optional[str]:
        """One line naming the keys that were set aside, or None."""
        if not self.dropped:
            return None
        keys = list(self.dropped)
        shown = ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
        return (f"dropped {len(keys)} key{'s' if len(keys) != 1 else ''} outside the backbone "
                f"'{self.backbone_prefix.rstrip('.')}' (training only, not deployed): {shown}")

    def notes(self) -> list[str]:
        """What was inferred rather than given, one line each, for the user to check."""
        lines = []
        if self.arch_source == "inferred":
            lines.append(f"arch: {self.arch}, inferred from the keys and shapes of "
                         f"'{self.path.name}' (--arch to choose another)")
        elif self.arch_source == "pickled":
            what = f" (the layout of {self.arch})" if self.arch else ""
            lines.append(f"arch: the pickled {type(self.model).__name__} module of "
                         f"'{self.path.name}'{what}")
        if self.adoption is not None:
            lines.append(self.adoption.line())
        if self.dropped:
            lines.append(self.dropped_note())
        return lines
    adoption: Optional[AdoptionSummary] = None  # foreign SN layers adopted (None: adoption off)


def check_checkpoint_path(path) -> Path:
    """The path of an existing checkpoint file (before anything is created beside it)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' is a folder; give the checkpoint file (.pth)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found; check the path")
    return path


def _read(path: Path, trust_pickle: bool) -> Any:
    check_checkpoint_path(path)
    try:
        if trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if not trust_pickle and found:
            raise CheckpointError(
                f"'{path}' holds pickled Python objects ({found.group(1)}; e.g. a whole nn.Module) "
                "that could run code when loaded; re-save it as a state_dict, or pass "
                "--trust-pickle if you trust its source"
            ) from None
        raise CheckpointError(f"'{path}' is not a readable PyTorch checkpoint (unpickling failed)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, AttributeError,
            ImportError, ModuleNotFoundError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"'{path}' is not a readable PyTorch checkpoint ({first})") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unwrap(obj: Any) -> tuple[dict, Optional[str]]:
    if _is_state_dict(obj):
        return obj, None
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                return inner.state_dict(), key
            if _is_state_dict(inner):
                return inner, key
    keys = ", ".join(map(str, list(obj)[:6])) if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(
        f"no state_dict found (top level: {keys}); expected a state_dict or a dict with a "
        "'state_dict' or 'model' entry"
    )


def _strip_prefix(sd: dict) -> tuple[dict, bool]:
    if sd and all(k.startswith(DDP_PREFIX) for k in sd):
        return OrderedDict((k[len(DDP_PREFIX):], v) for k, v in sd.items()), True
    return sd, False


def split_training_wrapper(sd: dict) -> tuple[dict, str, dict]:
    """``(backbone state_dict, backbone prefix, dropped keys)`` of an ``ArcFaceWithLoss`` layout
    (every key under ``basemodel.`` or ``head.``); any other state_dict is returned as it is."""
    outside = [k for k in sd if not k.startswith(BACKBONE_PREFIX)]
    if len(outside) == len(sd) or not all(k.startswith(TRAINING_ONLY_PREFIXES) for k in outside):
        return sd, "", {}
    backbone = OrderedDict((k[len(BACKBONE_PREFIX):], v) for k, v in sd.items()
                           if k.startswith(BACKBONE_PREFIX))
    return backbone, BACKBONE_PREFIX, OrderedDict((k, sd[k]) for k in outside)


def _arch_kwargs(arch: str, sd: dict) -> dict:
    """Infer num_classes from the classifier for registered architectures (10-class digits...)."""
    fc = sd.get("fc.weight")
    if arch in ARCHITECTURES and fc is not None and fc.dim() == 2:
        return {"num_classes": int(fc.shape[0])}
    return {}


def _mismatch_message(model: nn.Module, sd: dict, arch: str) -> Optional[str]:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        return None
    show = lambda xs: ", ".join(xs[:5]) + (f" (+{len(xs) - 5} more)" if len(xs) > 5 else "")  # noqa: E731
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {show(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {show(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches: {show(shapes)}")
    hint = "wrong --arch?"
    if shapes and not (missing or unexpected):
        hint = "same keys, other sizes: another variant of --arch, or a different num_classes?"
    prefixes = {k.split(".", 1)[0] for k in unexpected}
    if len(prefixes) == 1 and missing and all(k.split(".", 1)[-1] in own for k in unexpected):
        hint = f"keys carry an extra '{prefixes.pop()}.' prefix?"
    return f"checkpoint does not match --arch {arch}: {'; '.join(parts)} ({hint})"


def load_checkpoint(path, arch: Optional[str] = None, trust_pickle: bool = False,
                    arch_kwargs: Optional[dict] = None, adopt: bool = True) -> LoadedCheckpoint:
    """Load ``path`` into a fresh ``arch`` model, strictly; the model is returned in eval mode.

    ``arch=None``: the one registered architecture the checkpoint's keys and shapes fit
    (:class:`~sn_deploy.models.infer.ArchInferenceError` for none or several), or, for a pickled
    nn.Module (only with ``trust_pickle``), that module itself.  With ``arch``, a pickled module is
    treated like its state_dict, so it too must match; ``num_classes`` is read from ``fc.weight``
    for registered architectures.

    ``adopt``: foreign SN layers of the model (official classes, users' copies) become
    sn_deploy layers first (:mod:`sn_deploy.adopt`; same names and keys, so matching is unchanged).
    """
    path = Path(path)
    container = _read(path, trust_pickle)
    if isinstance(container, nn.Module):
        if not trust_pickle:  # torch refuses this with weights_only=True; kept for clarity
            raise CheckpointError(f"'{path}' is a pickled nn.Module; pass --trust-pickle")
        raw, wrapper_key = container.state_dict(), None
    else:
        raw, wrapper_key = _unwrap(container)
    sd, prefixed = _strip_prefix(raw)
    if arch is None and isinstance(container, nn.Module):
        return _loaded_module(container, sd, prefixed, path, adopt)
    if arch is None:
        sd, backbone_prefix, dropped = split_training_wrapper(sd)
        arch, source = infer_architecture(sd, f"'{path.name}'"), "inferred"
    else:
        backbone_prefix, dropped, source = "", {}, "given"
    try:
        model = build_model(arch, **{**_arch_kwargs(arch, sd), **(arch_kwargs or {})})
    except UnknownArchError as exc:
        raise CheckpointError(str(exc)) from None
    except TypeError as exc:  # a factory that does not take the given keyword arguments
        raise CheckpointError(f"cannot build --arch {arch} ({exc})") from None
    if source == "given" and not any(k.startswith(BACKBONE_PREFIX) for k in model.state_dict()):
        sd, backbone_prefix, dropped = split_training_wrapper(sd)
    model, adoption = maybe_adopt(model, adopt)
    problem = _mismatch_message(model, sd, arch)
    if problem:
        raise CheckpointError(problem)
    model.load_state_dict(sd, strict=True)
    return LoadedCheckpoint(model.eval(), container, wrapper_key, prefixed, path,
                            arch=arch, arch_source=source, backbone_prefix=backbone_prefix,
                            dropped=dropped, adoption=adoption)


def _loaded_module(container: nn.Module, sd: dict, prefixed: bool, path: Path,
                   adopt: bool) -> LoadedCheckpoint:
    """A trusted pickled module used as it is: its ``.module`` under a DataParallel/DDP wrapper,
    its backbone under a training wrapper.  Its layout is matched only to name it in reports."""
    model = container
    if prefixed and isinstance(getattr(container, "module", None), nn.Module):
        model = container.module
    else:
        prefixed = False
    backbone_sd, backbone_prefix, dropped = split_training_wrapper(sd)
    backbone = getattr(model, BACKBONE_PREFIX.rstrip("."), None) if backbone_prefix else None
    if isinstance(backbone, nn.Module):
        model = backbone
    else:
        backbone_sd, backbone_prefix, dropped = sd, "", {}
    matches = matching_architectures(backbone_sd)
    model, adoption = maybe_adopt(model, adopt)
    return LoadedCheckpoint(model.eval(), container, None, prefixed, path,
                            arch=matches[0] if len(matches) == 1 else None, arch_source="pickled",
                            backbone_prefix=backbone_prefix, dropped=dropped, adoption=adoption)


def _with_weights(module: nn.Module, sd: dict) -> nn.Module:
    """A copy of a pickled module carrying new weights (the input object stays as loaded)."""
    out = copy.deepcopy(module)
    out.load_state_dict(sd, strict=True)
    return out


def save_checkpoint_like(loaded: LoadedCheckpoint, model: nn.Module, path) -> Path:
    """Write ``model``'s weights in the input's layout (wrapping dict, other keys, prefix kept).

    Atomic: a temp file beside ``path`` renamed over it, removed if anything fails.
    """
    path = Path(path)
    sd = model.state_dict()
    if loaded.backbone_prefix:
        sd = OrderedDict([*((loaded.backbone_prefix + k, v) for k, v in sd.items()),
                          *loaded.dropped.items()])
    if loaded.prefixed:
        sd = OrderedDict((DDP_PREFIX + k, v) for k, v in sd.items())
    container = loaded.container
    if isinstance(container, nn.Module):
        payload: Any = _with_weights(container, sd)
    elif loaded.wrapper_key is None:
        payload = sd
    else:
        payload = dict(container)
        inner = container[loaded.wrapper_key]
        payload[loaded.wrapper_key] = _with_weights(inner, sd) if isinstance(inner, nn.Module) else sd
    if not path.parent.is_dir():
        raise CheckpointError(f"output folder '{path.parent}' does not exist; create it first")
    # through a Python file: torch's own path writer reports a full disk as a RuntimeError
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)
    return path
