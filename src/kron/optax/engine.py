"""The machinery behind every :mod:`kron.optax` transformation.

Leaves are grouped into stacks by :mod:`kron.optax.stacks`; a leaf flagged as scanned
contributes its leading axis as ``S`` stacked layers, each with its own factors and statistics.
Leaves (and layers) that share a plan are fitted as one stack, so a model with ten ``256×256``
weights traces one batched fit instead of ten: the traced fit, and so the compile time, grows
with the number of distinct shapes, not of leaves. Scanned stacks may instead be fitted with
``lax.map`` in chunks of ``lax_map_batch_size`` layers, which trades speed for peak memory; both
paths compute the same numbers. The momentum and ``P·m`` run leaf by leaf (``P·m`` per stack
when the state is stacked), outside the ``lax.cond`` of the fit.

Where the factors live depends on ``EngineConfig.block_axis_name``:

* ``None`` (the default): the state keeps factors per leaf, so it mirrors the param tree; stacks
  are assembled inside the jitted update, for the fit only.
* a mesh axis name: the state keeps one stack per plan, padded with inert rows (identity factors,
  zero inputs, never kept) to a multiple of ``block_axis_size``, so the stack splits evenly over
  the axis and every device stores, fits and applies only its own rows; the directions go back to
  the leaves (and the params' sharding) after ``P·m``. This is the distributed-Shampoo pattern
  that eformer calls ``pipeline_axis_name``.

Whether to fit P is decided inside the update (``lax.cond``), and every random draw is folded from
the state's key with the step, an index (the stack's; the leaf's for Newton probes; 0 for the
decision and balance draws) and a stream number (:func:`kron.optax.leaf_key`),
so a restored state repeats the run that never stopped, every host of a multi-host run draws the
same numbers, and a sharded run draws what the unsharded one does (padding rows get zeros).

The update runs as named steps: :func:`kron.optax.checks.checked_layouts` (trace-time checks),
the gradients and momentum here, :func:`kron.optax.fitting.fit_step` (the conditional fit), the
product ``P·m`` here, then the new state. Options and their validation live in
:mod:`kron.optax.options`, the state's units and rows in :mod:`kron.optax.units`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from kron.core import (
    Plan,
    finite_rows,
    nonzero_rows,
    overflow_limit,
    precondition,
    update_momentum,
)
from kron.core.step import clip_update
from kron.optax.checks import check_leaves, check_newton_args, checked_layouts
from kron.optax.fitting import Fitted, fit_step
from kron.optax.options import (
    FLOAT_DTYPES,
    PRECONDITIONER_TYPES,
    EngineConfig,
    check_chain_options,
    precision,
    require_option,
)
from kron.optax.sharding import (
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
    leaf_layouts,
    scanned_flags,
    split_rows,
    stacks_of,
)
from kron.optax.state import KronState
from kron.optax.units import (
    OPS,
    cached,
    expand,
    initial_factors,
    initial_lipschitz,
    pack_units,
    stack_rows,
    unit_flags,
)


def build(config: EngineConfig) -> optax.GradientTransformationExtraArgs:
    """The ``init``/``update`` pair of ``config``. ``update(updates, state, params=None, *,
    value_fn=None)``; Newton type needs ``params`` and ``value_fn(params) -> loss``.

    Factors, Lipschitz estimates and caches travel through the update as *units*: a list of
    per-factor tuples, one unit per leaf (per-leaf state) or per stack (stacked state)."""
    if not config.step.fit_before_apply:
        raise ValueError("kron.optax fits P before applying it; fit_before_apply must be True.")
    templates: dict[Plan, Any] = {}  # checks.unit_template's, per plan

    def init_fn(params: Any) -> KronState:
        check_mesh(config.block_axis_name, config.block_axis_size)
        flags = scanned_flags(config.scanned_layers, params)
        check_leaves(params, flags)
        leaves, treedef = jax.tree.flatten(params)
        leaves = [jnp.asarray(x) for x in leaves]  # a Python number is a leaf too
        layouts = leaf_layouts(leaves, flags, config.step.layout)
        scale = 1.0 if config.init_scale is None else config.init_scale
        if config.stacked_state:
            shapes = [(s.plan, s.rows) for s in stacks_of(layouts, config.row_multiple)]
        else:
            shapes = [(lay.plan, lay.blocks) for lay in layouts]
        factors = [initial_factors(config, plan, scale, rows) for plan, rows in shapes]
        lipschitz = [initial_lipschitz(config, plan, rows) for plan, rows in shapes]
        state = KronState(
            count=jnp.zeros((), jnp.int32),
            mu=treedef.unflatten([jnp.zeros(x.shape, config.mu_dtype or x.dtype) for x in leaves]),
            factors=pack_units(config, treedef, factors),
            lipschitz=pack_units(config, treedef, lipschitz),
            decision_total=jnp.zeros((), jnp.float32),
            needs_scale_init=jnp.asarray(config.init_scale is None),
            skipped=treedef.unflatten([jnp.zeros((), jnp.int32) for _ in leaves]),
            key=(
                jax.random.PRNGKey(config.seed)
                if isinstance(config.seed, int)
                else jnp.asarray(config.seed, jnp.uint32)
            ),
            cache=pack_units(config, treedef, [cached(config, f) for f in factors]),
        )
        return _constrain(config, state)

    def update_fn(
        updates: Any, state: KronState, params: Any = None, value_fn: Any = None, **extra: Any
    ) -> tuple[Any, KronState]:
        del extra
        check_mesh(config.block_axis_name, config.block_axis_size)
        check_newton_args(config, params, value_fn)
        grads, treedef = jax.tree.flatten(updates)
        grads = [jnp.asarray(g) for g in grads]  # a Python number is a 0-d leaf, as in init
        if not grads:  # nothing to precondition (optax.masked or multi_transform left none)
            return updates, state
        # The checks run while tracing, so a jitted step pays nothing for them.
        layouts, stacks = checked_layouts(config, state, updates, treedef, grads, templates)
        layered, finite = _layered_gradients(config, grads, layouts)
        mu, momenta = _momenta(config, state, treedef, layered, finite)
        targets, applied = _fit_and_apply_inputs(config, updates, grads, layered, momenta)
        fitted = fit_step(
            config, state, treedef, layered, targets, finite, layouts, stacks, params, value_fn
        )
        # A layer keeps its new momentum, and gets a nonzero update, only if its gradient (and
        # Newton pair) was finite.
        keep = finite
        rows = fitted.unit_finite
        if config.newton:
            keep = [ok & pair_ok for ok, pair_ok in zip(finite, fitted.fit_ok)]
            rows = unit_flags(config, keep, layouts, stacks)
        with precision(config.apply_precision):
            directions = apply_all(
                config, fitted.factors, fitted.cache, applied, layouts, stacks, keep, rows
            )
        if config.newton:
            momenta = [jnp.where(expand(k, m), m, old) for k, m, old in zip(keep, momenta, mu)]
        # Layers whose gradient is finite and not all zeros: the first step with one sets the
        # automatic init scale.
        informative = [ok & nonzero_rows(g, OPS) for ok, g in zip(finite, layered)]
        return _outputs(
            config, state, treedef, grads, fitted, finite, informative, keep, directions, momenta
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _layered_gradients(
    config: EngineConfig, grads: list[Any], layouts: list[LeafLayout]
) -> tuple[list, list]:
    """Each gradient as ``(S, *layer_shape)`` in ``lip_dtype`` (normalized per layer with
    ``normalize_grads``), and its per-layer ``(S,)`` flags of finite values."""
    # The gradient and the momentum's average are handled in at least float32 (lip_dtype):
    # only the fit and the product take their inputs in q_dtype, so half-precision factors
    # neither round the average (bfloat16) nor overflow a finite gradient (float16).
    layered = [
        jnp.reshape(g.astype(config.lip_dtype), (lay.layers, *lay.plan.shape))
        for g, lay in zip(grads, layouts)
    ]
    # Non-finite layers are not zeroed here: each use below selects on `finite` instead (the
    # momentum, the fit's inputs, the product's output), which costs no pass of its own. With
    # float16 factors a gradient past float16's range counts as non-finite.
    finite = [finite_rows(g, OPS, overflow_limit(config.q_dtype)) for g in layered]
    if config.normalize_grads:
        layered = [_normalize(g) for g in layered]
    return layered, finite


def _momenta(
    config: EngineConfig, state: KronState, treedef: Any, layered: list, finite: list
) -> tuple[list, list]:
    """The state's momentum and the new one (the old one kept where the gradient was not
    finite), both as ``(S, *layer_shape)`` in ``lip_dtype``. With ``b1 = 0`` the momentum is
    not updated: both are the state's."""
    options = config.step
    mu = [
        jnp.reshape(m.astype(config.lip_dtype), g.shape)
        for m, g in zip(treedef.flatten_up_to(state.mu), layered)
    ]
    if options.beta <= 0:
        return mu, mu
    steps = state.count.astype(config.lip_dtype)

    def kept_momentum(m: Any, g: Any, ok: Any) -> Any:
        """The new momentum, or the old one where the gradient was not finite."""
        new = update_momentum(m, g, steps, options.beta, options.momentum_rule, OPS)
        return jnp.where(expand(ok, new), new, m)

    return mu, [kept_momentum(m, g, ok) for m, g, ok in zip(mu, layered, finite)]


