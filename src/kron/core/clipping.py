"""Clipping the preconditioned update (algorithm.md §6.4). Tensors are ``(B, ...)``; statistics are
per leading index (one parameter, or one stacked parameter)."""

from __future__ import annotations

from typing import Any


def _rms(y: Any, ops: Any) -> Any:
    return ops.sqrt(ops.mean(y * y, axis=tuple(range(1, len(y.shape))), keepdims=True))


def clip_rms(y: Any, max_rms: float, ops: Any) -> Any:
    """``y · min(1, max_rms / RMS(y))``: kron_torch and psgd_jax use 1.1, psgd_torch 2.0."""
    return y * ops.minimum(max_rms / (_rms(y, ops) + 1e-12), 1.0)


def clip_elementwise(y: Any, max_abs: float, ops: Any) -> Any:
    """Clamp every entry to ``[-max_abs, max_abs]``."""
    return ops.clip(y, -max_abs, max_abs)


def soft_clip(y: Any, ops: Any, scale: float = 1.5, lerp: float = 0.9) -> Any:
    """The trust-region soft clip ``s·φ(y/s)`` with
    ``φ(x) = (1-lerp)·sign(x)·log(1+|x|) + lerp·tanh(x)`` (kron_torch 2024, heavyball)."""
    x = y / scale
    return scale * ((1.0 - lerp) * ops.sign(x) * ops.log1p(ops.abs(x)) + lerp * ops.tanh(x))
