"""Fitting P in :mod:`kron.optax.engine`: whether a step fits, what it draws, and the fit itself.

:func:`fit_step` is the update's conditional part: the first update's automatic init scale, then,
when :func:`decide` says so, one fit of every stack (:func:`fit_all`) on ``(rows, *block_shape)``
inputs, batched or walked with ``lax.map``, then maybe balanced. A layer whose gradient (or Newton
pair) was not finite keeps its old rows. Every random draw is folded from the state's key with the
step, an index (the stack's; the leaf's for Newton probes; 0 for the decision and balance draws)
and one of the stream numbers below (:func:`kron.optax.leaf_key`), so a
restored, multi-host or sharded run draws what the original one does (padding rows get zeros).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kron.core import (
    balance,
    counter_decision,
    finite_rows,
    fit,
    fourth_moment,
    nonzero_rows,
    scale_from_moments,
    shared_scale,
)
from kron.optax.options import EngineConfig, precision
from kron.optax.sharding import constrain_rows
from kron.optax.stacks import LeafLayout, Stack, concat_rows, pad_rows, split_rows
from kron.optax.state import KronState, leaf_key
from kron.optax.units import (
    OPS,
    as_units,
    cached,
    rescale,
    rescaled,
    select_units,
    stack_rows,
    unit_flags,
    zero_nonfinite,
)

# Stream identifiers folded into a stack's key.
NOISE, NORM_PROBES, BALANCE, DECISION, NEWTON_PROBE = range(5)
SUBSPACE_PROBES = 32


class Fitted(NamedTuple):
    """What :func:`fit_step` hands back to the update.

    Attributes:
      factors, lipschitz, cache: the new units, fitted or kept.
      fit_ok: per leaf, ``(S,)`` bools: the layer's Newton pair was finite (all True for
        whitening, and on steps without a fit).
      newton_scaled: bool scalar, Newton type's automatic init scale was applied.
      decision_total: float32 scalar, the decision counter after this step.
      unit_finite: per unit, per-row flags of finite gradients (:func:`unit_flags`).
    """

    factors: list
    lipschitz: list
    cache: list
    fit_ok: list
    newton_scaled: Any
    decision_total: Any
    unit_finite: list


def fit_step(
    config: EngineConfig,
    state: KronState,
    treedef: Any,
    layered: list[Any],
    targets: list[Any],
    finite: list[Any],
    layouts: list[LeafLayout],
    stacks: list[Stack],
    params: Any,
    value_fn: Any,
) -> Fitted:
    """The factors after this step: rescaled on the first update when the init scale is
    automatic, then fitted when :func:`decide` says so, else kept. ``layered`` are the
    ``(S, *layer_shape)`` gradients (for the automatic scale), ``targets`` what the fit whitens,
    in ``q_dtype``, and ``finite`` the per-layer ``(S,)`` flags of finite gradients."""
    stacked, count = config.stacked_state, state.count
    factors = as_units(config, treedef, state.factors)
    lipschitz = as_units(config, treedef, state.lipschitz)
    cache = as_units(config, treedef, state.cache)
    # For a stacked state, work that may need collectives (a reduction over sharded gradients,
    # resharding them into rows) runs outside the lax.conds below: XLA:CPU may run a
    # conditional at the same time as a collective outside it, and host devices then wait on
    # each other forever. A per-leaf state gathers its fit's inputs inside them (docs/optax.md,
    # *No collective inside a lax.cond*).
    auto_scale = config.init_scale is None and not config.newton
    # Only the first update uses the scale. A per-leaf state computes it inside that update's
    # branch, joining same-shape leaves as the fit does, rather than reducing every gradient
    # on every step. A stacked state computes it outside the conds, so on every step, leaf by
    # leaf: joining its sharded leaves there would copy (or reshard) them on every step.
    groups = [(i,) for i in range(len(layered))] if stacked else [s.members for s in stacks]
    scale = whitening_scale(config, layered, groups) if auto_scale and stacked else None
    target_rows = None
    if stacked and not config.newton:
        finite_targets = zero_nonfinite(targets, finite)
        target_rows = [
            stack_rows(config, stack, [finite_targets[i] for i in stack.members])
            for stack in stacks
        ]
    do_fit, decision_total = decide(config, state, count)
    precond_lr = config.precond_lr(count) if callable(config.precond_lr) else config.precond_lr
    # Per-row flags of finite gradients, made here (resharding them may need collectives)
    # and used by both the fit's selection and the product outside it.
    unit_finite = unit_flags(config, finite, layouts, stacks)
    # A layer whose gradient is all zeros (one the loss did not use) keeps its factors as a
    # non-finite one does (kron.core.fit says why); its momentum still decays.
    fitted_layers = [ok & nonzero_rows(g, OPS) for ok, g in zip(finite, layered)]
    unit_fitted = unit_flags(config, fitted_layers, layouts, stacks)

    def fit_branch(f: list, c: list) -> Any:
        with precision(config.fit_precision):
            new_f, new_l, new_c, fit_ok, newton_scaled = fit_all(
                config,
                state,
                f,
                lipschitz,
                zero_nonfinite(targets, finite),
                target_rows,
                layouts,
                stacks,
                precond_lr,
                params,
                value_fn,
            )
        # A layer keeps its fitted factors only if its gradient (and Newton pair) was finite
        # and not all zeros.
        rows = unit_fitted
        if config.newton:
            keep = [ok & pair_ok for ok, pair_ok in zip(fitted_layers, fit_ok)]
            rows = unit_flags(config, keep, layouts, stacks)
        return (
            select_units(config, rows, new_f, f),
            select_units(config, rows, new_l, lipschitz),
            select_units(config, rows, new_c, c),
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
                lambda: rescaled(
                    config, f, whitening_scale(config, layered, groups) if scale is None else scale
                ),
                lambda: (f, c),
            )
        if config.always_fit:
            return fit_branch(f, c)
        return jax.lax.cond(do_fit, fit_branch, keep_branch, f, c)

    if config.always_fit:
        fitted = changed_branch()
    else:
        changes = do_fit | state.needs_scale_init if auto_scale else do_fit
        fitted = jax.lax.cond(changes, changed_branch, lambda: keep_branch(factors, cache))
    return Fitted(*fitted, decision_total, unit_finite)


def decide(config: EngineConfig, state: KronState, count: jax.Array) -> tuple[Any, Any]:
    """Whether this step fits (True, or a traced bool) and the decision counter after it."""
    if config.always_fit:
        return True, state.decision_total
    p = config.update_probability
    # psgdax calls the schedule with the count after this step (1 on the first).
    probability = p(optax.safe_int32_increment(count)) if callable(p) else p
    probability = jnp.asarray(probability, jnp.float32)
    if config.decision_rule == "bernoulli":
        draw = jax.random.uniform(leaf_key(state.key, count, 0, DECISION))
        return draw < probability, state.decision_total
    return counter_decision(state.decision_total, probability, OPS)


def whitening_scale(config: EngineConfig, layered: list[Any], groups: list[tuple]) -> Any:
    """The automatic scale from the first gradients, ``(max mean g⁴ + δ⁴)^(-1/8)``, the
    maximum taken over layers as well as leaves: a scanned leaf gets the scale its layers
    would get as separate leaves. ``groups`` are tuples of indices of same-shape leaves, whose
    layers are taken together: the same numbers, and one batched moment per group compiles a
    few reductions where one per leaf compiled a few per leaf (1.3 s of the 12-layer MLP's
    compile, benchmarks/RESULTS.md)."""
    per_layer = jax.vmap(lambda g: fourth_moment(g.astype(jnp.float32), OPS))
    moments = []
    for members in groups:
        layers = per_layer(concat_rows([layered[i] for i in members]))
        # A non-finite layer is left out, as a non-finite leaf is.
        moments.append(jnp.max(jnp.where(jnp.isfinite(layers), layers, 0.0)))
    return shared_scale(moments, OPS, config.step.fit.damping)


def fit_all(
    config: EngineConfig,
    state: KronState,
    factors: list[Any],
    lipschitz: list[Any],
    targets: list[Any],
    target_rows: list[Any] | None,
    layouts: list[LeafLayout],
    stacks: list[Stack],
    precond_lr: Any,
    params: Any,
    value_fn: Any,
) -> tuple[list, list, list, list, Any]:
    """One fit of every stack, on ``target_rows`` (per stack, already in rows) when given,
    else on the per-leaf ``targets``. Returns the fitted units (factors, Lipschitz estimates,
    caches), the per-layer finiteness of the Newton pairs, and whether Newton's init scale
    was applied."""
    count = state.count
    fit_ok = [jnp.ones((lay.layers,), bool) for lay in layouts]
    scaled = jnp.asarray(False)
    probes = None
    if config.newton:
        probes, targets = _newton_pairs(config, state.key, count, params, value_fn, layouts)
        fit_ok = [finite_rows(h, OPS) for h in targets]
        targets = zero_nonfinite(targets, fit_ok)
        if config.init_scale is None:
            factors = _newton_init(config, state, factors, probes, targets)
            scaled = state.needs_scale_init
    new_factors: list[Any] = [None] * len(factors)
    new_lips: list[Any] = [None] * len(factors)
    balance_draws = _balance_draws(config, state.key, count, stacks)
    for index, stack in enumerate(stacks):
        inputs = _fit_inputs(config, state.key, count, index, stack)
        if target_rows is not None:
            inputs["x"] = target_rows[index]
        else:
            inputs["x"] = stack_rows(config, stack, [targets[i] for i in stack.members])
        if probes is not None:
            inputs["probe"] = stack_rows(config, stack, [probes[i] for i in stack.members])
        stack_factors, stack_lips = _gather(config, factors, lipschitz, stack, index)
        scanned = any(layers > 1 for layers in stack.layers)
        fit_stack = _mapped_fit if (config.lax_map_scanned_layers and scanned) else _batched_fit
        stack_factors, stack_lips = fit_stack(
            config, stack_factors, stack_lips, stack, precond_lr, inputs
        )
        stack_factors = _maybe_balance(
            config,
            tuple(stack_factors),
            count,
            None if balance_draws is None else balance_draws[index],
        )
        if config.stacked_state:
            new_factors[index], new_lips[index] = tuple(stack_factors), tuple(stack_lips)
            continue
        split_factors = [split_rows(f, stack.blocks) for f in stack_factors]
        split_lips = [split_rows(lip, stack.blocks) for lip in stack_lips]
        for position, i in enumerate(stack.members):
            new_factors[i] = tuple(f[position] for f in split_factors)
            new_lips[i] = tuple(lip[position] for lip in split_lips)
    return new_factors, new_lips, [cached(config, f) for f in new_factors], fit_ok, scaled


def _gather(
    config: EngineConfig, factors: list[Any], lipschitz: list[Any], stack: Stack, index: int
) -> tuple[list, list]:
    """The stack's factors and Lipschitz estimates: the state's own stack when stacked, else
    the members' per-leaf rows concatenated (inside the fit only, so steps without a fit
    never copy them)."""
    if config.stacked_state:
        return list(factors[index]), list(lipschitz[index])
    members = stack.members
    return (
        [concat_rows([factors[i][k] for i in members]) for k in range(stack.plan.order)],
        [concat_rows([lipschitz[i][k] for i in members]) for k in range(stack.plan.order)],
    )


def _batched_fit(
    config: EngineConfig, factors: list, lipschitz: list, stack: Stack, precond_lr: Any, inputs
) -> Any:
    """One batched fit of all the stack's rows (:func:`kron.core.fit`)."""
    del stack
    inputs = dict(inputs)
    x, noise = inputs.pop("x"), inputs.pop("noise")
    return fit(
        factors, lipschitz, x, noise, lr=precond_lr, options=config.step.fit, ops=OPS, **inputs
    )


