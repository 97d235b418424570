"""Test modules with the layouts of the official SN classes, written here from the SN semantics
(GUIDE.md / README "SN semantics"), not copied: the official code's licence is non-commercial.

The class names are the official ones so that adoption summaries read as a user would see them.
Their forward passes state the official formulas in the plain ``E[x²] − E[x]²`` form the official
code uses; they are an independent reference for the adopted layers.  ``SyncSwitchableNorm2d``
refuses a CPU tensor as the official one does.  ``build_*`` are ``--arch module:factory`` targets.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from sn_deploy.nn import SwitchNorm2d as DeploySwitchNorm2d


def _official_stats(x3: torch.Tensor):
    """(N, C, L) → IN, LN and batch moments the official way (unbiased IN variance)."""
    mean_in = x3.mean(-1, keepdim=True)
    var_in = x3.var(-1, keepdim=True)
    second = var_in + mean_in ** 2
    mean_ln = mean_in.mean(1, keepdim=True)
    var_ln = second.mean(1, keepdim=True) - mean_ln ** 2
    mean_bn = mean_in.mean(0, keepdim=True)
    var_bn = second.mean(0, keepdim=True) - mean_bn ** 2
    return mean_in, var_in, mean_ln, var_ln, mean_bn, var_bn


def _update_running(sn: nn.Module, mean_bn, var_bn) -> None:
    """The official training-mode update of the running statistics (moving average, or the raw
    sums of batch-average mode), shared by the 1d and spatial fixtures."""
    with torch.no_grad():
        if sn.using_moving_average:
            sn.running_mean.mul_(sn.momentum).add_((1 - sn.momentum) * mean_bn)
            sn.running_var.mul_(sn.momentum).add_((1 - sn.momentum) * var_bn)
        else:
            sn.running_mean.add_(mean_bn)
            sn.running_var.add_(mean_bn ** 2 + var_bn)


class _SpatialSN(nn.Module):
    """Official 2d/3d layout: weight/bias (1,C,1..), mean/var_weight (3,) or (2,), running (1,C,1)."""

    rank = 4

    def __init__(self, num_features, eps=1e-5, momentum=0.9, using_moving_average=True,
                 using_bn=True, last_gamma=False):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.using_moving_average, self.using_bn, self.last_gamma = using_moving_average, using_bn, last_gamma
        shape = (1, num_features) + (1,) * (self.rank - 2)
        self.weight = nn.Parameter(torch.full(shape, 0.0 if last_gamma else 1.0))
        self.bias = nn.Parameter(torch.zeros(shape))
        k = 3 if using_bn else 2
        self.mean_weight = nn.Parameter(torch.ones(k))
        self.var_weight = nn.Parameter(torch.ones(k))
        if using_bn:
            self.register_buffer("running_mean", torch.zeros(1, num_features, 1))
            self.register_buffer("running_var", torch.zeros(1, num_features, 1))

    def forward(self, x):
        shape = x.shape
        x3 = x.reshape(shape[0], shape[1], -1)
        mean_in, var_in, mean_ln, var_ln, mean_bn, var_bn = _official_stats(x3)
        mw, vw = torch.softmax(self.mean_weight, 0), torch.softmax(self.var_weight, 0)
        mean = mw[0] * mean_in + mw[1] * mean_ln
        var = vw[0] * var_in + vw[1] * var_ln
        if self.using_bn:
            if self.training:
                _update_running(self, mean_bn, var_bn)
            else:
                mean_bn, var_bn = self.running_mean, self.running_var
            mean = mean + mw[2] * mean_bn
            var = var + vw[2] * var_bn
        y = ((x3 - mean) / (var + self.eps).sqrt()).reshape(shape)
        return y * self.weight + self.bias


class SwitchNorm2d(_SpatialSN):
    rank = 4


class SwitchNorm3d(_SpatialSN):
    rank = 5

    def __init__(self, num_features, eps=1e-5, momentum=0.997, **kw):
        super().__init__(num_features, eps=eps, momentum=momentum, **kw)


class SwitchNorm1d(nn.Module):
    """Official 1d layout: weight/bias/running (1,C), mixing [LN, BN], no using_bn/last_gamma."""

    def __init__(self, num_features, eps=1e-5, momentum=0.997, using_moving_average=True):
        super().__init__()
        self.eps, self.momentum, self.using_moving_average = eps, momentum, using_moving_average
        self.weight = nn.Parameter(torch.ones(1, num_features))
        self.bias = nn.Parameter(torch.zeros(1, num_features))
        self.mean_weight = nn.Parameter(torch.ones(2))
        self.var_weight = nn.Parameter(torch.ones(2))
        self.register_buffer("running_mean", torch.zeros(1, num_features))
        self.register_buffer("running_var", torch.zeros(1, num_features))

    def forward(self, x):
        mean_ln, var_ln = x.mean(1, keepdim=True), x.var(1, keepdim=True)
        if self.training:
            mean_bn, var_bn = x.mean(0, keepdim=True), x.var(0, keepdim=True)
            _update_running(self, mean_bn, var_bn)
        else:
            mean_bn, var_bn = self.running_mean, self.running_var
        mw, vw = torch.softmax(self.mean_weight, 0), torch.softmax(self.var_weight, 0)
        mean = mw[0] * mean_ln + mw[1] * mean_bn
        var = vw[0] * var_ln + vw[1] * var_bn
        return (x - mean) / (var + self.eps).sqrt() * self.weight + self.bias


class SyncSwitchableNorm2d(nn.Module):
    """Official SyncSN layout: SN2d's tensors, no using_bn/using_moving_average attributes, and a
    forward that only runs on CUDA tensors (as the official one)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.9, last_gamma=False):
        super().__init__()
        self.num_features, self.eps, self.momentum, self.last_gamma = num_features, eps, momentum, last_gamma
        self.weight = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.mean_weight = nn.Parameter(torch.ones(3))
        self.var_weight = nn.Parameter(torch.ones(3))
        self.register_buffer("running_mean", torch.zeros(1, num_features, 1))
        self.register_buffer("running_var", torch.ones(1, num_features, 1))

    def forward(self, x):
        if not x.is_cuda:
            raise RuntimeError("SyncSNFunc only supports CUDA computation")
        raise NotImplementedError("the test fixture never runs SyncSN on a GPU")


