"""Switchable Normalization layers with the official semantics and state_dict layout.

Parameter and buffer names/shapes are those of the official Switchable-Normalization code
(``weight``, ``bias``, ``mean_weight``, ``var_weight``, ``running_mean``, ``running_var``), so
official checkpoints load with ``strict=True``.  The statistics are the official ones (unbiased IN
variance, LN/BN moments derived from the IN moments, softmax over the raw mixing logits, eps added
once); they are computed in the algebraically equal but cancellation-free form
``var_ln = mean_c(var_in) + mean_c((mean_in - mean_ln)^2)`` instead of ``E[x^2] - E[x]^2``.

Two extension points serve the deployment pipeline without changing the maths:

* ``batch_stats_observer``: when set, a training-mode forward hands its batch statistics
  ``(mean_bn, var_bn)`` to the observer instead of updating the running buffers
  (batch-average calibration, see :mod:`sn_deploy.calibrate`).
* :func:`sn_deploy.export` swaps the eval forward for one custom op per layer while exporting.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn

BatchStatsObserver = Callable[["_SwitchNorm", torch.Tensor, torch.Tensor], None]


class DegenerateInputError(ValueError):
    """Raised when the instance variance is undefined (one element per plane)."""


class _SwitchNorm(nn.Module):
    """Shared state and mixing logic of SwitchNorm1d/2d/3d."""

    #: number of dimensions of the expected input
    input_rank: int = 4

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.9,
        using_moving_average: bool = True,
        using_bn: bool = True,
        last_gamma: bool = False,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.using_moving_average = using_moving_average
        self.using_bn = using_bn
        self.last_gamma = last_gamma
        affine_shape = (1, num_features) + (1,) * (self.input_rank - 2)
        self.weight = nn.Parameter(torch.ones(affine_shape))
        self.bias = nn.Parameter(torch.zeros(affine_shape))
        n_branches = self.num_branches
        self.mean_weight = nn.Parameter(torch.ones(n_branches))
        self.var_weight = nn.Parameter(torch.ones(n_branches))
        if using_bn:
            stats_shape = (1, num_features) if self.input_rank == 2 else (1, num_features, 1)
            self.register_buffer("running_mean", torch.zeros(stats_shape))
            self.register_buffer("running_var", torch.zeros(stats_shape))
        else:
            self.running_mean = None
            self.running_var = None
        self.batch_stats_observer: Optional[BatchStatsObserver] = None
        self.reset_parameters()

    @property
    def num_branches(self) -> int:
        return 3 if self.using_bn else 2

    @property
    def branch_names(self) -> tuple[str, ...]:
        return ("in", "ln", "bn") if self.using_bn else ("in", "ln")

    def reset_parameters(self) -> None:
        if self.using_bn:
            self.running_mean.zero_()
            self.running_var.zero_()
        with torch.no_grad():
            self.weight.fill_(0.0 if self.last_gamma else 1.0)
            self.bias.zero_()

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"using_moving_average={self.using_moving_average}, using_bn={self.using_bn}, "
            f"last_gamma={self.last_gamma}"
        )

    def mixing_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmaxed (mean, var) mixing weights, in branch order."""
        return torch.softmax(self.mean_weight, 0), torch.softmax(self.var_weight, 0)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() != self.input_rank:
            raise ValueError(
                f"{type(self).__name__} expects {self.input_rank}D input, got {x.dim()}D "
                f"(shape {tuple(x.shape)})"
            )

    def _observe_batch(self, mean_bn: torch.Tensor, var_bn: torch.Tensor) -> None:
        """Update running statistics the official way, or hand them to the observer."""
        if self.batch_stats_observer is not None:
            self.batch_stats_observer(self, mean_bn.detach(), var_bn.detach())
            return
        with torch.no_grad():
            if self.using_moving_average:
                self.running_mean.mul_(self.momentum).add_((1 - self.momentum) * mean_bn)
                self.running_var.mul_(self.momentum).add_((1 - self.momentum) * var_bn)
            else:  # official batch-average accumulation; divided by the caller
                self.running_mean.add_(mean_bn)
                self.running_var.add_(mean_bn**2 + var_bn)


