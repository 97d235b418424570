"""The face-recognition IR-ResNets of the official SN code, with its module names and shapes.

These are the backbones of the official ``face_recognition`` models (``ArcFaceWithLoss.basemodel``):
a 3x3 stride-1 stem, improved-residual blocks (norm → conv → norm → PReLU → conv → norm [→ SE],
one PReLU shared by the block), four stride-2 stages, and an embedding head ``output_layer`` =
norm → dropout → flatten → Linear(C·7·7, 512) → BatchNorm1d, L2-normalized.  Input is 112x112.

The official model builder makes every norm ``SwitchNorm2d(C, eps=2e-5, momentum=0.9)`` or
``SyncSwitchableNorm2d(C, eps=2e-5, momentum=0.9)``; both hold the same tensors and compute the same
thing in eval, so ``norm="sn"`` and ``norm="syncsn"`` build the same sn_deploy layers (which also
run on a CPU).  Parameter names: ``conv1``, ``norm1``, ``prelu``, ``layerK.i.{norm1..norm4,
conv1..conv3, prelu, se.fc1, se.pelu, se.fc2, downsample.0/.1}``, ``output_layer.{0,3,4}``.

One deliberate difference: for depths 101 and 152 (bottleneck blocks) the official code sizes
``output_layer`` for 2048 channels while its last stage emits ``4 × 2048``, so those models cannot
run; here ``output_layer`` takes the channels the last stage really emits.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from sn_deploy.nn import SwitchNorm2d

#: input size of every face model: 112x112 RGB, which the flatten → Linear(C·7·7) head requires
INPUT_SIZE = (3, 112, 112)
EMBEDDING_DIM = 512
FACE_EPS = 2e-5
FACE_MOMENTUM = 0.9
NORMS = ("sn", "syncsn")

#: blocks per stage, and whether the stages use bottleneck blocks (official: depth >= 101)
STAGES: dict[int, tuple[list[int], bool]] = {
    18: ([2, 2, 2, 2], False),
    34: ([3, 4, 6, 3], False),
    50: ([3, 4, 14, 3], False),
    100: ([3, 13, 30, 3], False),
    101: ([3, 4, 23, 3], True),
    152: ([3, 8, 36, 3], True),
}
#: stage widths (``planes``): the official code widens the bottleneck stages 4x as well
BASIC_PLANES = (64, 128, 256, 512)
BOTTLENECK_PLANES = (256, 512, 1024, 2048)

NormFactory = Callable[[int], nn.Module]


def face_norm(norm: str = "sn") -> NormFactory:
    """The norm layer the official model builder installs for ``norm_func`` = sn / syncsn."""
    if norm not in NORMS:
        raise ValueError(f"unknown face norm '{norm}': use one of {', '.join(NORMS)}")
    return lambda channels: SwitchNorm2d(channels, eps=FACE_EPS, momentum=FACE_MOMENTUM)


class SEModule(nn.Module):
    """Squeeze-and-excitation with 1x1 convolutions (no bias), reduction 16, PReLU between."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, bias=False)
        self.pelu = nn.PReLU()  # the official (misspelt) name
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.sigmoid(self.fc2(self.pelu(self.fc1(self.avg_pool(x)))))
        return x * gate


class IRBlock(nn.Module):
    """Improved residual block; ``bottleneck`` adds a 1x1 reduce/expand pair (``conv3``, ``norm4``).

    The stride sits on ``conv2``; the shortcut is the raw input (or ``downsample`` of it).
    """

    def __init__(self, inplanes: int, planes: int, bottleneck: bool, stride: int,
                 downsample: nn.Module | None, use_se: bool, norm: NormFactory):
        super().__init__()
        out_planes = planes * 4 if bottleneck else planes
        self.norm1 = norm(inplanes)
        if bottleneck:
            self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=3, padding=1, bias=False)
        self.norm2 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.norm3 = norm(planes)
        if bottleneck:
            self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
            self.norm4 = norm(out_planes)
        self.prelu = nn.PReLU()
        self.bottleneck = bottleneck
        self.downsample = downsample
        self.se = SEModule(out_planes) if use_se else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.prelu(self.norm2(self.conv1(self.norm1(x))))
        out = self.norm3(self.conv2(out))
        if self.bottleneck:
            out = self.norm4(self.conv3(self.prelu(out)))
        if self.se is not None:
            out = self.se(out)
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.prelu(out + shortcut)


class FaceResNet(nn.Module):
    """IR-ResNet face backbone: 112x112 RGB → L2-normalized 512-d embedding."""

    def __init__(self, depth: int, use_se: bool = False, norm: str = "sn"):
        super().__init__()
        if depth not in STAGES:
            raise ValueError(f"no face IR-ResNet of depth {depth}: use one of "
                             f"{', '.join(map(str, STAGES))}")
        blocks, bottleneck = STAGES[depth]
        make_norm = face_norm(norm)
        self.depth, self.use_se = depth, use_se
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, padding=1, bias=False)
        self.norm1 = make_norm(64)
        self.prelu = nn.PReLU()
        channels = 64
        planes_per_stage = BOTTLENECK_PLANES if bottleneck else BASIC_PLANES
        for index, (planes, count) in enumerate(zip(planes_per_stage, blocks), start=1):
            stage, channels = self._stage(channels, planes, count, bottleneck, use_se, make_norm)
            self.add_module(f"layer{index}", stage)
        spatial = INPUT_SIZE[1] // 16  # four stride-2 stages: 112 → 7
        self.output_layer = nn.Sequential(
            make_norm(channels),
            nn.Dropout(0.4),
            nn.Flatten(),
            nn.Linear(channels * spatial * spatial, EMBEDDING_DIM),
            nn.BatchNorm1d(EMBEDDING_DIM),
        )
        self._init_weights()

    @staticmethod
    def _stage(inplanes: int, planes: int, count: int, bottleneck: bool, use_se: bool,
               norm: NormFactory) -> tuple[nn.Sequential, int]:
        out_planes = planes * 4 if bottleneck else planes
        downsample = nn.Sequential(  # every stage halves the size, so every first block projects
            nn.Conv2d(inplanes, out_planes, kernel_size=1, stride=2, bias=False),
            norm(out_planes),
        )
        blocks = [IRBlock(inplanes, planes, bottleneck, 2, downsample, use_se, norm)]
        blocks += [IRBlock(out_planes, planes, bottleneck, 1, None, use_se, norm)
                   for _ in range(count - 1)]
        return nn.Sequential(*blocks), out_planes

    def _init_weights(self) -> None:
        """He-normal convolutions, uniform(±sqrt(3 / fan_in)) linear weights, zero bias."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.Linear):
                bound = math.sqrt(3.0 / m.in_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.norm1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return F.normalize(self.output_layer(x), p=2.0, dim=1)


def _factory(depth: int, use_se: bool) -> Callable[..., FaceResNet]:
    def build(norm: str = "sn") -> FaceResNet:
        return FaceResNet(depth, use_se=use_se, norm=norm)

    build.__name__ = f"face_resnet{depth}{'_se' if use_se else ''}_sn"
    build.__doc__ = (f"Face IR-ResNet-{depth}{' with SE' if use_se else ''} (official "
                     "face_recognition backbone; SN or SyncSN checkpoints).")
    return build


#: registered names: ``face_resnet{depth}_sn`` and ``face_resnet{depth}_se_sn``
FACTORIES: dict[str, Callable[..., FaceResNet]] = {
    f.__name__: f for f in (_factory(d, se) for d in STAGES for se in (False, True))
}
