"""The one float64 NumPy statement of the Switchable Normalization maths.

Independent of :mod:`sn_deploy.nn` on purpose: tests hold the PyTorch layers, the ONNX lowerings
and the native kernels to this file.  Everything is computed in float64 with the two-pass
(cancellation-free) forms of the official formulas.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax of the raw mixing logits (``mean_weight``/``var_weight`` are stored raw)."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def instance_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-(n, c) mean and unbiased variance over all trailing axes, shape (N, C)."""
    x = np.asarray(x, dtype=np.float64)
    xf = x.reshape(x.shape[0], x.shape[1], -1)
    L = xf.shape[-1]
    mean = xf.mean(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        var = ((xf - mean[..., None]) ** 2).sum(-1) / (L - 1)
    return mean, var


def pool_moments(mean: np.ndarray, var: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Pooled moments of groups given each group's mean/variance (official LN/BN rule).

    ``mean(var + mean^2) - pooled_mean^2`` written as ``mean(var) + mean((mean - pooled)^2)``.
    """
    pooled = mean.mean(axis, keepdims=True)
    return pooled, var.mean(axis, keepdims=True) + ((mean - pooled) ** 2).mean(axis, keepdims=True)


def batch_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Training-mode BN statistics ``(mean_bn, var_bn)`` of one batch, shape (C,)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:
        return x.mean(0), x.var(0, ddof=1)
    mean_in, var_in = instance_moments(x)
    mean_bn, var_bn = pool_moments(mean_in, var_in, axis=0)
    return mean_bn[0], var_bn[0]


def batch_average(stats: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Batch-average inference statistics from per-batch ``(mean_bn, var_bn)`` (pooled variance)."""
    means = np.stack([np.asarray(m, np.float64) for m, _ in stats])
    variances = np.stack([np.asarray(v, np.float64) for _, v in stats])
    mean, var = pool_moments(means, variances, axis=0)
    return mean[0], var[0]


def switchable_norm(
    x: np.ndarray,
    scale: np.ndarray,
    bias: np.ndarray,
    mean_weights: np.ndarray,
    var_weights: np.ndarray,
    running_mean: Optional[np.ndarray] = None,
    running_var: Optional[np.ndarray] = None,
    eps: float = 1e-5,
    training: bool = False,
    relu: bool = False,
    residual: Optional[np.ndarray] = None,
) -> np.ndarray:
    """SN forward in float64: ``relu?(SN(x) + residual)``.

    ``x`` is (N, C, *spatial) with weights [IN, LN, BN] (or [IN, LN] without running stats), or
    (N, C) with weights [LN, BN] (SwitchNorm1d).  Mixing weights are already softmaxed; ``scale``,
    ``bias`` and the running stats are per-channel (any shape with C elements).  ``residual``
    (same shape as ``x``) is a fused skip connection, added before the optional ReLU.
    """
    x = np.asarray(x, dtype=np.float64)
    if residual is not None and np.shape(residual) != x.shape:
        raise ValueError(f"residual has shape {np.shape(residual)}, the input {x.shape}: "
                         "a fused residual must match the input exactly")
    N, C = x.shape[:2]
    mw = np.asarray(mean_weights, np.float64)
    vw = np.asarray(var_weights, np.float64)
    per_c = lambda a: np.asarray(a, np.float64).reshape(C)  # noqa: E731
    if x.ndim == 2:
        mean_ln = x.mean(1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            var_ln = x.var(1, ddof=1, keepdims=True)
        if training:
            mean_bn, var_bn = batch_stats(x)
        else:
            mean_bn, var_bn = per_c(running_mean), per_c(running_var)
        mean = mw[0] * mean_ln + mw[1] * mean_bn[None]
        var = vw[0] * var_ln + vw[1] * var_bn[None]
        y = (x - mean) / np.sqrt(var + eps) * per_c(scale)[None] + per_c(bias)[None]
    else:
        mean_in, var_in = instance_moments(x)  # (N, C)
        mean_ln, var_ln = pool_moments(mean_in, var_in, axis=1)  # (N, 1)
        mean = mw[0] * mean_in + mw[1] * mean_ln
        var = vw[0] * var_in + vw[1] * var_ln
        if len(mw) == 3:
            if training:
                mean_bn, var_bn = batch_stats(x)
            else:
                mean_bn, var_bn = per_c(running_mean), per_c(running_var)
            mean = mean + mw[2] * mean_bn[None]
            var = var + vw[2] * var_bn[None]
        extra = (1,) * (x.ndim - 2)
        a = per_c(scale)[None] / np.sqrt(var + eps)  # (N, C)
        b = per_c(bias)[None] - mean * a
        y = x * a.reshape(N, C, *extra) + b.reshape(N, C, *extra)
    if residual is not None:
        y = y + np.asarray(residual, np.float64)
    return np.maximum(y, 0.0) if relu else y


def switchable_norm_from_state(state: dict, x: np.ndarray, eps: float = 1e-5,
                               training: bool = False) -> np.ndarray:
    """SN forward from a layer's state_dict entries (raw logits softmaxed here)."""
    g = lambda k: state[k].detach().cpu().numpy() if hasattr(state[k], "detach") else state[k]  # noqa: E731
    rm = g("running_mean") if "running_mean" in state else None
    rv = g("running_var") if "running_var" in state else None
    return switchable_norm(
        x, g("weight"), g("bias"), softmax(g("mean_weight")), softmax(g("var_weight")),
        rm, rv, eps=eps, training=training,
    )