def _fit_and_apply_inputs(
    config: EngineConfig, updates: Any, grads: list, layered: list, momenta: list
) -> tuple[list, list]:
    """What the fit whitens and what P multiplies, per leaf, in ``q_dtype``: the gradient or
    the momentum, as the step options say."""
    options = config.step
    # The product reads the kept momentum, the buffer the state is written from.
    averaged = momenta if options.beta > 0 else layered
    targets = averaged if options.whiten_momentum else layered
    applied = averaged if options.precondition_momentum else layered
    targets = [t.astype(config.q_dtype) for t in targets]
    applied = [a.astype(config.q_dtype) for a in applied]
    if config.stacked_state and config.params_partition_specs is not None:
        specs = jax.tree.leaves(specs_like(updates, config.params_partition_specs))
        targets = _like_params(targets, specs, grads)
        applied = _like_params(applied, specs, grads)
    return targets, applied


def _outputs(
    config: EngineConfig,
    state: KronState,
    treedef: Any,
    grads: list,
    fitted: Fitted,
    finite: list,
    informative: list,
    keep: list,
    directions: list,
    momenta: list,
) -> tuple[Any, KronState]:
    """The updates, shaped and typed like the gradients, and the new state."""
    new_updates, new_mu, new_skipped = [], [], []
    for k, y, g, m, old_m, skipped in zip(
        keep,
        directions,
        grads,
        momenta,
        treedef.flatten_up_to(state.mu),
        treedef.flatten_up_to(state.skipped),
    ):
        y = y * config.output_scale
        new_updates.append(jnp.reshape(y, g.shape).astype(g.dtype))
        new_mu.append(jnp.reshape(m, old_m.shape).astype(old_m.dtype))
        new_skipped.append(skipped + jnp.sum(~k).astype(jnp.int32))
    # A step on which every gradient was skipped is not counted (the momentum's bias
    # correction counts the updates it took). One on which every gradient was skipped or all
    # zeros (a loss term switched on later) leaves the automatic scale to come: taken from
    # zeros it would fall back to 1.0 for good.
    any_finite = jnp.any(jnp.stack([jnp.any(ok) for ok in finite]))
    any_informative = jnp.any(jnp.stack([jnp.any(ok) for ok in informative]))
    auto = config.init_scale is None
    scaled = fitted.newton_scaled if config.newton else any_informative & auto
    count = state.count
    new_state = KronState(
        count=jnp.where(any_finite, optax.safe_int32_increment(count), count),
        mu=treedef.unflatten(new_mu),
        factors=pack_units(config, treedef, fitted.factors),
        lipschitz=pack_units(config, treedef, fitted.lipschitz),
        decision_total=jnp.where(
            any_finite, jnp.asarray(fitted.decision_total, jnp.float32), state.decision_total
        ),
        needs_scale_init=state.needs_scale_init & ~scaled,
        skipped=treedef.unflatten(new_skipped),
        key=state.key,
        cache=pack_units(config, treedef, fitted.cache),
    )
    new_updates = constrain_like_params(
        treedef.unflatten(new_updates), config.params_partition_specs
    )
    return new_updates, _constrain(config, new_state)


