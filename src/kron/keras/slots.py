"""The optimizer variables ("slots") :class:`kron.keras.Kron` keeps for each model variable, and
their conversion to and from the :class:`kron.core.TensorState` that ``kron_step`` takes.

Every piece of per-variable state that changes the trajectory is one of these variables, so
``model.save`` / ``load_model`` and ``stateless_apply`` carry all of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import keras
from keras import ops as kops

from kron.core import Plan, TensorState, cache_preconditioner, get_ops, init_factors

OPS = get_ops("keras")
_FLOAT16_MAX = 65504.0


class Slots(NamedTuple):
    """The optimizer variables of one model variable (``B`` = blocks of its plan)."""

    momentum: Any  # like the variable, in mu_dtype
    factors: tuple  # Q_i (P_i for PRO4P/QUAD4P): (B, n, n) or (B, n), precond_dtype
    lipschitz: tuple  # L_i: (B,), at least float32
    cache: tuple  # P_i = Q_iᵀQ_i when cached (same shapes as factors), else ()
    count: Any  # float32 scalar: momentum updates taken (steps with a finite gradient)


def work_dtype(precond_dtype: str) -> str:
    """The dtype of the gradient, the momentum's average and the Lipschitz estimates: the
    wider of float32 and ``precond_dtype``. Only the products and the fit run in a
    half-precision ``precond_dtype``, so it neither overflows a finite gradient (float16)
    nor rounds the momentum's average (bfloat16)."""
    return "float64" if precond_dtype == "float64" else "float32"


def add_slots(optimizer: Any, variable: Any, plan: Plan) -> Slots:
    """Create the slots of ``variable`` with ``optimizer.add_variable``, in the order Keras will
    save them by: ``momentum``, ``q{i}``, ``lipschitz{i}``, ``p{i}`` (when cached), ``count``.
    Their dtypes and initial values follow the optimizer's options."""
    # A plain tf.Variable has no path; Keras's own optimizers name its slots by its name.
    prefix = getattr(variable, "path", None) or str(variable.name).replace(":", "_")
    prefix = prefix.replace("/", "_")
    options = optimizer.step_options
    precond_dtype = optimizer.precond_dtype
    momentum = optimizer.add_variable(
        variable.shape,
        dtype=optimizer.mu_dtype or keras.backend.standardize_dtype(variable.dtype),
        name=f"{prefix}_momentum",
    )
    like = kops.zeros((), precond_dtype)
    start = init_factors(
        plan, optimizer.precond_init_scale or 1.0, like, OPS, options.fit.state_is_p
    )
    factors = tuple(
        optimizer.add_variable(f.shape, _constant(f), dtype=precond_dtype, name=f"{prefix}_q{i}")
        for i, f in enumerate(start)
    )
    lipschitz = tuple(
        optimizer.add_variable(
            (f.shape[0],), dtype=work_dtype(precond_dtype), name=f"{prefix}_lipschitz{i}"
        )
        for i, f in enumerate(start)
    )
    cache = ()
    if options.cache and not options.fit.state_is_p:  # PRO4P and QUAD4P store P itself
        cache = tuple(
            optimizer.add_variable(
                p.shape, _constant(p), dtype=precond_dtype, name=f"{prefix}_p{i}"
            )
            for i, p in enumerate(cache_preconditioner(start, OPS))
        )
    count = optimizer.add_variable((), dtype="float32", name=f"{prefix}_count")
    return Slots(momentum, factors, lipschitz, cache, count)


def _constant(value: Any) -> Callable[..., Any]:
    """A Keras initializer returning ``value`` (already of the right shape and dtype)."""

    def initializer(shape: Any, dtype: Any = None) -> Any:
        return kops.cast(value, dtype) if dtype is not None else value

    return initializer


def read_slots(slots: Slots, work: str) -> tuple[TensorState, Any]:
    """The stored state as tensors (momentum stacked as ``(1, *shape)`` in the ``work`` dtype),
    and the update count."""
    read = kops.convert_to_tensor
    momentum = kops.cast(read(slots.momentum), work)
    state = TensorState(
        tuple(read(f) for f in slots.factors),
        tuple(read(f) for f in slots.lipschitz),
        kops.expand_dims(momentum, 0),
        tuple(read(f) for f in slots.cache),
    )
    return state, read(slots.count)


def write_slots(optimizer: Any, slots: Slots, state: TensorState, counted: Any) -> None:
    """Store ``state`` with ``optimizer.assign`` (Keras routes it to the backend, or to the
    state of ``stateless_apply``) and count the update if ``counted`` (a boolean scalar: the
    gradient was finite, and not one of the leading zeros an automatic init scale waits out)."""
    for variables, values in (
        (slots.factors, state.factors),
        (slots.lipschitz, state.lipschitz),
        (slots.cache, state.cache),
    ):
        for variable, value in zip(variables, values):
            optimizer.assign(variable, value)
    momentum = state.momentum[0]
    stored = keras.backend.standardize_dtype(slots.momentum.dtype)
    if stored == "float16" and keras.backend.standardize_dtype(momentum.dtype) != "float16":
        # A finite momentum past float16's range would be stored as inf and turn the
        # variable to NaN on the next step; the largest finite value is kept instead.
        momentum = kops.clip(momentum, -_FLOAT16_MAX, _FLOAT16_MAX)
    optimizer.assign(slots.momentum, kops.cast(momentum, stored))
    optimizer.assign_add(slots.count, kops.cast(counted, "float32"))
