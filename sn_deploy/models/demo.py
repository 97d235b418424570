"""A small SN CNN for 8x8 single-channel images (scikit-learn's digits), used by ``make demo``."""
from __future__ import annotations

import torch
import torch.nn as nn

from sn_deploy.nn import SwitchNorm1d, SwitchNorm2d


class DemoSNNet(nn.Module):
    """conv-SN-relu x3 with pooling, then a SwitchNorm1d'd hidden layer and a classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.sn1 = SwitchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.sn2 = SwitchNorm2d(width)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.sn3 = SwitchNorm2d(2 * width)
        self.relu = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d((1, 1))
        self.fc1 = nn.Linear(2 * width, 64, bias=False)
        self.sn4 = SwitchNorm1d(64)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.sn1(self.conv1(x)))
        x = self.pool(self.relu(self.sn2(self.conv2(x))))
        x = self.relu(self.sn3(self.conv3(x)))
        x = torch.flatten(self.gap(x), 1)
        x = self.relu(self.sn4(self.fc1(x)))
        return self.fc(self.dropout(x))


def demo_sn_net(**kw) -> DemoSNNet:
    return DemoSNNet(**kw)
