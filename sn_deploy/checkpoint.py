"""Safe, strict checkpoint loading, and saving calibrated weights back in the same layout.

``torch.load(weights_only=True)`` by default: a checkpoint is data, and unpickling arbitrary
objects runs code.  A pickled whole ``nn.Module`` loads only with ``trust_pickle=True``.
Matching is strict (the official loader's ``strict=False`` silently loads half a model).
"""
from __future__ import annotations

import copy
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from sn_deploy.adopt import AdoptionSummary, maybe_adopt
from sn_deploy.atomic import atomic_path
from sn_deploy.errors import SnDeployError
from sn_deploy.models import ARCHITECTURES, UnknownArchError, build_model

DDP_PREFIX = "module."
WRAPPER_KEYS = ("state_dict", "model")


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
    adoption: Optional[AdoptionSummary] = None  # foreign SN layers adopted (None: adoption off)


def _read(path: Path, trust_pickle: bool) -> Any:
    if path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' is a folder; give the checkpoint file (.pth)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found; check the path")
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


def load_checkpoint(path, arch: str, trust_pickle: bool = False,
                    arch_kwargs: Optional[dict] = None, adopt: bool = True) -> LoadedCheckpoint:
    """Load ``path`` into a fresh ``arch`` model, strictly; the model is returned in eval mode.

    ``adopt``: foreign SN layers of the built model (official classes, users' copies) become
    sn_deploy layers first (:mod:`sn_deploy.adopt`; same names and keys, so matching is unchanged).

    A pickled nn.Module (only with ``trust_pickle``) is treated like its state_dict, so it too must
    match ``arch``; ``num_classes`` is read from ``fc.weight`` for registered architectures.
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
    try:
        model = build_model(arch, **{**_arch_kwargs(arch, sd), **(arch_kwargs or {})})
    except UnknownArchError as exc:
        raise CheckpointError(str(exc)) from None
    except TypeError as exc:  # a factory that does not take the given keyword arguments
        raise CheckpointError(f"cannot build --arch {arch} ({exc})") from None
    model, adoption = maybe_adopt(model, adopt)
    problem = _mismatch_message(model, sd, arch)
    if problem:
        raise CheckpointError(problem)
    model.load_state_dict(sd, strict=True)
    return LoadedCheckpoint(model.eval(), container, wrapper_key, prefixed, path, adoption)


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
    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    except OSError as exc:
        raise CheckpointError(f"cannot write '{path}' ({exc.strerror or exc}); "
                              "choose a writable --output") from None
    return path
