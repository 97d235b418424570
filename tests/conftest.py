"""Shared fixtures: small SN models whose mixing logits and running stats are not the init values."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sn_deploy.nn import switch_norm_layers


def randomize_sn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every SN layer random mixing logits, affine and running stats so all branches matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in switch_norm_layers(model):
            layer.mean_weight.copy_(torch.randn(layer.mean_weight.shape, generator=g))
            layer.var_weight.copy_(torch.randn(layer.var_weight.shape, generator=g))
            layer.weight.copy_(1 + 0.2 * torch.randn(layer.weight.shape, generator=g))
            layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=g))
            if layer.using_bn:
                layer.running_mean.copy_(0.5 * torch.randn(layer.running_mean.shape, generator=g))
                layer.running_var.copy_(0.5 + torch.rand(layer.running_var.shape, generator=g))
    return model.eval()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
