"""The static options of a :mod:`kron.optax` transformation, and how each is validated.

:class:`EngineConfig` holds everything static about one transformation (the public constructors
fill it in, and :func:`kron.optax.engine.build` turns it into an ``init``/``update`` pair). The
checks here run when a constructor is called: each raises a ``ValueError`` that names the
option, its accepted values and what it got, rather than failing in a comparison deep inside
the core. A numeric option may be a Python or NumPy real or a 0-d array (what
``optax.inject_hyperparams`` hands over); a schedule option may also be a callable.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kron.core import StepOptions
from kron.optax.sharding import check_axis_options

PRECONDITIONER_TYPES = ("whitening", "newton")


# What a static option arriving as a 0-d array usually means.
INJECTED_HINT = (
    " optax.inject_hyperparams hands every numeric option over as an array unless it is "
    "static: optax.inject_hyperparams(kron, static_args=kron.optax.static_args(kron)) (the "
    "same for quad and skew)."
)


def _seed_or_key_data(seed: Any) -> int | tuple[int, ...]:
    """An int seed as an int; a JAX PRNG key (psgdax passes one as ``key``) as the ints of its
    raw key data, so the frozen config stays hashable; ``ValueError`` for anything else."""
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        return int(seed)
    if isinstance(seed, (jax.Array, np.ndarray)):
        if jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
            seed = jax.random.key_data(seed)
        if seed.shape == (2,) and seed.dtype == np.uint32:
            return tuple(int(word) for word in np.asarray(seed))
    hint = INJECTED_HINT if isinstance(seed, jax.Array) and seed.ndim == 0 else ""
    raise ValueError(f"seed must be an int or a JAX PRNG key (psgdax's key); got {seed!r}.{hint}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything static about one transformation; the public constructors fill it in.

    Attributes:
      step: the core's per-parameter step options.
      precond_lr: μ, a float or a function of the step count.
      update_probability: a float or a function of the step count; ``>= 1`` fits every step and
        traces no ``lax.cond``.
      decision_rule: ``"bernoulli"`` (a uniform draw ``< p``) or ``"counter"`` (every ``1/p``).
      balance_probability: chance per fit of rebalancing each stack's factor norms.
      balance_every: rebalance on fits at steps divisible by this instead (None: use the chance).
      q_dtype: dtype of Q and of the preconditioner arithmetic.
      mu_dtype: dtype of the momentum (None: the param's).
      init_scale: initial ``Q = scale·I``; None sets one scale for all leaves from the first
        gradients (Newton: from the first Hessian-vector products).
      fit_precision, apply_precision: ``jax.default_matmul_precision`` of the fit and of the
        product ``P·m`` (on every step, those that fit included).
      scanned_layers: a bool pytree like the params, a function of the params returning one, or
        None; True marks a leaf whose leading axis stacks layers.
      lax_map_scanned_layers, lax_map_batch_size: walk scanned stacks with ``lax.map``.
      normalize_grads: divide each layer's gradient by its L2 norm first.
      output_scale: multiplies the clipped update (eformer's ``lr_style="adam"`` uses 1/5).
      preconditioner_type: ``"whitening"`` or ``"newton"`` (fit on ``(v, H v)`` pairs computed
        with ``jax.jvp`` of the gradient of the ``value_fn`` extra argument).
      cache: keep ``P_i = Q_iᵀQ_i`` in the state, refreshed on every fit, so that steps without
        a fit apply P with one product per axis instead of two (not for PRO4P/QUAD4P, whose
        state is P already).
      block_axis_name, block_axis_size: the mesh axis (and its size) that the factor stacks are
        split over. With a name, the state keeps one stack per plan, padded with inert rows to a
        multiple of ``block_axis_size``, and while a mesh with that axis is active each device
        stores, fits and applies only its rows (:mod:`kron.optax.sharding`). Default None, 1.
      params_partition_specs: specs of the params; the momentum and the updates follow them.
      seed: seed of the state's PRNG key, or the key itself (psgdax's ``key``: a raw
        ``uint32[2]`` key or a typed one), kept as its key data.
    """

    step: StepOptions
    precond_lr: float | Callable[[jax.Array], jax.Array]
    update_probability: float | Callable[[jax.Array], jax.Array]
    decision_rule: str = "bernoulli"
    balance_probability: float = 0.0
    balance_every: int | None = None
    q_dtype: Any = jnp.float32
    mu_dtype: Any = None
    init_scale: float | None = 1.0
    fit_precision: str | None = None
    apply_precision: str | None = None
    scanned_layers: Any = None
    lax_map_scanned_layers: bool = False
    lax_map_batch_size: int = 8
    normalize_grads: bool = False
    output_scale: float = 1.0
    preconditioner_type: str = "whitening"
    cache: bool = False
    block_axis_name: str | None = None
    block_axis_size: int = 1
    params_partition_specs: Any = None
    seed: int = 42

    def __post_init__(self) -> None:
        object.__setattr__(self, "seed", _seed_or_key_data(self.seed))
        if self.decision_rule not in ("bernoulli", "counter"):
            raise ValueError(
                f"Unknown decision_rule {self.decision_rule!r}; accepted: 'bernoulli', 'counter'."
            )
        if self.preconditioner_type not in PRECONDITIONER_TYPES:
            raise ValueError(
                f"Unknown preconditioner_type {self.preconditioner_type!r}; accepted: "
                f"{', '.join(repr(t) for t in PRECONDITIONER_TYPES)}."
            )
        if self.init_scale is not None:
            require_option(
                "preconditioner_init_scale",
                self.init_scale,
                lambda v: 0 < v < math.inf,
                "finite and > 0, or None",
            )
        if (
            isinstance(self.lax_map_batch_size, bool)
            or not isinstance(self.lax_map_batch_size, numbers.Integral)
            or self.lax_map_batch_size < 0
        ):
            raise ValueError(
                f"lax_map_batch_size must be an int >= 0; got {self.lax_map_batch_size!r}."
            )
        # 0 maps one layer at a time, as 1 does (psgdax's reading of any size below 2).
        object.__setattr__(self, "lax_map_batch_size", max(1, int(self.lax_map_batch_size)))
        check_axis_options(self.block_axis_name, self.block_axis_size)
        object.__setattr__(self, "block_axis_size", int(self.block_axis_size))  # NumPy ints too
        require_option(
            "balance_probability", self.balance_probability, lambda v: 0 <= v <= 1, "in [0, 1]"
        )
        require_option(
            "preconditioner_update_probability",
            self.update_probability,
            lambda v: v >= 0,
            ">= 0 (>= 1: every step) or a schedule",
            schedule=True,
        )
        require_option(
            "preconditioner_lr",
            self.precond_lr,
            lambda v: 0 < v < math.inf,
            "finite and > 0, or a schedule",
            schedule=True,
        )
        object.__setattr__(self, "q_dtype", float_dtype("precond_dtype", self.q_dtype))
        object.__setattr__(self, "mu_dtype", float_dtype("mu_dtype", self.mu_dtype, optional=True))

    @property
    def newton(self) -> bool:
        return self.preconditioner_type == "newton"

    @property
    def stacked_state(self) -> bool:
        """Whether the state keeps factors per stack (sharded over a mesh axis) or per leaf."""
        return self.block_axis_name is not None

    @property
    def row_multiple(self) -> int:
        """Stored stacks are padded to a multiple of this many rows."""
        return self.block_axis_size if self.stacked_state else 1

    @property
    def state_is_p(self) -> bool:
        """Whether the factors are ``P_i`` themselves (PRO4P, QUAD4P) rather than ``Q_i``."""
        return self.step.fit.state_is_p

    @property
    def caching(self) -> bool:
        """Whether the state keeps ``P_i = Q_iᵀQ_i`` (never when the state is P already)."""
        return self.cache and not self.state_is_p

    @property
    def lip_dtype(self) -> Any:
        """Dtype of the Lipschitz estimates, the gradients and the momentum's average:
        ``q_dtype`` promoted to at least float32."""
        return jnp.promote_types(self.q_dtype, jnp.float32)

    @property
    def always_fit(self) -> bool:
        """Whether every step fits (an update probability ``>= 1``), so no ``lax.cond`` decides."""
        return not callable(self.update_probability) and self.update_probability >= 1.0