def _mapped_fit(
    config: EngineConfig, factors: list, lipschitz: list, stack: Stack, precond_lr: Any, inputs
) -> tuple[list, list]:
    """``lax.map`` over the stack, ``lax_map_batch_size`` groups at a time. Per-leaf state: a
    group is one layer's blocks. Stacked state: the rows are viewed device-major, ``(rows/D,
    D, ...)`` for an axis of size D, and a group is one row per device, so every device walks
    only the rows it owns (and all devices work at once)."""
    if config.stacked_state:
        group = config.row_multiple

        def grouped(x: Any) -> Any:
            x = jnp.reshape(x, (group, stack.rows // group, *x.shape[1:]))
            return constrain_rows(jnp.swapaxes(x, 0, 1), config.block_axis_name, dim=1)

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
        return _batched_fit(config, group_factors, group_lips, stack, precond_lr, group_inputs)

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


def _fit_inputs(config: EngineConfig, key: Any, count: Any, index: int, stack: Stack) -> dict:
    """The stack's noise and norm probes, drawn for its real rows only (the unsharded run's
    draws, whatever the padding), then zero-padded; and its padding mask."""
    plan, q_dtype, axis = stack.plan, config.q_dtype, config.block_axis_name

    def rows(x: Any) -> Any:
        return constrain_rows(pad_rows(x, stack.padding), axis)

    # Two draws per stack, each (rows, everything else) and reshaped: XLA compiles every
    # threefry draw on its own, and a draw per probe axis plus draws over multi-axis shapes
    # made the MLP step compile 1.3x longer than psgdax's. One draw for noise and probes
    # together compiles no faster and adds a copy of the noise to the step's temporary
    # memory (its slices are not fused). Rows stay the leading axis, so a draw shards
    # like the stack's rows.
    real, sides = stack.real_rows, plan.block_shape
    noise = jax.random.normal(leaf_key(key, count, index, NOISE), (real, math.prod(sides)), q_dtype)
    inputs: dict[str, Any] = {"noise": rows(jnp.reshape(noise, (real, *sides)))}
    if config.step.fit.norm_bound == "subspace":
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


def _balance_draws(config: EngineConfig, key: Any, count: Any, stacks: list[Stack]) -> Any:
    """One uniform per stack for the random balancing rule (one draw: see ``_fit_inputs``),
    or ``None`` when balancing is not random."""
    if config.balance_every is not None or config.balance_probability <= 0:
        return None
    return jax.random.uniform(leaf_key(key, count, 0, BALANCE), (len(stacks),))


def _maybe_balance(config: EngineConfig, factors: tuple, count: Any, draw: Any) -> tuple:
    """The stack's factors, their norms rebalanced on the fits that ``balance_every`` (or the
    stack's uniform ``draw`` against ``balance_probability``) picks."""
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


def _newton_pairs(
    config: EngineConfig, key: Any, count: Any, params: Any, value_fn: Any, layouts: list
) -> tuple[list, list]:
    """Newton type's fit inputs: per leaf, a Gaussian probe ``v`` and the Hessian-vector product
    ``H v`` of ``value_fn`` at ``params``, each ``(S, *layer_shape)`` in ``q_dtype``."""
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
        return jnp.reshape(x.astype(config.q_dtype), (lay.layers, *lay.plan.shape))

    return (
        [layered(v, lay) for v, lay in zip(probes, layouts)],
        [layered(h, lay) for h, lay in zip(hvps, layouts)],
    )


def _newton_init(
    config: EngineConfig, state: KronState, factors: list, probes: list, hvps: list
) -> list:
    """Newton type's automatic scale, ``(E v²)^¼ (max E h⁴)^(-1/8)``, on the first fit."""
    largest = jnp.max(jnp.stack([fourth_moment(h.astype(jnp.float32), OPS) for h in hvps]))
    second = jnp.mean(jnp.stack([jnp.mean(jnp.square(v.astype(jnp.float32))) for v in probes]))
    scale = jnp.where(
        state.needs_scale_init,
        scale_from_moments(largest, OPS, config.step.fit.damping, probe_second=second),
        1.0,
    )
    return rescale(factors, scale, config.state_is_p)
