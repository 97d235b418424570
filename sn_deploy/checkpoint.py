"""Safe, strict checkpoint loading, and saving calibrated weights back in the same layout.

``torch.load(weights_only=True)`` by default: a checkpoint is data, and unpickling arbitrary
objects runs code.  A pickled whole ``nn.Module`` loads only with ``trust_pickle=True``.
Matching is strict (the official loader's ``strict=False`` silently loads half a model).
"""
from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from sn_deploy.atomic import atomic_path
from sn_deploy.errors import SnDeployError
from sn_deploy.models import ARCHITECTURES, UnknownArchError, build_model

DDP_PREFIX = "module."
WRAPPER_KEYS = ("state_dict", "model")


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


def _read(path: Path, trust_pickle: bool) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        if not trust_pickle and "Unsupported global" in str(exc):
            raise CheckpointError(
                f"'{path}' holds pickled Python objects (e.g. a whole nn.Module), which can run "
                "code when loaded; re-save it as a state_dict, or pass --trust-pickle if you trust "
                "its source"
            ) from None
        raise CheckpointError(f"'{path}' is not a readable PyTorch checkpoint (unpickling failed)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
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
    prefixes = {k.split(".", 1)[0] for k in unexpected}
    if len(prefixes) == 1 and missing and all(k.split(".", 1)[-1] in own for k in unexpected):
        hint = f"keys carry an extra '{prefixes.pop()}.' prefix?"
    return f"checkpoint does not match --arch {arch}: {'; '.join(parts)} ({hint})"


def load_checkpoint(path, arch: str, trust_pickle: bool = False,
                    arch_kwargs: Optional[dict] = None) -> LoadedCheckpoint:
    """Load ``path`` into a fresh ``arch`` model, strictly; the model is returned in eval mode."""
    path = Path(path)
    container = _read(path, trust_pickle)
    if isinstance(container, nn.Module):
        if not trust_pickle:  # torch refuses this with weights_only=True; kept for clarity
            raise CheckpointError(f"'{path}' is a pickled nn.Module; pass --trust-pickle")
        return LoadedCheckpoint(container.eval(), container, None, False, path)
    raw, wrapper_key = _unwrap(container)
    sd, prefixed = _strip_prefix(raw)
    try:
        model = build_model(arch, **{**_arch_kwargs(arch, sd), **(arch_kwargs or {})})
    except UnknownArchError as exc:
        raise CheckpointError(str(exc)) from None
    problem = _mismatch_message(model, sd, arch)
    if problem:
        raise CheckpointError(problem)
    model.load_state_dict(sd, strict=True)
    return LoadedCheckpoint(model.eval(), container, wrapper_key, prefixed, path)


def save_checkpoint_like(loaded: LoadedCheckpoint, model: nn.Module, path) -> Path:
    """Write ``model``'s weights in the input's layout (wrapping dict, other keys, prefix kept)."""
    path = Path(path)
    if isinstance(loaded.container, nn.Module):
        payload: Any = model
    else:
        sd = model.state_dict()
        if loaded.prefixed:
            sd = OrderedDict((DDP_PREFIX + k, v) for k, v in sd.items())
        if loaded.wrapper_key is None:
            payload = sd
        else:
            payload = dict(loaded.container)
            payload[loaded.wrapper_key] = sd
    if not path.parent.is_dir():
        raise CheckpointError(f"output folder '{path.parent}' does not exist; create it first")
    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    except OSError as exc:
        raise CheckpointError(f"cannot write '{path}' ({exc.strerror or exc}); "
                              "choose a writable --output") from None
    return path
