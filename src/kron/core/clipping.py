"""Clipping the preconditioned update (algorithm.md §6.4). Tensors are ``(S, *shape)``, ``S``
stacked parameters; statistics are per parameter (per leading index)."""

from __future__ import annotations

import math
from typing import Any


def norm_per_parameter(y: Any, ops: Any) -> Any:
    """The L2 norm of each ``y[s]``, shaped to broadcast against ``y``; in float32 when ``y``
    is float16, whose range (to 65504) its squares would leave long before the norm does."""
    if ops.tiny(ops.dtype(y)) > 1e-30:
        y = ops.astype(y, "float32")
    axes = tuple(range(1, len(y.shape)))
    return ops.norm(y, axis=axes, keepdims=True) if axes else ops.abs(y)


def rms_per_parameter(y: Any, ops: Any) -> Any:
    """The RMS of each ``y[s]``, shaped to broadcast against ``y``."""
    return norm_per_parameter(y, ops) / math.sqrt(math.prod(y.shape[1:]))


def shrink_factor(size: Any, limit: float, ops: Any) -> Any:
    """``min(1, limit / size)``: what scales a tensor of ``size`` (its norm or RMS) down to
    ``limit`` and leaves a smaller one alone."""
    return ops.minimum(limit / (size + 1e-12), 1.0)


def rms_clip_factor(y: Any, max_rms: float, ops: Any) -> Any:
    """``min(1, max_rms / RMS(y[s]))`` per leading index, shaped to broadcast against ``y``."""
    return shrink_factor(rms_per_parameter(y, ops), max_rms, ops)


def clip_rms(y: Any, max_rms: float, ops: Any) -> Any:
    """``y · min(1, max_rms / RMS(y))``: kron_torch and psgd_jax use 1.1, psgd_torch 2.0."""
    return y * ops.astype(rms_clip_factor(y, max_rms, ops), ops.dtype(y))


def clip_elementwise(y: Any, max_abs: float, ops: Any) -> Any:
    """Clamp every entry to ``[-max_abs, max_abs]``."""
    return ops.clip(y, -max_abs, max_abs)


def soft_clip(y: Any, ops: Any, scale: float = 1.5, lerp: float = 0.9) -> Any:
    """The trust-region soft clip ``s·φ(y/s)`` with
    ``φ(x) = (1-lerp)·sign(x)·log(1+|x|) + lerp·tanh(x)`` (kron_torch 2024, heavyball)."""
    x = y / scale
    return scale * ((1.0 - lerp) * ops.sign(x) * ops.log1p(ops.abs(x)) + lerp * ops.tanh(x))


def l2_clip_factor(y: Any, max_norm: float, ops: Any) -> Any:
    """``min(1, max_norm / ‖y[s]‖₂)`` per leading index, shaped to broadcast against ``y``."""
    return shrink_factor(norm_per_parameter(y, ops), max_norm, ops)


def clip_l2(y: Any, max_norm: float, ops: Any) -> Any:
    """``y · min(1, max_norm / ‖y‖₂)`` per leading index."""
    return y * ops.astype(l2_clip_factor(y, max_norm, ops), ops.dtype(y))


def mars_correction(grad: Any, previous: Any, beta: float, gamma: float, ops: Any) -> Any:
    """MARS variance reduction (Yuan et al., 2024): ``c = g + γ·β/(1-β)·(g - g_prev)``, rescaled to
    unit L2 norm when larger. Shapes ``(S, ...)``; the norm is per leading index."""
    corrected = grad + (gamma * beta / (1.0 - beta)) * (grad - previous)
    return clip_l2(corrected, 1.0, ops)


def cautious(y: Any, grad: Any, ops: Any) -> Any:
    """Cautious update (Liang et al., 2024): zero the entries of ``y`` whose sign disagrees with the
    gradient and rescale the rest by the inverse kept fraction (at most 1000×)."""
    keep = ops.astype(y * grad > 0, ops.dtype(y))
    kept = ops.mean(keep, axis=tuple(range(1, len(y.shape))), keepdims=True)
    return y * keep / ops.maximum(kept, 1e-3)