def apply_all(
    config: EngineConfig,
    factors: list,
    cache: list,
    applied: list,
    layouts: list[LeafLayout],
    stacks: list[Stack],
    keep: list,
    rows: list,
) -> list:
    """``clip(P·m)`` per leaf, ``(S, *layer_shape)``, zero for layers whose ``keep`` flag
    is off (``rows``: the same flags per unit row, from :func:`kron.optax.units.unit_flags`)."""
    if config.stacked_state:
        return _apply_stacks(config, factors, cache, applied, stacks, rows)
    return _apply_leaves(config, factors, cache, applied, layouts, keep)


def _apply_leaves(
    config: EngineConfig, factors: list, cache: list, applied: list, layouts: list, keep: list
) -> list:
    """Per-leaf state: unlike the fit, the product runs leaf by leaf. Stacking would copy
    every factor into the stack on every step (the fit pays that only on steps that fit), and
    separate leaves' products can run side by side (benchmarks/RESULTS.md, *one stacked fit
    per shape*, measures that for the fit)."""
    directions = []
    for leaf_factors, leaf_cache, m, lay, k in zip(factors, cache, applied, layouts, keep):
        blocks = lay.plan.to_blocks(m, OPS, stacked=True)
        y = _clipped(config, lay.plan, _product(config, leaf_factors, leaf_cache, blocks))
        directions.append(jnp.where(expand(k, y), y, 0.0))
    return directions


