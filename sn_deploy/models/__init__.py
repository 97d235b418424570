"""Architecture registry: ``--arch NAME`` or ``--arch package.module:factory``."""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch.nn as nn

from sn_deploy.models import demo, face_resnet, resnet_v1_sn, resnet_v1_ssn, resnet_v2_sn


class UnknownArchError(ValueError):
    """The ``--arch`` value names no registered architecture and no importable factory."""


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "demo_sn_net": demo.demo_sn_net,
    **{f"resnetv1sn{d}": getattr(resnet_v1_sn, f"resnetv1sn{d}") for d in (18, 34, 50, 101, 152)},
    **{f"resnetv2sn{d}": getattr(resnet_v2_sn, f"resnetv2sn{d}") for d in (18, 34, 50, 101, 152)},
    **{f"resnetv1ssn{d}": getattr(resnet_v1_ssn, f"resnetv1ssn{d}") for d in (18, 34, 50, 101, 152)},
    **face_resnet.FACTORIES,
}

#: each registered architecture's native input (C, H, W): what it was trained on
NATIVE_INPUT_SIZES: dict[str, tuple[int, int, int]] = {
    name: (1, 8, 8) if name == "demo_sn_net"
    else face_resnet.INPUT_SIZE if name in face_resnet.FACTORIES
    else (3, 224, 224)
    for name in ARCHITECTURES
}


def native_input_shape(arch: str, batch: int = 1) -> Optional[tuple[int, ...]]:
    """(batch, C, H, W) a registered architecture takes natively; None for a user factory."""
    size = NATIVE_INPUT_SIZES.get(arch)
    return None if size is None else (batch, *size)


def resolve_factory(arch: str) -> Callable[..., nn.Module]:
    """The model factory for a registered name or a ``package.module:factory`` path."""
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch]
    if ":" in arch:
        module_name, _, attr = arch.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UnknownArchError(
                f"cannot import module '{module_name}' for --arch {arch} ({exc}); "
                "check PYTHONPATH or the module path"
            ) from None
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise UnknownArchError(f"'{module_name}' has no callable '{attr}' (--arch {arch})")
        return factory
    raise UnknownArchError(
        f"unknown --arch '{arch}'; use one of {', '.join(sorted(ARCHITECTURES))} "
        "or package.module:factory"
    )


def build_model(arch: str, **kwargs) -> nn.Module:
    """Instantiate an architecture; a user factory must return an nn.Module."""
    model = resolve_factory(arch)(**kwargs)
    if not isinstance(model, nn.Module):
        raise UnknownArchError(f"--arch {arch} returned {type(model).__name__}, not an nn.Module")
    return model
