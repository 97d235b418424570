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


# --------------------------------------------------------------------------- the demo data set
DIGITS_MEAN = 0.3   # of the digits pixels scaled to [0, 1] (rounded; used by calibration/digits.yaml)
DIGITS_STD = 0.4


def load_digits_split(test_fraction: float = 0.25, seed: int = 0):
    """scikit-learn's 8x8 digits (ships inside the package: no download), normalized NCHW float32.

    Returns ``(x_train, y_train, x_test, y_test)``.
    """
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0 - DIGITS_MEAN) / DIGITS_STD
    x = x[:, None, :, :]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def train_demo_model(
    x_train, y_train, epochs: int = 15, batch_size: int = 32, seed: int = 0, log=None
) -> DemoSNNet:
    """Train the demo SN net for real (Adam, a few epochs: ~20 s on 2 cores)."""
    import numpy as np

    torch.manual_seed(seed)
    model = DemoSNNet(num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    rng = np.random.default_rng(seed)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for epoch in range(epochs):
        model.train()
        perm = torch.from_numpy(rng.permutation(len(xt)))
        total = 0.0
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        sched.step()
        if log:
            log(f"epoch {epoch + 1}/{epochs}  loss {total / (len(perm) // batch_size):.4f}")
    return model.eval()
