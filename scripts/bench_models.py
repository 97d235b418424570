"""The ResNet-50 pair both benchmarks compare: SN with random mixing weights and its BN twin."""
from __future__ import annotations

import copy

import torch

from sn_deploy.nn import SwitchNorm2d, switch_norm_layers


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Random mixing logits and running stats, so every SN branch does work."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in switch_norm_layers(model):
            m.mean_weight.copy_(torch.randn(3, generator=g))
            m.var_weight.copy_(torch.randn(3, generator=g))
            m.weight.fill_(1.0)
            m.running_mean.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
    return model.eval()


def bn_twin(sn_model: torch.nn.Module) -> torch.nn.Module:
    """The same ResNet with BatchNorm2d in place of every SN layer, BN folded into the convs."""
    model = copy.deepcopy(sn_model)
    for m in list(model.modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, SwitchNorm2d):
                bn = torch.nn.BatchNorm2d(child.num_features)
                bn.running_var.uniform_(0.5, 1.5)
                setattr(m, child_name, bn)
    return fold_bn(model.eval())


def fold_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every BatchNorm2d into the Conv2d registered just before it (eval only)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for m in model.modules():
        names = list(m._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = m._modules[a], m._modules[b]
            if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d):
                m._modules[a] = fuse_conv_bn_eval(conv, bn)
                m._modules[b] = torch.nn.Identity()
    return model