def instance_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(n, c) mean and unbiased variance over the trailing axes, each (N, C, 1)."""
    xf = x.reshape(x.shape[0], x.shape[1], -1)
    if xf.shape[-1] == 1:
        raise DegenerateInputError(
            f"SwitchNorm got spatial size 1 (input {tuple(x.shape)}): the unbiased instance "
            "variance divides by L-1 = 0 and is NaN; use a larger input or a layer without IN"
        )
    var_in, mean_in = torch.var_mean(xf, dim=-1, keepdim=True)
    return mean_in, var_in


def pool_moments(mean: torch.Tensor, var: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled mean/variance of groups from their moments (the official LN/BN rule, stable form)."""
    pooled = mean.mean(dim, keepdim=True)
    return pooled, var.mean(dim, keepdim=True) + ((mean - pooled) ** 2).mean(dim, keepdim=True)


def switchable_norm_spatial(
    x: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    mean_w: torch.Tensor,
    var_w: torch.Tensor,
    mean_bn: Optional[torch.Tensor],
    var_bn: Optional[torch.Tensor],
    eps: float,
    moments: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """SN of (N, C, *spatial) given the mixing weights and BN-branch statistics (None: no BN)."""
    shape = x.shape
    n, c = shape[0], shape[1]
    mean_in, var_in = moments if moments is not None else instance_moments(x)
    mean_ln, var_ln = pool_moments(mean_in, var_in, 1)
    mean = mean_w[0] * mean_in + mean_w[1] * mean_ln
    var = var_w[0] * var_in + var_w[1] * var_ln
    if mean_bn is not None:
        mean = mean + mean_w[2] * mean_bn.reshape(1, c, 1)
        var = var + var_w[2] * var_bn.reshape(1, c, 1)
    y = (x.reshape(n, c, -1) - mean) / (var + eps).sqrt()
    stat_shape = (1, c) + (1,) * (len(shape) - 2)
    return y.reshape(shape) * scale.reshape(stat_shape) + bias.reshape(stat_shape)


def switchable_norm_1d(
    x: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    mean_w: torch.Tensor,
    var_w: torch.Tensor,
    mean_bn: torch.Tensor,
    var_bn: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """SN of (N, C): LN over C (unbiased), BN statistics given, weights [LN, BN]."""
    if x.shape[1] == 1:
        raise DegenerateInputError(
            "SwitchNorm1d got 1 feature: the unbiased LN variance divides by C-1 = 0 and is NaN"
        )
    var_ln, mean_ln = torch.var_mean(x, dim=1, keepdim=True)
    c = x.shape[1]
    mean = mean_w[0] * mean_ln + mean_w[1] * mean_bn.reshape(1, c)
    var = var_w[0] * var_ln + var_w[1] * var_bn.reshape(1, c)
    return (x - mean) / (var + eps).sqrt() * scale.reshape(1, c) + bias.reshape(1, c)


class _SwitchNormSpatial(_SwitchNorm):
    """SwitchNorm over (N, C, *spatial): IN, LN and BN statistics from per-plane moments."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        moments = instance_moments(x)
        mean_bn = var_bn = None
        if self.using_bn:
            if self.training:
                mean_bn, var_bn = pool_moments(*moments, 0)
                self._observe_batch(mean_bn, var_bn)
            else:
                mean_bn, var_bn = self.running_mean, self.running_var
        mean_w, var_w = self.mixing_weights()
        return switchable_norm_spatial(
            x, self.weight, self.bias, mean_w, var_w, mean_bn, var_bn, self.eps, moments
        )


class SwitchNorm2d(_SwitchNormSpatial):
    """SwitchNorm over (N, C, H, W); official defaults (momentum 0.9)."""

    input_rank = 4


class SwitchNorm3d(_SwitchNormSpatial):
    """SwitchNorm over (N, C, D, H, W); official defaults (momentum 0.997)."""

    input_rank = 5

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.997, **kw) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, **kw)


class SwitchNorm1d(_SwitchNorm):
    """SwitchNorm over (N, C): LN over C and BN over N (both unbiased), weights [LN, BN]."""

    input_rank = 2

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.997,
        using_moving_average: bool = True,
        last_gamma: bool = False,
    ) -> None:
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            using_moving_average=using_moving_average,
            using_bn=True,
            last_gamma=last_gamma,
        )

    @property
    def num_branches(self) -> int:
        return 2

    @property
    def branch_names(self) -> tuple[str, ...]:
        return ("ln", "bn")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if self.training:
            var_bn, mean_bn = torch.var_mean(x, dim=0, keepdim=True)
            self._observe_batch(mean_bn, var_bn)
        else:
            mean_bn, var_bn = self.running_mean, self.running_var
        mean_w, var_w = self.mixing_weights()
        return switchable_norm_1d(x, self.weight, self.bias, mean_w, var_w, mean_bn, var_bn, self.eps)


def sparsemax(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of ``v`` onto the probability simplex (Martins & Astudillo, 2016)."""
    z, _ = torch.sort(v, descending=True)
    k = torch.arange(1, v.numel() + 1, dtype=v.dtype, device=v.device)
    cssv = torch.cumsum(z, 0) - 1
    support = (z - cssv / k).detach() > 0
    rho = int(support.nonzero().max()) + 1  # the first element is always in the support
    tau = cssv[rho - 1] / rho
    return torch.clamp(v - tau, min=0)


def sparsestmax(v: torch.Tensor, radius: float, _center: Optional[torch.Tensor] = None,
                _depth: int = 0) -> torch.Tensor:
    """SSN's sparsestmax: sparsemax, then pushed out of the ball of ``radius`` around the uniform
    point of its support, onto the simplex (official ``ssn_utils.sparsestmax``).

    As ``radius`` grows during training the result becomes one-hot, which is when the official
    layer freezes it.  One deliberate difference: where the sparsemax point *is* the centre (equal
    logits) there is no direction to push in; the official code divides by zero and returns NaN,
    this returns the sparsemax point.
    """
    w = sparsemax(v)
    if float(w.detach().max() - w.detach().min()) == 1.0 or _depth >= v.numel():
        return w
    support = (w.detach() > 0).to(v.dtype)
    u = support / support.sum()
    if _center is not None:
        radius = math.sqrt(max(radius**2 - float(((u - _center) ** 2).sum()), 0.0))
    distance = float(torch.linalg.vector_norm(w.detach() - u))
    if distance >= radius or distance < 1e-6:
        return w
    p = radius * (w - u) / distance + u
    if float(p.detach().min()) < 0:
        return sparsestmax(p, radius, u, _depth + 1)
    return p.clamp(0, 1)


class SparseSwitchNorm2d(SwitchNorm2d):
    """Sparse Switchable Normalization (SSN, CVPR 2019) over (N, C, H, W): SN whose mixing weights
    are ``sparsestmax(logits, radius)`` instead of softmax, state_dict-compatible with the official
    ``SSN2d`` (extra buffers ``mean_fixed``, ``var_fixed``, ``radius``).

    Once a layer's weights became one-hot in training, the official code sets ``*_fixed`` and
    stores the one-hot vector in place of the logits; the weights are then used as stored.  This
    layer reads that state and never changes it (deployment freezes weights), so the one-hot
    layers of a trained SSN are exactly BN, IN or LN and the specialization pass replaces them
    without error.  Statistics, eps and the running-stat conventions are SN's (official default
    momentum 0.997).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.997,
                 using_moving_average: bool = True, last_gamma: bool = False) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum,
                         using_moving_average=using_moving_average, using_bn=True,
                         last_gamma=last_gamma)
        self.register_buffer("mean_fixed", torch.zeros(1, dtype=torch.long))
        self.register_buffer("var_fixed", torch.zeros(1, dtype=torch.long))
        self.register_buffer("radius", torch.zeros(1))

    def mixing_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored weights where fixed, else sparsestmax of the logits at the stored radius."""
        rad = float(self.radius.reshape(-1)[0])

        def pick(logits: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
            if bool(fixed.reshape(-1)[0]):
                return logits.detach()
            return sparsestmax(logits, rad)

        return pick(self.mean_weight, self.mean_fixed), pick(self.var_weight, self.var_fixed)


SWITCH_NORM_TYPES = (SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, SparseSwitchNorm2d)


def switch_norm_layers(model: nn.Module) -> list[tuple[str, _SwitchNorm]]:
    """All SwitchNorm layers of ``model`` with their qualified names, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _SwitchNorm)]


#: PyTorch's BatchNorm layers (``--precise-bn`` calibrates them too)
BATCH_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: PyTorch's own normalization layers, exported as standard ONNX ops and compared per layer too
STANDARD_NORM_TYPES = BATCH_NORM_TYPES + (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
                                          nn.InstanceNorm3d, nn.LayerNorm)


def normalization_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """SN layers and PyTorch's BN/GN/IN/LN layers with their qualified names, in module order."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (_SwitchNorm,) + STANDARD_NORM_TYPES)]
