"""ResNet v1 with Sparse Switchable Normalization, state_dict-compatible with the official SSN
checkpoints (switchablenorms/Sparse_SwitchNorm, ``resnetv1ssn*``).

The official SSN ResNet is the SN ResNet v1 with ``SSN2d`` layers (same module names) and a stem
max-pool with padding 0 and ``ceil_mode`` (the same 56x56 output at 224x224 input).
"""
from __future__ import annotations

from sn_deploy.models.resnet_v1_sn import BasicBlock, Bottleneck, ResNetV1SN
from sn_deploy.nn import SparseSwitchNorm2d


def _ssn(block, layers: list[int], **kw) -> ResNetV1SN:
    return ResNetV1SN(block, layers, norm=SparseSwitchNorm2d, ceil_mode_pool=True, **kw)


def resnetv1ssn18(**kw) -> ResNetV1SN:
    return _ssn(BasicBlock, [2, 2, 2, 2], **kw)


def resnetv1ssn34(**kw) -> ResNetV1SN:
    return _ssn(BasicBlock, [3, 4, 6, 3], **kw)


def resnetv1ssn50(**kw) -> ResNetV1SN:
    return _ssn(Bottleneck, [3, 4, 6, 3], **kw)


def resnetv1ssn101(**kw) -> ResNetV1SN:
    return _ssn(Bottleneck, [3, 4, 23, 3], **kw)


def resnetv1ssn152(**kw) -> ResNetV1SN:
    return _ssn(Bottleneck, [3, 8, 36, 3], **kw)
