"""Clipping the preconditioned update (algorithm.md §6.4), and the two other elementwise
transforms of the gradient and the update: heavyball's MARS correction of the gradient before
the momentum, and cautious masking of the update. Tensors are ``(S, *shape)``, ``S`` stacked
parameters; statistics are per parameter (per leading index)."""

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


SOFT_CLIP_BOUND = 2.0  # heavyball's trust_region_clip_ ends with clamp(-2, 2), whatever the scale


def soft_clip(y: Any, ops: Any, scale: float = 1.5, lerp: float = 0.9) -> Any:
    """The trust-region soft clip ``clip(s·φ(y/s), -2, 2)`` with
    ``φ(x) = (1-lerp)·sign(x)·log(1+|x|) + lerp·tanh(x)``: heavyball's ``trust_region_clip_``,
    clamp included (kron_torch 2024's trust region is the same ``φ``). The log term grows without
    bound, so without the clamp an entry of 10⁶ would still come out at 3.4 with ``s = 1.5``."""
    x = y / scale
    soft = scale * ((1.0 - lerp) * ops.sign(x) * ops.log1p(ops.abs(x)) + lerp * ops.tanh(x))
    return ops.clip(soft, -SOFT_CLIP_BOUND, SOFT_CLIP_BOUND)


def l2_clip_factor(y: Any, max_norm: float, ops: Any) -> Any:
    """``min(1, max_norm / ‖y[s]‖₂)`` per leading index, shaped to broadcast against ``y``."""
    return shrink_factor(norm_per_parameter(y, ops), max_norm, ops)


def clip_l2(y: Any, max_norm: float, ops: Any) -> Any:
    """``y · min(1, max_norm / ‖y‖₂)`` per leading index."""
    return y * ops.astype(l2_clip_factor(y, max_norm, ops), ops.dtype(y))


def mars_correction(grad: Any, previous: Any, beta: float, gamma: float, ops: Any) -> Any:
    """MARS variance reduction (Yuan et al., 2024): ``g + γ·β/(1-β)·(g - g_prev)``, elementwise,
    as heavyball's ``mars_correction`` (whose option this is) computes it. Not rescaled: the
    paper caps the corrected gradient's norm at 1, heavyball does not, and a front end that wants
    the cap applies a gradient clip of its own."""
    return grad + (gamma * beta / (1.0 - beta)) * (grad - previous)


def cautious(y: Any, grad: Any, ops: Any) -> Any:
    """Cautious update (Liang et al., 2024): zero the entries of ``y`` whose sign disagrees with the
    gradient and rescale the rest by the inverse kept fraction (at most 1000×)."""
    keep = ops.astype(y * grad > 0, ops.dtype(y))
    kept = ops.mean(keep, axis=tuple(range(1, len(y.shape))), keepdims=True)
    return y * keep / ops.maximum(kept, 1e-3)