def _apply_stacks(
    config: EngineConfig, factors: list, cache: list, applied: list, stacks: list, rows: list
) -> list:
    """Stacked state: the factors are stacked already, so the momenta go to them. Each
    stack's momenta become its rows (split over the mesh axis), every device multiplies
    and masks the rows it owns, and the directions are cut back into leaves (padding rows
    dropped; with replicated or FSDP params this is where the compiler gathers them)."""
    directions: list[Any] = [None] * len(applied)
    for index, stack in enumerate(stacks):
        blocks = stack_rows(config, stack, [applied[i] for i in stack.members])
        y = _product(config, factors[index], cache[index], blocks)
        y = constrain_rows(jnp.where(expand(rows[index], y), y, 0.0), config.block_axis_name)
        for i, part in zip(stack.members, split_rows(y[: stack.real_rows], stack.blocks)):
            directions[i] = _clipped(config, stack.plan, part)
    return directions


def _product(config: EngineConfig, unit_factors: tuple, unit_cache: tuple, blocks: Any) -> Any:
    """``P·blocks`` for one unit, from the cache when the state keeps one."""
    if config.caching:
        return precondition(list(unit_cache), blocks, OPS, state_is_p=True)
    return precondition(
        list(unit_factors), blocks, OPS, config.state_is_p, config.step.fit.symmetric_p
    )


def _clipped(config: EngineConfig, plan: Plan, blocks: Any) -> Any:
    """The blocks back in the layer's shape, clipped as the step options say."""
    return clip_update(plan.from_blocks(blocks, OPS, stacked=True), config.step, OPS)


def _normalize(g: Any) -> Any:
    """Each layer divided by its L2 norm (left as is when the norm is 0)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=tuple(range(1, g.ndim))))
    norm = jnp.where(norm > 0, norm, 1.0)
    return g / expand(norm, g).astype(g.dtype)


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


def _constrain(config: EngineConfig, state: KronState) -> KronState:
    """The state pinned to its shardings (:func:`kron.optax.sharding.constrain`)."""
    return constrain(
        state, config.block_axis_name, config.block_axis_size, config.params_partition_specs
    )


# FLOAT_DTYPES, PRECONDITIONER_TYPES, EngineConfig, check_chain_options and require_option live
# in kron.optax.options; they stay importable from here, where they were defined before.
__all__ = [
    "FLOAT_DTYPES",
    "PRECONDITIONER_TYPES",
    "EngineConfig",
    "build",
    "check_chain_options",
    "require_option",
]
