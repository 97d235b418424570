"""ResNet v1 with Switchable Normalization, state_dict-compatible with the official checkpoints.

Module names follow the official code (``sn1``, ``layer1.0.sn3``, ``downsample.0/.1``).  One
deliberate difference: global pooling is adaptive, which equals the official ``AvgPool2d(7)`` at
224x224 input and also works at other input sizes.
"""
from __future__ import annotations

import math
from typing import Type, Union

import torch
import torch.nn as nn

from sn_deploy.nn import SwitchNorm2d


def _sn(planes: int, using_moving_average: bool, last_gamma: bool = False,
        norm: Type[SwitchNorm2d] = SwitchNorm2d) -> SwitchNorm2d:
    return norm(planes, using_moving_average=using_moving_average, last_gamma=last_gamma)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, using_moving_average=True,
                 last_gamma=True, norm=SwitchNorm2d):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.sn1 = _sn(planes, using_moving_average, norm=norm)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.sn2 = _sn(planes, using_moving_average, last_gamma, norm)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.sn1(self.conv1(x)))
        out = self.sn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, using_moving_average=True,
                 last_gamma=True, norm=SwitchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.sn1 = _sn(planes, using_moving_average, norm=norm)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.sn2 = _sn(planes, using_moving_average, norm=norm)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.sn3 = _sn(planes * 4, using_moving_average, last_gamma, norm)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.sn1(self.conv1(x)))
        out = self.relu(self.sn2(self.conv2(out)))
        out = self.sn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class ResNetV1SN(nn.Module):
    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: list[int],
                 num_classes: int = 1000, using_moving_average: bool = True,
                 last_gamma: bool = True, norm: Type[SwitchNorm2d] = SwitchNorm2d,
                 ceil_mode_pool: bool = False):
        super().__init__()
        self.inplanes = 64
        self.using_moving_average = using_moving_average
        self.norm = norm
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.sn1 = _sn(64, using_moving_average, norm=norm)
        self.relu = nn.ReLU(inplace=True)
        # the official SSN ResNet pools with padding 0 and ceil_mode (same output size at 224)
        self.maxpool = (nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)
                        if ceil_mode_pool else nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.layer1 = self._make_layer(block, 64, layers[0], last_gamma=last_gamma)
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, last_gamma=last_gamma)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, last_gamma=last_gamma)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, last_gamma=last_gamma)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.drouput = nn.Dropout(p=0.5)  # official (misspelt) name; holds no state
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / n))

    def _make_layer(self, block, planes, blocks, stride=1, last_gamma=True):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride,
                          bias=False),
                _sn(planes * block.expansion, self.using_moving_average, norm=self.norm),
            )
        layers = [block(self.inplanes, planes, stride, downsample,
                        using_moving_average=self.using_moving_average, last_gamma=last_gamma,
                        norm=self.norm)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes,
                                using_moving_average=self.using_moving_average,
                                last_gamma=last_gamma, norm=self.norm))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.sn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.drouput(x))


def resnetv1sn18(**kw) -> ResNetV1SN:
    return ResNetV1SN(BasicBlock, [2, 2, 2, 2], **kw)


def resnetv1sn34(**kw) -> ResNetV1SN:
    return ResNetV1SN(BasicBlock, [3, 4, 6, 3], **kw)


def resnetv1sn50(**kw) -> ResNetV1SN:
    return ResNetV1SN(Bottleneck, [3, 4, 6, 3], **kw)


def resnetv1sn101(**kw) -> ResNetV1SN:
    return ResNetV1SN(Bottleneck, [3, 4, 23, 3], **kw)


def resnetv1sn152(**kw) -> ResNetV1SN:
    return ResNetV1SN(Bottleneck, [3, 8, 36, 3], **kw)
