"""The preconditioner's update in one variable's step of :class:`kron.keras.Kron`.

:func:`update` gives the factors, Lipschitz estimates and cache that the step applies: the stored
ones, or, on a step that fits (or, with ``precond_init_scale=None``, a variable's first step),
new ones. Both outcomes are traced once and picked with :func:`kron.keras.native.cond`, so a
compiled train step never retraces. The function reads and writes no optimizer variable: the
caller reads the state and stores the result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from keras import ops as kops

from kron.core import (
    Plan,
    StepOptions,
    TensorState,
    balance,
    fourth_moment,
    get_ops,
    kron_step,
    scale_from_moments,
)
from kron.keras import native

OPS = get_ops("keras")
SUBSPACE_PROBES = 32  # rows of the norm-bound probes for norm_bound="subspace" (psgd_torch's)


class FitSettings(NamedTuple):
    """The optimizer's options that a preconditioner update reads (``dtype``: ``precond_dtype``;
    ``scale_from_gradient``: ``precond_init_scale=None``; the others are the options of those
    names)."""

    options: StepOptions
    precond_lr: float
    balance_probability: float
    norm_bound: str
    damping: float
    dtype: str
    scale_from_gradient: bool


class DrawKey(NamedTuple):
    """What keys one variable's random draws: ``seed()`` and ``step()`` read the optimizer's
    seed and step, and are called where a draw is made, so the reads (and the step's division
    under gradient accumulation) stay inside the branch that uses them."""

    seed: Callable[[], Any]
    step: Callable[[], Any]
    index: int


def update(
    old: TensorState,
    grad: Any,
    count: Any,
    finite: Any,
    fit: Any,
    *,
    plan: Plan,
    key: DrawKey,
    settings: FitSettings,
) -> tuple[Any, ...]:
    """``(factors, lipschitz, cache)`` for this step of the variable ``key.index``.

    ``old`` is its stored state, ``grad`` its gradient as ``(1, *shape)`` (zeros where not
    ``finite``), ``count`` its update count and ``fit`` this step's decision."""

    def changed() -> tuple[Any, ...]:
        """The first update's automatic init scale, then this step's fit if any."""
        start = old
        if settings.scale_from_gradient:
            start = _scale_at_first_step(old, grad, count, plan, settings)
        return native.cond(
            fit, _fit(start, grad, count, finite, plan, key, settings), lambda: _parts(start)
        )

    # Only the preconditioner's update sits under the conds; applying it runs outside, so a
    # step that does not fit takes the cheap branch and XLA schedules the products freely.
    first = count == 0 if settings.scale_from_gradient else False
    return native.cond(kops.logical_or(fit, first), changed, lambda: _parts(old))


def _parts(state: TensorState) -> tuple[Any, ...]:
    """The parts of ``state`` a fit changes: factors, Lipschitz estimates and cache."""
    return tuple(state.factors), tuple(state.lipschitz), tuple(state.cache)


def _where_tree(flag: Any, new: Any, old: Any) -> Any:
    """``new`` where the scalar ``flag`` holds, else ``old``, over a tensor or tuple of them."""
    if isinstance(new, tuple):
        return tuple(kops.where(flag, a, b) for a, b in zip(new, old))
    return kops.where(flag, new, old)


def _fit(
    old: TensorState,
    grad: Any,
    count: Any,
    finite: Any,
    plan: Plan,
    key: DrawKey,
    settings: FitSettings,
) -> Callable[[], tuple[Any, ...]]:
    """The fit branch: ``kron_step``'s preconditioner update (its direction is not used, so
    the compiler drops it), with a random balance after it. The new factors, estimates and
    cache are kept only when the gradient was ``finite``."""

    def run() -> tuple[Any, ...]:
        inputs = _fit_inputs(key, plan, settings)
        _, new = kron_step(
            old,
            grad,
            count,
            inputs.pop("noise"),
            plan=plan,
            options=settings.options,
            precond_lr=settings.precond_lr,
            do_fit=True,
            ops=OPS,
            mask=_mask(plan, old.factors[0].dtype),
            **inputs,
        )
        factors = tuple(new.factors)
        if settings.balance_probability > 0 and plan.order > 1:
            draw = native.uniform(key.seed(), key.step(), key.index, native.BALANCE)
            factors = native.cond(
                draw < settings.balance_probability,
                lambda: tuple(balance(factors, OPS)),
                lambda: factors,
            )
        return (
            _where_tree(finite, tuple(factors), old.factors),
            _where_tree(finite, tuple(new.lipschitz), old.lipschitz),
            _where_tree(finite, tuple(new.cache), old.cache),
        )

    return run


def _fit_inputs(key: DrawKey, plan: Plan, settings: FitSettings) -> dict[str, Any]:
    """The fit's random draws: the damping noise and, for ``norm_bound="subspace"``, the probes
    of each axis."""
    seed, step, dtype = key.seed(), key.step(), settings.dtype
    shape = (plan.num_blocks, *plan.block_shape)
    inputs = {"noise": native.normal(seed, step, key.index, native.NOISE, shape, dtype)}
    if settings.norm_bound == "subspace":
        inputs["norm_probes"] = [
            native.normal(
                seed,
                step,
                key.index,
                native.PROBES + axis,
                (plan.num_blocks, SUBSPACE_PROBES, n),
                dtype,
            )
            for axis, n in enumerate(plan.block_shape)
        ]
    return inputs


def _mask(plan: Plan, dtype: Any) -> Any:
    """The plan's padding mask (None without one) in ``dtype``, the factors' dtype: the fit
    combines it with the factors' statistics, and TensorFlow does not promote mixed dtypes."""
    mask = plan.mask()
    return None if mask is None else kops.convert_to_tensor(mask, dtype)


def _scale_at_first_step(
    state: TensorState, grad: Any, count: Any, plan: Plan, settings: FitSettings
) -> TensorState:
    """``precond_init_scale=None``: on a variable's first counted step (count 0), rescale Q
    (and the cache) from that gradient, ``(mean g⁴ + δ⁴)^(-1/8)``. An all-zero gradient gives
    1.0, a no-op, and is not counted (``Kron.update_step``), so the next one rescales."""
    scale = scale_from_moments(fourth_moment(grad, OPS), OPS, settings.damping)
    if settings.options.fit.state_is_p:
        scale = scale * scale
    per_factor = kops.where(count == 0, scale ** (1.0 / plan.order), 1.0)
    return state._replace(
        factors=tuple(f * kops.cast(per_factor, f.dtype) for f in state.factors),
        cache=tuple(p * kops.cast(per_factor * per_factor, p.dtype) for p in state.cache),
    )
