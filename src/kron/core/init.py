"""Initial state of the preconditioner (algorithm.md §2.4).

``Q_0 = scale·I`` spread evenly over the ``k`` factors (``scale^(1/k)`` each); for the geometries
whose state is ``P`` the scale is squared first. The scale is fixed, or set from the first
gradients by the 4th-moment rule ``(mean g⁴ + δ⁴)^(-1/8)``, which makes the first ``P·g`` have an
RMS of about 0.76 for Gaussian ``g``.
"""

from __future__ import annotations

import numbers
from typing import Any

from kron.core.layout import Plan


def init_factors(
    plan: Plan, scale: Any, like: Any, ops: Any, state_is_p: bool = False, stack: int = 1
) -> list[Any]:
    """Factors for ``stack`` parameters of ``plan`` in the dtype/device of ``like``.

    ``scale`` is a float, a scalar array, or a ``(stack·B,)`` array (one scale per block). Dense
    factors are ``(stack·B, n, n)``, diagonal ones ``(stack·B, n)``.
    """
    if state_is_p:
        scale = scale * scale
    per_factor = scale ** (1.0 / plan.order)
    if isinstance(per_factor, numbers.Real):  # a NumPy float64 scalar would promote the factors
        per_factor = float(per_factor)
    else:
        per_factor = ops.astype(per_factor, ops.dtype(like))  # factors take like's dtype
    per_block = not isinstance(per_factor, (int, float)) and len(per_factor.shape) == 1
    blocks = stack * plan.num_blocks
    factors = []
    for n, dense in zip(plan.block_shape, plan.dense):
        ones = ops.ones((blocks, 1, 1) if dense else (blocks, n), like)
        start = ops.eye(n, like) * ones if dense else ones
        factor_scale = (
            ops.reshape(per_factor, ones.shape[:1] + (1,) * (len(ones.shape) - 1))
            if per_block
            else per_factor
        )
        factors.append(start * factor_scale)
    return factors


def init_lipschitz(plan: Plan, like: Any, ops: Any, stack: int = 1) -> list[Any]:
    """``L_i = 0`` per factor, each ``(stack·B,)``."""
    return [ops.zeros((stack * plan.num_blocks,), like) for _ in plan.block_shape]


def fourth_moment(x: Any, ops: Any) -> Any:
    """``mean(x⁴)`` over all entries: the statistic of the automatic init scale.

    Formed as ``max|x|⁴ · mean((x/max|x|)⁴)``, so no intermediate overflows or underflows, and a
    result outside x's dtype is clamped into it: an overflow (float32 |x| past about 1e9) to
    ``1/tiny``, an underflow of a nonzero x (float32 |x| below about 1e-10) to ``tiny``. The
    scale it gives is then off by at most ``(|x|/1e9)^½`` for huge x, and within 1 % for tiny x,
    where the damping ``δ⁴`` dominates; a plain ``mean(x⁴)`` gave inf or 0 there, which
    :func:`scale_from_moments` turns into its fallback 1.0. A zero x gives 0 and a non-finite x
    a non-finite value, as before."""
    largest = ops.max(ops.abs(x))
    finite = ops.isfinite(largest)
    unit = ops.where(finite & (largest > 0), largest, ops.ones(largest.shape, largest))
    y = x / unit
    y2 = y * y
    tiny = ops.tiny(ops.dtype(largest))
    # max|x| capped where its 4th power would pass 1/tiny, so nothing overflows on the way.
    capped = ops.minimum(unit, (1.0 / tiny) ** 0.25)
    c2 = capped * capped
    moment = ops.mean(y2 * y2) * c2 * c2
    huge = ops.ones(moment.shape, moment) * (1.0 / tiny)
    moment = ops.where(unit > capped, huge, ops.maximum(moment, tiny))
    moment = ops.where(largest > 0, moment, ops.zeros(moment.shape, moment))
    return ops.where(finite, moment, largest)


def scale_from_moments(
    fourth: Any, ops: Any, damping: float = 1e-9, probe_second: Any = None
) -> Any:
    """The automatic init scale from ``fourth = mean(g⁴)`` (max over tensors for one global
    scale). Newton type passes ``probe_second = mean(v²)`` and gets ``(mean v²)^(1/4)`` times the
    whitening scale. Falls back to 1.0 when ``fourth`` is zero or not finite, so a zero or broken
    first gradient never yields a huge or NaN preconditioner."""
    usable = ops.isfinite(fourth) & (fourth > 0)
    safe = ops.where(usable, fourth, ops.ones(fourth.shape, fourth))
    scale = (safe + damping**4) ** (-1.0 / 8.0)
    if probe_second is not None:
        scale = scale * probe_second**0.25
    return ops.where(usable, scale, ops.ones(scale.shape, scale))


def shared_scale(fourth_moments: list[Any], ops: Any, damping: float = 1e-9) -> Any:
    """One init scale for every tensor, from the largest 4th moment (psgd_torch's "more
    conservative" rule since 2025-09): ``(max_t mean g_t⁴ + δ⁴)^(-1/8)``. Non-finite moments are
    ignored; if none is usable the scale is 1.0."""
    usable = [ops.where(ops.isfinite(m), m, ops.zeros(m.shape, m)) for m in fourth_moments]
    largest = usable[0]
    for m in usable[1:]:
        largest = ops.maximum(largest, m)
    return scale_from_moments(largest, ops, damping)
