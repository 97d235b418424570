"""ResNet v2 (pre-activation) with Switchable Normalization, official state_dict layout.

Module names follow the official code (``sn1``..``sn3`` before each conv, a bare ``downsample``
conv, ``sn_out`` before pooling).  Differences, both invisible to official checkpoints that load:
adaptive global pooling (equal at 224x224), and ``sn_out`` sized ``512 * expansion`` (the official
code hard-codes 2048, so its v2-18/34 cannot run).
"""
from __future__ import annotations

import math
from typing import Type, Union

import torch
import torch.nn as nn

from sn_deploy.nn import SwitchNorm2d
from sn_deploy.models.resnet_v1_sn import conv3x3


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, using_moving_average=True):
        super().__init__()
        self.sn1 = SwitchNorm2d(inplanes, using_moving_average=using_moving_average)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.relu = nn.ReLU(inplace=True)
        self.sn2 = SwitchNorm2d(planes, using_moving_average=using_moving_average)
        self.conv2 = conv3x3(planes, planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = self.relu(self.sn1(x))
        out = self.conv1(preact)
        out = self.conv2(self.relu(self.sn2(out)))
        residual = x if self.downsample is None else self.downsample(preact)
        return out + residual


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, using_moving_average=False):
        super().__init__()
        self.sn1 = SwitchNorm2d(inplanes, using_moving_average=using_moving_average)
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.sn2 = SwitchNorm2d(planes, using_moving_average=using_moving_average)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.sn3 = SwitchNorm2d(planes, using_moving_average=using_moving_average)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = self.relu(self.sn1(x))
        out = self.conv1(preact)
        out = self.conv2(self.relu(self.sn2(out)))
        out = self.conv3(self.relu(self.sn3(out)))
        residual = x if self.downsample is None else self.downsample(preact)
        return out + residual


class ResNetV2SN(nn.Module):
    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: list[int],
                 num_classes: int = 1000, using_moving_average: bool = True):
        super().__init__()
        self.inplanes = 64
        self.using_moving_average = using_moving_average
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.sn1 = SwitchNorm2d(64, using_moving_average=using_moving_average)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.sn_out = SwitchNorm2d(512 * block.expansion, using_moving_average=using_moving_average)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.drouput = nn.Dropout(p=0.5)  # official (misspelt) name; holds no state
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / n))

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1,
                                   stride=stride, bias=False)
        layers = [block(self.inplanes, planes, stride, downsample,
                        using_moving_average=self.using_moving_average)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes,
                                using_moving_average=self.using_moving_average))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.sn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.relu(self.sn_out(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.drouput(x))


def resnetv2sn18(**kw) -> ResNetV2SN:
    return ResNetV2SN(BasicBlock, [2, 2, 2, 2], **kw)


def resnetv2sn34(**kw) -> ResNetV2SN:
    return ResNetV2SN(BasicBlock, [3, 4, 6, 3], **kw)


def resnetv2sn50(**kw) -> ResNetV2SN:
    return ResNetV2SN(Bottleneck, [3, 4, 6, 3], **kw)


def resnetv2sn101(**kw) -> ResNetV2SN:
    return ResNetV2SN(Bottleneck, [3, 4, 23, 3], **kw)


def resnetv2sn152(**kw) -> ResNetV2SN:
    return ResNetV2SN(Bottleneck, [3, 8, 36, 3], **kw)