def require_option(
    name: str, value: Any, ok: Callable[[Any], bool], accepted: str, schedule: bool = False
) -> None:
    """``ValueError`` naming option ``name`` unless ``value`` is a number with ``ok(value)``, or,
    with ``schedule``, a callable. A number is a Python or NumPy real (not a bool, which would
    count as 1) or a 0-d real array (``optax.inject_hyperparams`` hands options over as such
    arrays; a traced one, inside ``jit``, cannot be compared, so only its kind is checked).
    Anything else (a string, None, an array of several values) is refused here rather than in a
    comparison deep inside the core."""
    if schedule and callable(value):
        return
    number = _option_number(value)
    if number is None:
        got = (
            f"a {value.dtype} array of shape {tuple(value.shape)}"
            if isinstance(value, (jax.Array, np.ndarray)) and np.ndim(value) > 0
            else repr(value)
        )
        raise ValueError(f"{name} must be {_as_number(accepted)}; got {got}.")
    if number is not _TRACED and not ok(number):
        raise ValueError(f"{name} must be {accepted}; got {value!r}.")


# A traced number: of the right kind, but its value is not known until the step runs.
_TRACED = object()


def _option_number(value: Any) -> Any:
    """``value`` as a Python number, :data:`_TRACED` for a traced (or not addressable) 0-d real
    array, or None if it is no number."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, numbers.Real):
        return value
    if not isinstance(value, (jax.Array, np.ndarray)):
        return None
    real = jnp.issubdtype(value.dtype, jnp.integer) or jnp.issubdtype(value.dtype, jnp.floating)
    if np.ndim(value) != 0 or not real:
        return None
    if isinstance(value, jax.core.Tracer) or not getattr(value, "is_fully_addressable", True):
        return _TRACED
    return value.item()


def _as_number(accepted: str) -> str:
    """A range as a kind: ``"in [0, 1)"`` -> ``"a number in [0, 1)"``, ``"finite and > 0"`` ->
    ``"a finite number > 0"``; ``"a whole number >= 0"`` names its kind already."""
    if accepted.startswith("a "):
        return accepted
    finite = "finite and "
    if accepted.startswith(finite):
        return f"a finite number {accepted[len(finite) :]}"
    return f"a number {accepted}"


def check_chain_options(learning_rate: Any, weight_decay: Any) -> None:
    """``ValueError`` naming ``learning_rate`` or ``weight_decay`` unless each is a finite number
    >= 0 or a schedule (or a 0-d array: ``optax.inject_hyperparams`` hands them over as arrays,
    traced inside ``jit``). optax's chain takes anything: nan or inf stepped the params to NaN,
    and a string failed inside the first update."""
    for name, value in (("learning_rate", learning_rate), ("weight_decay", weight_decay)):
        require_option(name, value, _finite_nonnegative, "finite and >= 0, or a schedule", True)


def _finite_nonnegative(value: float) -> bool:
    return 0 <= value < math.inf


def decays_weights(weight_decay: Any) -> bool:
    """Whether a chain needs ``optax.add_decayed_weights``: for a number > 0, a schedule, or an
    array (``optax.inject_hyperparams`` hands the option over as one, to be changed between
    steps, as with ``optax.adamw``), but not for a plain 0."""
    return not isinstance(weight_decay, numbers.Real) or weight_decay > 0


# The dtypes Q, the momentum and the arithmetic may take. An 8-bit float has no implicit
# promotion to float32 in JAX (precond_dtype's raised a raw TypePromotionError in init);
# float16's narrow range is handled (a gradient past it counts as non-finite).
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def float_dtype(
    name: str, value: Any, accepted: tuple[str, ...] = FLOAT_DTYPES, optional: bool = False
) -> Any:
    """``value`` (a dtype or its name) as one of the ``accepted`` dtypes, None for None when
    ``optional`` (the option's default), or ``ValueError`` naming option ``name``. None is not
    taken as a dtype otherwise (NumPy reads it as float64), nor is a bool."""
    if value is None and optional:
        return None
    dtype = None
    if value is not None and not isinstance(value, (bool, np.bool_)):
        try:
            dtype = jnp.dtype(value)
        except TypeError:
            dtype = None
    if dtype is None or dtype.name not in accepted:
        listing = f"{', '.join(accepted[:-1])} or {accepted[-1]}"
        got = repr(value) if dtype is None else dtype.name
        raise ValueError(
            f"{name} must be a floating-point dtype: {listing}{', or None' if optional else ''}; "
            f"got {got}."
        )
    return dtype


def precision(name: str | None) -> Any:
    """The context of a precision option (``fit_precision``, ``apply_precision``):
    ``jax.default_matmul_precision(name)``, or none for None."""
    return jax.default_matmul_precision(name) if name else nullcontext()


__all__ = [
    "FLOAT_DTYPES",
    "INJECTED_HINT",
    "PRECONDITIONER_TYPES",
    "EngineConfig",
    "check_chain_options",
    "decays_weights",
    "float_dtype",
    "require_option",
]