class SSN2d(_SpatialSN):
    """Official Sparse SN layout: SN2d plus buffers mean_fixed, var_fixed (1,) and radius (1,).
    Its forward here covers the fixed (one-hot) state only, which is what a trained SSN holds."""

    def __init__(self, num_features, eps=1e-5, momentum=0.997, using_moving_average=True,
                 last_gamma=False):
        super().__init__(num_features, eps=eps, momentum=momentum,
                         using_moving_average=using_moving_average, using_bn=True,
                         last_gamma=last_gamma)
        self.register_buffer("mean_fixed", torch.zeros(1, dtype=torch.long))
        self.register_buffer("var_fixed", torch.zeros(1, dtype=torch.long))
        self.register_buffer("radius", torch.zeros(1))

    def forward(self, x):
        assert bool(self.mean_fixed) and bool(self.var_fixed), "fixture: fixed SSN layers only"
        shape = x.shape
        x3 = x.reshape(shape[0], shape[1], -1)
        mean_in, var_in, mean_ln, var_ln, _, _ = _official_stats(x3)
        mw, vw = self.mean_weight, self.var_weight  # stored one-hot
        mean = mw[0] * mean_in + mw[1] * mean_ln + mw[2] * self.running_mean
        var = vw[0] * var_in + vw[1] * var_ln + vw[2] * self.running_var
        return ((x3 - mean) / (var + self.eps).sqrt()).reshape(shape) * self.weight + self.bias


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random mixing logits, affine and running stats on every SN-layout module (official or not)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not hasattr(m, "mean_weight") or hasattr(m, "mean_fixed"):
                continue
            m.mean_weight.copy_(torch.randn(m.mean_weight.shape, generator=g))
            m.var_weight.copy_(torch.randn(m.var_weight.shape, generator=g))
            m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(0.5 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


class MixedNet(nn.Module):
    """A small user model: official SN (eps 2e-5 as in the face models), official SN without BN,
    SyncSN, an sn_deploy SN, GroupNorm and BatchNorm side by side, a residual block, 1d SN head."""

    def __init__(self, num_classes: int = 5, sync: bool = True):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm0 = SwitchNorm2d(8, eps=2e-5, momentum=0.9)
        self.body = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, bias=False),
            (SyncSwitchableNorm2d if sync else SwitchNorm2d)(8),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
            SwitchNorm2d(16, using_bn=False),
            nn.ReLU(),
        )
        self.conv_gn = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(4, 16)
        self.conv_bn = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.conv_own = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.own = DeploySwitchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(16, 12)
        self.head_norm = SwitchNorm1d(12)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x):
        x = torch.relu(self.norm0(self.stem(x)))
        x = self.body(x)
        x = torch.relu(self.gn(self.conv_gn(x)))
        x = torch.relu(self.bn(self.conv_bn(x)) + x)
        x = torch.relu(self.own(self.conv_own(x)) + x)
        x = self.pool(x).flatten(1)
        return self.fc(torch.relu(self.head_norm(self.fc1(x))))


def build_mixed(num_classes: int = 5) -> nn.Module:
    """``--arch tests.official_layout:build_mixed``: a fresh model (the checkpoint fills it)."""
    return MixedNet(num_classes)


def build_mixed_trained(num_classes: int = 5) -> nn.Module:
    """A MixedNet with random (non-initial) SN parameters and BN statistics, seeded."""
    model = randomize(MixedNet(num_classes), seed=1)
    with torch.no_grad():
        model.bn.running_mean.normal_(0, 0.2, generator=torch.Generator().manual_seed(2))
        model.bn.running_var.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(3))
    return model


class Net3d(nn.Module):
    """Official SwitchNorm3d in a tiny video-style model."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3, padding=1)
        self.norm = SwitchNorm3d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.norm(self.conv(x))).mean((2, 3, 4)))
