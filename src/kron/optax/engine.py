"""The machinery behind every :mod:`kron.optax` transformation.

Leaves are grouped into stacks by :mod:`kron.optax.stacks`; a leaf flagged as scanned
contributes its leading axis as ``S`` stacked layers, each with its own factors and statistics.
Leaves (and layers) that share a plan are fitted as one stack, so a model with ten ``256×256``
weights traces one batched fit instead of ten: the traced fit, and so the compile time, grows
with the number of distinct shapes, not of leaves. Scanned stacks may instead be fitted with
``lax.map`` in chunks of ``lax_map_batch_size`` layers, which trades speed for peak memory; both
paths compute the same numbers. The momentum and ``P·m`` run leaf by leaf, outside the
``lax.cond`` of the fit.

Where the factors live depends on ``EngineConfig.block_axis_name``:

* ``None`` (the default): the state keeps factors per leaf, so it mirrors the param tree; stacks
  are assembled inside the jitted update, for the fit only.
* a mesh axis name: the state keeps one stack per plan, padded with inert rows (identity factors,
  zero inputs, never kept) to a multiple of ``block_axis_size``, so the stack splits evenly over
  the axis and every device stores, fits and applies only its own rows; the directions go back to
  the leaves (and the params' sharding) after ``P·m``. This is the distributed-Shampoo pattern
  that eformer calls ``pipeline_axis_name``.

Whether to fit P is decided inside the update (``lax.cond``), and every random draw is folded from
the state's key with the step, the stack index and a stream number (:func:`kron.optax.leaf_key`),
so a restored state repeats the run that never stopped, every host of a multi-host run draws the
same numbers, and a sharded run draws what the unsharded one does (padding rows get zeros).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import dtypes
from jax.sharding import PartitionSpec

from kron.core import (
    Plan,
    StepOptions,
    balance,
    cache_preconditioner,
    counter_decision,
    finite_rows,
    fit,
    fourth_moment,
    get_ops,
    init_factors,
    init_lipschitz,
    overflow_limit,
    precondition,
    scale_from_moments,
    shared_scale,
    update_momentum,
)
from kron.core.step import clip_update
from kron.optax.sharding import (
    check_axis_options,
    check_mesh,
    constrain,
    constrain_like_params,
    constrain_rows,
    constrain_spec,
    specs_like,
)
from kron.optax.stacks import (
    LeafLayout,
    Stack,
    concat_rows,
    leaf_layouts,
    pad_rows,
    scanned_flags,
    split_rows,
    stacks_of,
)
from kron.optax.state import KronState, leaf_key

OPS = get_ops("jax")
# Stream identifiers folded into a stack's key.
NOISE, NORM_PROBES, BALANCE, DECISION, NEWTON_PROBE = range(5)
SUBSPACE_PROBES = 32
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
      fit_precision, apply_precision: ``jax.default_matmul_precision`` on fitting and on
        preconditioning-only steps.
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


def _precision(name: str | None):
    return jax.default_matmul_precision(name) if name else _NoContext()


class _NoContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _check_leaves(params: Any, flags: list[bool]) -> None:
    """Refuse by name the leaves the fit cannot take: complex ones would lose their imaginary
    part in the real-valued fit, and empty ones (a scanned leaf of zero layers too) have
    nothing to precondition."""
    for (path, leaf), scanned in zip(jax.tree_util.tree_flatten_with_path(params)[0], flags):
        shape = jnp.shape(leaf)
        if 0 in shape:
            raise ValueError(
                f"kron.optax cannot precondition an empty leaf; got shape {shape} at "
                f"{jax.tree_util.keystr(path) or 'the root'}"
                f"{' (scanned: zero layers)' if scanned and shape[0] == 0 else ''}. Leave it "
                "out with optax.masked, or step it with another transformation "
                "(optax.multi_transform)."
            )
        if jnp.iscomplexobj(leaf):
            raise ValueError(
                f"kron.optax does not support complex parameters; got {jnp.result_type(leaf)} "
                f"at {jax.tree_util.keystr(path) or 'the root'}. Accepted: real floating-point "
                "leaves; keep a complex parameter as its real and imaginary parts, "
                "jnp.stack([z.real, z.imag], -1)."
            )


def build(config: EngineConfig) -> optax.GradientTransformationExtraArgs:
    """The ``init``/``update`` pair of ``config``. ``update(updates, state, params=None, *,
    value_fn=None)``; Newton type needs ``params`` and ``value_fn(params) -> loss``.

    Factors, Lipschitz estimates and caches travel through the update as *units*: a list of
    per-factor tuples, one unit per leaf (per-leaf state) or per stack (stacked state)."""
    options = config.step
    q_dtype = jnp.dtype(config.q_dtype)
    lip_dtype = jnp.promote_types(q_dtype, jnp.float32)
    state_is_p = options.fit.state_is_p
    always_fit = not callable(config.update_probability) and config.update_probability >= 1.0
    caching = config.cache and not state_is_p
    stacked = config.stacked_state
    axis = config.block_axis_name
    if not options.fit_before_apply:
        raise ValueError("kron.optax fits P before applying it; fit_before_apply must be True.")
    templates: dict[Plan, Any] = {}  # _unit_template's, per plan

    def init_fn(params: Any) -> KronState:
        check_mesh(axis, config.block_axis_size)
        flags = scanned_flags(config.scanned_layers, params)
        _check_leaves(params, flags)
        leaves, treedef = jax.tree.flatten(params)
        leaves = [jnp.asarray(x) for x in leaves]  # a Python number is a leaf too
        layouts = leaf_layouts(leaves, flags, config.step.layout)
        scale = 1.0 if config.init_scale is None else config.init_scale
        if stacked:
            shapes = [(s.plan, s.rows) for s in stacks_of(layouts, config.row_multiple)]
        else:
            shapes = [(lay.plan, lay.blocks) for lay in layouts]
        factors = [_initial_factors(plan, scale, rows) for plan, rows in shapes]
        lipschitz = [_initial_lipschitz(plan, rows) for plan, rows in shapes]
        pack = tuple if stacked else treedef.unflatten
        state = KronState(
            count=jnp.zeros((), jnp.int32),
            mu=treedef.unflatten([jnp.zeros(x.shape, config.mu_dtype or x.dtype) for x in leaves]),
            factors=pack(factors),
            lipschitz=pack(lipschitz),
            decision_total=jnp.zeros((), jnp.float32),
            needs_scale_init=jnp.asarray(config.init_scale is None),
            skipped=treedef.unflatten([jnp.zeros((), jnp.int32) for _ in leaves]),
            key=(
                jax.random.PRNGKey(config.seed)
                if isinstance(config.seed, int)
                else jnp.asarray(config.seed, jnp.uint32)
            ),
            cache=pack([_cached(f) for f in factors]),
        )
        return _constrain(state)

    def update_fn(
        updates: Any, state: KronState, params: Any = None, value_fn: Any = None, **extra: Any
    ) -> tuple[Any, KronState]:
        del extra
        check_mesh(axis, config.block_axis_size)
        if config.newton and (params is None or value_fn is None):
            raise ValueError(
                "preconditioner_type='newton' needs update(grads, state, params, "
                "value_fn=loss_of_params); got "
                f"params={'None' if params is None else 'given'}, "
                f"value_fn={'None' if value_fn is None else 'given'}."
            )
        grads, treedef = jax.tree.flatten(updates)
        grads = [jnp.asarray(g) for g in grads]  # a Python number is a 0-d leaf, as in init
        if not grads:  # nothing to precondition (optax.masked or multi_transform left none)
            return updates, state
        # The checks run while tracing, so a jitted step pays nothing for them.
        if not stacked:
            _check_per_leaf(state, treedef)
        _check_gradients(state, updates, treedef, grads)
        layouts = leaf_layouts(
            grads, scanned_flags(config.scanned_layers, updates), config.step.layout
        )
        stacks = stacks_of(layouts, config.row_multiple)
        if stacked:
            _check_stacked(state, stacks)
        _check_units(state, updates, treedef, layouts, stacks)
        count = state.count

        # The gradient and the momentum's average are handled in at least float32 (lip_dtype):
        # only the fit and the product take their inputs in q_dtype, so half-precision factors
        # neither round the average (bfloat16) nor overflow a finite gradient (float16).
        layered = [
            jnp.reshape(g.astype(lip_dtype), (lay.layers, *lay.plan.shape))
            for g, lay in zip(grads, layouts)
        ]
        # Non-finite layers are not zeroed here: each use below selects on `finite` instead (the
        # momentum, the fit's inputs, the product's output), which costs no pass of its own. With
        # float16 factors a gradient past float16's range counts as non-finite.
        finite = [finite_rows(g, OPS, overflow_limit(q_dtype)) for g in layered]
        if config.normalize_grads:
            layered = [_normalize(g) for g in layered]
        mu = [
            jnp.reshape(m.astype(lip_dtype), g.shape)
            for m, g in zip(treedef.flatten_up_to(state.mu), layered)
        ]
        momenta = mu
        if options.beta > 0:
            steps = count.astype(lip_dtype)

            def kept_momentum(m: Any, g: Any, ok: Any) -> Any:
                """The new momentum, or the old one where the gradient was not finite."""
                new = update_momentum(m, g, steps, options.beta, options.momentum_rule, OPS)
                return jnp.where(_expand(ok, new), new, m)

            momenta = [kept_momentum(m, g, ok) for m, g, ok in zip(mu, layered, finite)]
        # The product reads the kept momentum, the buffer the state is written from.
        averaged = momenta if options.beta > 0 else layered
        targets = averaged if options.whiten_momentum else layered
        applied = averaged if options.precondition_momentum else layered
        targets = [t.astype(q_dtype) for t in targets]
        applied = [a.astype(q_dtype) for a in applied]
        if stacked and config.params_partition_specs is not None:
            specs = jax.tree.leaves(specs_like(updates, config.params_partition_specs))
            targets = _like_params(targets, specs, grads)
            applied = _like_params(applied, specs, grads)

        def units(tree: Any) -> list[tuple[Any, ...]]:
            return [tuple(u) for u in (tree if stacked else treedef.flatten_up_to(tree))]

        factors, lipschitz, cache = units(state.factors), units(state.lipschitz), units(state.cache)
        # Work that may need collectives (a reduction over sharded gradients, resharding them
        # into rows) runs outside the lax.conds below: XLA:CPU may run a conditional at the same
        # time as a collective outside it, and host devices then wait on each other forever.
        auto_scale = config.init_scale is None and not config.newton
        # Only the first update uses the scale; a per-leaf state computes it inside that
        # update's branch rather than reducing every gradient on every step.
        scale = _whitening_scale(layered) if auto_scale and stacked else None
        target_rows = None
        if stacked and not config.newton:
            finite_targets = _zero_nonfinite(targets, finite)
            target_rows = [
                _rows(stack, [finite_targets[i] for i in stack.members]) for stack in stacks
            ]
        do_fit, decision_total = _decide(state, count)
        precond_lr = config.precond_lr(count) if callable(config.precond_lr) else config.precond_lr
        # Per-row flags of finite gradients, made here (resharding them may need collectives)
        # and used by both the fit's selection and the product outside it.
        unit_finite = _unit_flags(finite, layouts, stacks)

        def fit_branch(f: list, c: list) -> Any:
            with _precision(config.fit_precision):
                new_f, new_l, new_c, fit_ok, newton_scaled = _fit_all(
                    state,
                    f,
                    lipschitz,
                    _zero_nonfinite(targets, finite),
                    target_rows,
                    layouts,
                    stacks,
                    precond_lr,
                    params,
                    value_fn,
                )
            # A layer keeps its fitted factors only if its gradient (and Newton pair) was finite.
            rows = unit_finite
            if config.newton:
                keep = [ok & pair_ok for ok, pair_ok in zip(finite, fit_ok)]
                rows = _unit_flags(keep, layouts, stacks)
            return (
                _select_units(rows, new_f, f),
                _select_units(rows, new_l, lipschitz),
                _select_units(rows, new_c, c),
                fit_ok,
                newton_scaled,
            )

        def keep_branch(f: list, c: list) -> Any:
            unchanged = [jnp.ones((lay.layers,), bool) for lay in layouts]
            return f, lipschitz, c, unchanged, jnp.asarray(False)

        def changed_branch() -> Any:
            """The first update's automatic init scale, then this step's fit if any. Steps that
            do neither skip this branch, so they neither copy nor select the factors."""
            f, c = factors, cache
            if auto_scale:
                f, c = jax.lax.cond(
                    state.needs_scale_init,
                    lambda: _rescaled(f, _whitening_scale(layered) if scale is None else scale),
                    lambda: (f, c),
                )
            if always_fit:
                return fit_branch(f, c)
            return jax.lax.cond(do_fit, fit_branch, keep_branch, f, c)

        if always_fit:
            fitted = changed_branch()
        else:
            changes = do_fit | state.needs_scale_init if auto_scale else do_fit
            fitted = jax.lax.cond(changes, changed_branch, lambda: keep_branch(factors, cache))
        kept_factors, kept_lips, kept_cache, fit_ok, newton_scaled = fitted
        # A layer keeps its new momentum, and gets a nonzero update, only if its gradient (and
        # Newton pair) was finite.
        keep = [ok & pair_ok for ok, pair_ok in zip(finite, fit_ok)] if config.newton else finite
        rows = _unit_flags(keep, layouts, stacks) if config.newton else unit_finite
        with _precision(config.apply_precision):
            directions = _apply_all(kept_factors, kept_cache, applied, layouts, stacks, keep, rows)
        kept_mu = momenta
        if config.newton:
            kept_mu = [jnp.where(_expand(k, m), m, old) for k, m, old in zip(keep, momenta, mu)]
        if stacked:
            kept_factors, kept_lips, kept_cache = map(tuple, (kept_factors, kept_lips, kept_cache))
        else:
            kept_factors, kept_lips, kept_cache = map(
                treedef.unflatten, (kept_factors, kept_lips, kept_cache)
            )

        new_updates, new_mu, new_skipped = [], [], []
        for k, y, g, m, old_m, skipped in zip(
            keep,
            directions,
            grads,
            kept_mu,
            treedef.flatten_up_to(state.mu),
            treedef.flatten_up_to(state.skipped),
        ):
            y = y * config.output_scale
            new_updates.append(jnp.reshape(y, g.shape).astype(g.dtype))
            new_mu.append(jnp.reshape(m, old_m.shape).astype(old_m.dtype))
            new_skipped.append(skipped + jnp.sum(~k).astype(jnp.int32))
        # A step on which every gradient was skipped is not counted (the momentum's bias
        # correction counts the updates it took) and leaves the automatic scale to come.
        any_finite = jnp.any(jnp.stack([jnp.any(ok) for ok in finite]))
        scaled = newton_scaled if config.newton else any_finite & (config.init_scale is None)
        new_state = KronState(
            count=jnp.where(any_finite, optax.safe_int32_increment(count), count),
            mu=treedef.unflatten(new_mu),
            factors=kept_factors,
            lipschitz=kept_lips,
            decision_total=jnp.where(
                any_finite, jnp.asarray(decision_total, jnp.float32), state.decision_total
            ),
            needs_scale_init=state.needs_scale_init & ~scaled,
            skipped=treedef.unflatten(new_skipped),
            key=state.key,
            cache=kept_cache,
        )
        new_updates = constrain_like_params(
            treedef.unflatten(new_updates), config.params_partition_specs
        )
        return new_updates, _constrain(new_state)

    def _check_per_leaf(state: KronState, treedef: Any) -> None:
        """A per-leaf state must have the params' structure: one made with a
        ``pipeline_axis_name`` holds factor stacks instead, and JAX's own mismatch error would
        print every array of it."""
        try:
            for tree in (state.factors, state.lipschitz, state.cache):
                treedef.flatten_up_to(tree)
        except (ValueError, TypeError):
            raise ValueError(
                f"the state's factors do not have these params' structure ({treedef.num_leaves} "
                "leaves): the state was built for other params, or with pipeline_axis_name set "
                "(it then holds factor stacks, and needs a transformation with the same "
                "pipeline_axis_name and pipeline_axis_size)."
            ) from None

    def _check_gradients(state: KronState, updates: Any, treedef: Any, grads: list) -> None:
        """Each gradient must have its param's shape, which the momentum was given at init: a
        gradient of another shape would otherwise meet the factors in a raw ``dot_general``
        error, naming no leaf. The momentum's dtype must be ``mu_dtype`` when that is set."""
        try:
            momenta = treedef.flatten_up_to(state.mu)
        except (ValueError, TypeError):
            raise ValueError(
                f"the state's momentum does not have these gradients' structure "
                f"({treedef.num_leaves} leaves): the state was built for other params."
            ) from None
        for index, (g, m) in enumerate(zip(grads, momenta)):
            if jnp.shape(g) != jnp.shape(m):
                raise ValueError(
                    f"the gradient at {_leaf_name(updates, index)} has shape {jnp.shape(g)}, but "
                    f"the state's momentum there has shape {jnp.shape(m)}: each gradient must "
                    "have the shape of its param, as given to init."
                )
            # As init stores it: float64 is float32 unless x64 is enabled.
            kept = None if config.mu_dtype is None else dtypes.canonicalize_dtype(config.mu_dtype)
            if kept is not None and jnp.result_type(m) != kept:
                raise ValueError(
                    f"the state's momentum at {_leaf_name(updates, index)} is "
                    f"{jnp.result_type(m)}, but this transformation keeps it in {kept.name}: the "
                    "state was built with another mu_dtype (dtype, in quad and skew)."
                )

    def _check_stacked(state: KronState, stacks: list[Stack]) -> None:
        """A stacked state must hold these stacks with these row counts: one made for another
        ``pipeline_axis_size`` (or other params) fails here with a readable error instead of a
        broadcasting error deep inside the update."""
        found = (
            [tuple(f.shape[0] for f in unit) for unit in state.factors]
            if isinstance(state.factors, tuple)
            else type(state.factors).__name__
        )
        expected = [tuple(s.rows for _ in range(s.plan.order)) for s in stacks]
        if found != expected:
            raise ValueError(
                f"the state's factor stacks have rows {found}, but these params with "
                f"pipeline_axis_size={config.block_axis_size} need {expected}: the state was "
                "built for other params or another pipeline_axis_size."
            )

    def _check_units(state: KronState, updates: Any, treedef: Any, layouts, stacks) -> None:
        """Each unit's factors, Lipschitz estimates and caches must have the shapes and dtypes
        that init makes for these params. A state built with other options (another layout,
        geometry, dtype or caching) otherwise either ran on with the wrong factors (with
        ``max_skew_triangular=0``, diagonal factors where this transformation fits dense ones)
        or failed inside ``lax.cond`` naming neither the leaf nor the cause."""
        parts = (
            ("factors", state.factors),
            ("Lipschitz estimates", state.lipschitz),
            ("cached preconditioners", state.cache),
        )
        if stacked:
            units = [(stack.plan, stack.rows) for stack in stacks]
            held = [list(tree) for _, tree in parts]
        else:
            units = [(lay.plan, lay.blocks) for lay in layouts]
            held = [treedef.flatten_up_to(tree) for _, tree in parts]
        for index, ((plan, rows), *found) in enumerate(zip(units, *held)):
            for (what, _), have, want in zip(parts, found, _unit_template(plan)):
                have = [(tuple(jnp.shape(x)), jnp.result_type(x)) for x in jax.tree.leaves(have)]
                want = [((rows, *x.shape[1:]), x.dtype) for x in want]
                if have != want:
                    members = stacks[index].members if stacked else [index]
                    where = ", ".join(_leaf_name(updates, i) for i in members)
                    where = f"the stack of {where}" if stacked else where
                    raise ValueError(
                        f"the state's {what} at {where} are {_shapes(have)}, but this "
                        f"transformation makes {_shapes(want)} for these params: the state was "
                        "built with other options (layout, preconditioner mode, dtype or "
                        "caching) or for other params."
                    )

    def _unit_template(plan: Plan) -> Any:
        """Shapes and dtypes of one row's factors, Lipschitz estimates and caches as init makes
        them, traced once per plan (nothing is computed)."""
        if plan not in templates:

            def one_row() -> Any:
                factors = _initial_factors(plan, 1.0, 1)
                return factors, _initial_lipschitz(plan, 1), _cached(factors)

            templates[plan] = jax.eval_shape(one_row)
        return templates[plan]

    def _like_params(tensors: list[Any], specs: list[Any], grads: list[Any]) -> list:
        """Each leaf's ``(S, *layer_shape)`` tensor pinned to its param's sharding before it is
        stacked into rows. Left unpinned, the rows' sharding propagates back into the per-leaf
        arithmetic and the compiler reshards there: on 8 devices with replicated params that
        took a step of the unrolled 12×256 MLP from 150 to 440 ms and its buffers from 7 to
        50 MiB per device."""
        # An unscanned leaf's tensor has a new leading axis of one layer; a scanned one's is the
        # leaf's own layer axis.
        return [
            constrain_spec(x, spec if x.ndim == g.ndim else PartitionSpec(None, *spec))
            for x, spec, g in zip(tensors, specs, grads)
        ]

    def _constrain(state: KronState) -> KronState:
        return constrain(state, axis, config.block_axis_size, config.params_partition_specs)

    def _decide(state: KronState, count: jax.Array) -> tuple[Any, Any]:
        if always_fit:
            return True, state.decision_total
        p = config.update_probability
        # psgdax calls the schedule with the count after this step (1 on the first).
        probability = p(optax.safe_int32_increment(count)) if callable(p) else p
        probability = jnp.asarray(probability, jnp.float32)
        if config.decision_rule == "bernoulli":
            draw = jax.random.uniform(leaf_key(state.key, count, 0, DECISION))
            return draw < probability, state.decision_total
        return counter_decision(state.decision_total, probability, OPS)

    def _initial_factors(plan: Plan, scale: float, rows: int) -> tuple[Any, ...]:
        """``rows`` copies of a block's initial factors (every block of a plan starts alike)."""
        block = init_factors(plan, scale, jnp.zeros((), q_dtype), OPS, state_is_p)
        return tuple(jnp.broadcast_to(f[:1], (rows, *f.shape[1:])) for f in block)

    def _initial_lipschitz(plan: Plan, rows: int) -> tuple[Any, ...]:
        block = init_lipschitz(plan, jnp.zeros((), lip_dtype), OPS)
        return tuple(jnp.broadcast_to(lip[:1], (rows,)) for lip in block)

    def _cached(factors: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(cache_preconditioner(factors, OPS)) if caching else ()

    def _zero_nonfinite(layered, finite):
        """The layers whose ``finite`` flag is off set to zero, so that no NaN reaches a fit."""
        return [jnp.where(_expand(ok, x), x, 0.0) for x, ok in zip(layered, finite)]

    def _whitening_scale(layered):
        """The automatic scale from the first gradients, ``(max mean g⁴ + δ⁴)^(-1/8)``, the
        maximum taken over layers as well as leaves: a scanned leaf gets the scale its layers
        would get as separate leaves."""
        per_layer = jax.vmap(lambda g: fourth_moment(g.astype(jnp.float32), OPS))
        moments = []
        for g in layered:
            layers = per_layer(g)  # a non-finite layer is left out, as a non-finite leaf is
            moments.append(jnp.max(jnp.where(jnp.isfinite(layers), layers, 0.0)))
        return shared_scale(moments, OPS, options.fit.damping)

    def _rescaled(factors, scale):
        factors = _rescale(factors, scale, state_is_p)
        return factors, [_cached(f) for f in factors]

    def _rows(stack: Stack, layered: list[Any]) -> Any:
        """The members' ``(S, *shape)`` tensors as the stack's ``(rows, *block_shape)`` blocks:
        concatenated, zero-padded and, when sharded, split over the mesh axis."""
        blocks = stack.plan.to_blocks(concat_rows(layered), OPS, stacked=True)
        return constrain_rows(pad_rows(blocks, stack.padding), axis)

    def _gather(factors, lipschitz, stack: Stack, index: int):
        """The stack's factors and Lipschitz estimates: the state's own stack when stacked, else
        the members' per-leaf rows concatenated (inside the fit only, so steps without a fit
        never copy them)."""
        if stacked:
            return list(factors[index]), list(lipschitz[index])
        members = stack.members
        return (
            [concat_rows([factors[i][k] for i in members]) for k in range(stack.plan.order)],
            [concat_rows([lipschitz[i][k] for i in members]) for k in range(stack.plan.order)],
        )

    def _fit_all(
        state,
        factors,
        lipschitz,
        targets,
        target_rows,
        layouts,
        stacks,
        precond_lr,
        params,
        value_fn,
    ):
        """One fit of every stack, on ``target_rows`` (per stack, already in rows) when given,
        else on the per-leaf ``targets``. Returns the fitted units (factors, Lipschitz estimates,
        caches), the per-layer finiteness of the Newton pairs, and whether Newton's init scale
        was applied."""
        count = state.count
        fit_ok = [jnp.ones((lay.layers,), bool) for lay in layouts]
        scaled = jnp.asarray(False)
        probes = None
        if config.newton:
            probes, targets = _newton_pairs(state.key, count, params, value_fn, layouts)
            fit_ok = [finite_rows(h, OPS) for h in targets]
            targets = _zero_nonfinite(targets, fit_ok)
            if config.init_scale is None:
                factors = _newton_init(state, factors, probes, targets)
                scaled = state.needs_scale_init
        new_factors: list[Any] = [None] * len(factors)
        new_lips: list[Any] = [None] * len(factors)
        balance_draws = _balance_draws(state.key, count, stacks)
        for index, stack in enumerate(stacks):
            inputs = _fit_inputs(state.key, count, index, stack)
            if target_rows is not None:
                inputs["x"] = target_rows[index]
            else:
                inputs["x"] = _rows(stack, [targets[i] for i in stack.members])
            if probes is not None:
                inputs["probe"] = _rows(stack, [probes[i] for i in stack.members])
            stack_factors, stack_lips = _gather(factors, lipschitz, stack, index)
            scanned = any(layers > 1 for layers in stack.layers)
            fit_stack = _mapped_fit if (config.lax_map_scanned_layers and scanned) else _batched_fit
            stack_factors, stack_lips = fit_stack(
                stack_factors, stack_lips, stack, precond_lr, inputs
            )
            stack_factors = _maybe_balance(
                tuple(stack_factors),
                count,
                None if balance_draws is None else balance_draws[index],
            )
            if stacked:
                new_factors[index], new_lips[index] = tuple(stack_factors), tuple(stack_lips)
                continue
            split_factors = [split_rows(f, stack.blocks) for f in stack_factors]
            split_lips = [split_rows(lip, stack.blocks) for lip in stack_lips]
            for position, i in enumerate(stack.members):
                new_factors[i] = tuple(f[position] for f in split_factors)
                new_lips[i] = tuple(lip[position] for lip in split_lips)
        return new_factors, new_lips, [_cached(f) for f in new_factors], fit_ok, scaled

    def _batched_fit(factors, lipschitz, stack, precond_lr, inputs):
        del stack
        inputs = dict(inputs)
        x, noise = inputs.pop("x"), inputs.pop("noise")
        return fit(
            factors, lipschitz, x, noise, lr=precond_lr, options=options.fit, ops=OPS, **inputs
        )

    def _mapped_fit(factors, lipschitz, stack, precond_lr, inputs):
        """``lax.map`` over the stack, ``lax_map_batch_size`` groups at a time. Per-leaf state: a
        group is one layer's blocks. Stacked state: the rows are viewed device-major, ``(rows/D,
        D, ...)`` for an axis of size D, and a group is one row per device, so every device walks
        only the rows it owns (and all devices work at once)."""
        if stacked:
            group = config.row_multiple

            def grouped(x: Any) -> Any:
                x = jnp.reshape(x, (group, stack.rows // group, *x.shape[1:]))
                return constrain_rows(jnp.swapaxes(x, 0, 1), axis, dim=1)

            def flat(x: Any) -> Any:
                return jnp.reshape(jnp.swapaxes(x, 0, 1), (stack.rows, *x.shape[2:]))

        else:
            group = stack.plan.num_blocks

            def grouped(x: Any) -> Any:
                return jnp.reshape(x, (stack.rows // group, group, *x.shape[1:]))

            def flat(x: Any) -> Any:
                return jnp.reshape(x, (stack.rows, *x.shape[2:]))

        def one_group(xs: Any) -> Any:
            group_factors, group_lips, group_inputs = xs
            return _batched_fit(group_factors, group_lips, stack, precond_lr, group_inputs)

        new_factors, new_lips = jax.lax.map(
            one_group,
            (
                [grouped(f) for f in factors],
                [grouped(lip) for lip in lipschitz],
                jax.tree.map(grouped, inputs),
            ),
            batch_size=min(config.lax_map_batch_size, stack.rows // group),
        )
        return [flat(f) for f in new_factors], [flat(lip) for lip in new_lips]

    def _apply_all(factors, cache, applied, layouts, stacks, keep, rows):
        """``clip(P·m)`` per leaf, ``(S, *layer_shape)``, zero for layers whose ``keep`` flag
        is off (``rows``: the same flags per unit row, from :func:`_unit_flags`)."""
        if stacked:
            return _apply_stacks(factors, cache, applied, stacks, rows)
        return _apply_leaves(factors, cache, applied, layouts, keep)

    def _apply_leaves(factors, cache, applied, layouts, keep):
        """Per-leaf state: unlike the fit, the product runs leaf by leaf, since stacking would
        copy every factor into the stack on every step, which costs more than the one product
        per axis it batches (measured in benchmarks/RESULTS.md)."""
        directions = []
        for leaf_factors, leaf_cache, m, lay, k in zip(factors, cache, applied, layouts, keep):
            blocks = lay.plan.to_blocks(m, OPS, stacked=True)
            y = _clipped(lay.plan, _product(leaf_factors, leaf_cache, blocks))
            directions.append(jnp.where(_expand(k, y), y, 0.0))
        return directions

    def _apply_stacks(factors, cache, applied, stacks, rows):
        """Stacked state: the factors are stacked already, so the momenta go to them. Each
        stack's momenta become its rows (split over the mesh axis), every device multiplies
        and masks the rows it owns, and the directions are cut back into leaves (padding rows
        dropped; with replicated or FSDP params this is where the compiler gathers them)."""
        directions: list[Any] = [None] * len(applied)
        for index, stack in enumerate(stacks):
            blocks = _rows(stack, [applied[i] for i in stack.members])
            y = _product(factors[index], cache[index], blocks)
            y = constrain_rows(jnp.where(_expand(rows[index], y), y, 0.0), axis)
            for i, part in zip(stack.members, split_rows(y[: stack.real_rows], stack.blocks)):
                directions[i] = _clipped(stack.plan, part)
        return directions

    def _product(unit_factors, unit_cache, blocks):
        if caching:
            return precondition(list(unit_cache), blocks, OPS, state_is_p=True)
        return precondition(list(unit_factors), blocks, OPS, state_is_p, options.fit.symmetric_p)

    def _clipped(plan: Plan, blocks: Any) -> Any:
        return clip_update(plan.from_blocks(blocks, OPS, stacked=True), options, OPS)

    def _row_flags(stack: Stack, keep: list[Any]) -> Any:
        """The members' per-layer ``keep`` flags as per-row flags ``(rows,)``; False on padding
        rows. Split like the rows, so every device selects among the rows it owns."""
        per_layer = [jnp.repeat(keep[i], stack.plan.num_blocks) for i in stack.members]
        return constrain_rows(pad_rows(concat_rows(per_layer), stack.padding, False), axis)

    def _unit_flags(keep, layouts, stacks):
        """Per-layer ``keep`` flags as per-row flags of each unit: ``(rows,)`` per stack (False
        on padding rows, split like the rows) when the state is stacked, else ``(S·B,)`` per
        leaf."""
        if stacked:
            return [_row_flags(stack, keep) for stack in stacks]
        return [jnp.repeat(k, lay.plan.num_blocks) for k, lay in zip(keep, layouts)]

    def _select_units(rows, new, old):
        """Per unit (a stack, or a leaf when the state is per leaf), ``new`` rows (factors,
        estimates or caches) where ``rows`` holds and ``old`` rows elsewhere; padding rows
        always keep ``old``, so they stay inert."""
        return [
            tuple(constrain_rows(jnp.where(_expand(flags, a), a, b), axis) for a, b in zip(n, o))
            if stacked
            else tuple(jnp.where(_expand(flags, a), a, b) for a, b in zip(n, o))
            for flags, n, o in zip(rows, new, old)
        ]

    def _fit_inputs(key, count, index, stack: Stack):
        """The stack's noise and norm probes, drawn for its real rows only (the unsharded run's
        draws, whatever the padding), then zero-padded; and its padding mask."""
        plan = stack.plan

        def rows(x: Any) -> Any:
            return constrain_rows(pad_rows(x, stack.padding), axis)

        # Two draws per stack, each (rows, everything else) and reshaped: XLA compiles every
        # threefry draw on its own, and a draw per probe axis plus draws over multi-axis shapes
        # made the MLP step compile 1.3x longer than psgdax's. One draw for noise and probes
        # together compiles no faster and adds a copy of the noise to the step's temporary
        # memory (its slices are not fused). Rows stay the leading axis, so a draw shards
        # like the stack's rows.
        real, sides = stack.real_rows, plan.block_shape
        noise = jax.random.normal(
            leaf_key(key, count, index, NOISE), (real, math.prod(sides)), q_dtype
        )
        inputs: dict[str, Any] = {"noise": rows(jnp.reshape(noise, (real, *sides)))}
        if options.fit.norm_bound == "subspace":
            probes = jax.random.normal(
                leaf_key(key, count, index, NORM_PROBES),
                (real, SUBSPACE_PROBES * sum(sides)),
                q_dtype,
            )
            probes = jnp.reshape(probes, (real, SUBSPACE_PROBES, sum(sides)))
            inputs["norm_probes"] = [
                rows(part) for part in jnp.split(probes, np.cumsum(sides)[:-1], axis=2)
            ]
        mask = plan.mask()
        if mask is not None:
            tiled = jnp.tile(jnp.asarray(mask, q_dtype), (sum(stack.layers),) + (1,) * plan.order)
            # Padding rows count as unpadded blocks, so their (discarded) statistics stay finite.
            inputs["mask"] = constrain_rows(pad_rows(tiled, stack.padding, 1.0), axis)
        return inputs

    def _balance_draws(key, count, stacks):
        """One uniform per stack for the random balancing rule (one draw: see ``_fit_inputs``),
        or ``None`` when balancing is not random."""
        if config.balance_every is not None or config.balance_probability <= 0:
            return None
        return jax.random.uniform(leaf_key(key, count, 0, BALANCE), (len(stacks),))

    def _maybe_balance(factors, count, draw):
        if len(factors) < 2:
            return factors
        if config.balance_every is not None:
            now = count % config.balance_every == 0
        elif draw is not None:
            now = draw < config.balance_probability
        else:
            return factors
        # A branch, not a select: balancing is rare (1 % of fits, or every 100th step), so most
        # fits skip its work.
        return jax.lax.cond(now, lambda: tuple(balance(factors, OPS)), lambda: factors)

    def _newton_pairs(key, count, params, value_fn, layouts):
        leaves, treedef = jax.tree.flatten(params)
        leaves = [jnp.asarray(x) for x in leaves]
        params = treedef.unflatten(leaves)
        probes = [
            jax.random.normal(leaf_key(key, count, i, NEWTON_PROBE), x.shape, x.dtype)
            for i, x in enumerate(leaves)
        ]
        _, hvp = jax.jvp(jax.grad(value_fn), (params,), (treedef.unflatten(probes),))
        hvps = treedef.flatten_up_to(hvp)

        def layered(x: Any, lay: LeafLayout) -> Any:
            return jnp.reshape(x.astype(q_dtype), (lay.layers, *lay.plan.shape))

        return (
            [layered(v, lay) for v, lay in zip(probes, layouts)],
            [layered(h, lay) for h, lay in zip(hvps, layouts)],
        )

    def _newton_init(state, factors, probes, hvps):
        """Newton type's automatic scale, ``(E v²)^¼ (max E h⁴)^(-1/8)``, on the first fit."""
        largest = jnp.max(jnp.stack([fourth_moment(h.astype(jnp.float32), OPS) for h in hvps]))
        second = jnp.mean(jnp.stack([jnp.mean(jnp.square(v.astype(jnp.float32))) for v in probes]))
        scale = jnp.where(
            state.needs_scale_init,
            scale_from_moments(largest, OPS, options.fit.damping, probe_second=second),
            1.0,
        )
        return _rescale(factors, scale, state_is_p)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _leaf_name(tree: Any, index: int) -> str:
    """The path of ``tree``'s leaf number ``index``, as an error message names it."""
    path = jax.tree_util.tree_flatten_with_path(tree)[0][index][0]
    return jax.tree_util.keystr(path) or "the root"


def _shapes(parts: list[tuple[tuple[int, ...], Any]]) -> str:
    """``[(shape, dtype), ...]`` as ``"(1, 3, 3) float32, (1, 4) float32"``; ``"none"``."""
    return ", ".join(f"{shape} {jnp.dtype(dtype).name}" for shape, dtype in parts) or "none"


def _expand(flags: Any, like: Any) -> Any:
    """``(S,)`` flags reshaped to broadcast against ``(S, ...)``."""
    return jnp.reshape(flags, (-1,) + (1,) * (like.ndim - 1))


def _normalize(g: Any) -> Any:
    """Each layer divided by its L2 norm (left as is when the norm is 0)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=tuple(range(1, g.ndim))))
    norm = jnp.where(norm > 0, norm, 1.0)
    return g / _expand(norm, g).astype(g.dtype)


def _rescale(units: list[Any], scale: Any, state_is_p: bool) -> list:
    """Multiply every preconditioner by ``scale`` (``Q``) or ``scale²`` (``P``), spread evenly
    over its factors."""
    if state_is_p:
        scale = scale * scale
    return [tuple(f * (scale ** (1.0 / len(unit))).astype(f.dtype) for f in unit) for unit in units]


__all__ = [
    "FLOAT_DTYPES",
    "PRECONDITIONER_TYPES",
    "EngineConfig",
    "build",
    "check_chain_options",
    "require_option",
]
