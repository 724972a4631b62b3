"""Units and rows: how :mod:`kron.optax.engine` holds the preconditioner's state and moves it.

A *unit* is a tuple with one array per factor: one leaf's factors, Lipschitz estimates or cached
preconditioners when the state is per leaf, one stack's when it is stacked
(``EngineConfig.block_axis_name``). Every array of a unit has a leading axis of *rows*, one per
block of one layer: ``(S·B, ...)`` for a leaf of ``S`` layers of ``B`` blocks, ``(R, ...)`` for a
stack padded to ``R`` rows. Per-layer flags ``(S,)`` become per-row flags here, so a layer whose
gradient was not finite keeps its old rows. The functions take the config for its dtypes, its
geometry (Q or P) and its mesh axis, over which a stacked state's rows are split.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from kron.core import Plan, cache_preconditioner, get_ops, init_factors, init_lipschitz
from kron.optax.options import EngineConfig
from kron.optax.sharding import constrain_rows
from kron.optax.stacks import LeafLayout, Stack, concat_rows, pad_rows

OPS = get_ops("jax")


def initial_factors(config: EngineConfig, plan: Plan, scale: float, rows: int) -> tuple[Any, ...]:
    """``rows`` copies of a block's initial factors (every block of a plan starts alike)."""
    block = init_factors(plan, scale, jnp.zeros((), config.q_dtype), OPS, config.state_is_p)
    return tuple(jnp.broadcast_to(f[:1], (rows, *f.shape[1:])) for f in block)


def initial_lipschitz(config: EngineConfig, plan: Plan, rows: int) -> tuple[Any, ...]:
    """``rows`` copies of a block's initial Lipschitz estimates, ``(rows,)`` each."""
    block = init_lipschitz(plan, jnp.zeros((), config.lip_dtype), OPS)
    return tuple(jnp.broadcast_to(lip[:1], (rows,)) for lip in block)


def cached(config: EngineConfig, factors: tuple[Any, ...]) -> tuple[Any, ...]:
    """The unit's cached ``P_i = Q_iᵀQ_i``; ``()`` when the config keeps no cache."""
    return tuple(cache_preconditioner(factors, OPS)) if config.caching else ()


def as_units(config: EngineConfig, treedef: Any, tree: Any) -> list[tuple[Any, ...]]:
    """A state field (factors, Lipschitz estimates or caches) as its list of units."""
    return [tuple(u) for u in (tree if config.stacked_state else treedef.flatten_up_to(tree))]


def pack_units(config: EngineConfig, treedef: Any, units: list[Any]) -> Any:
    """Units back into a state field: a tuple of stacks, or the params' tree of per-leaf units."""
    return tuple(units) if config.stacked_state else treedef.unflatten(units)


def expand(flags: Any, like: Any) -> Any:
    """``(S,)`` flags reshaped to broadcast against ``(S, ...)``."""
    return jnp.reshape(flags, (-1,) + (1,) * (like.ndim - 1))


def zero_nonfinite(layered: list[Any], finite: list[Any]) -> list[Any]:
    """The layers whose ``finite`` flag is off set to zero, so that no NaN reaches a fit."""
    return [jnp.where(expand(ok, x), x, 0.0) for x, ok in zip(layered, finite)]


def rescale(units: list[Any], scale: Any, state_is_p: bool) -> list:
    """Multiply every preconditioner by ``scale`` (``Q``) or ``scale²`` (``P``), spread evenly
    over its factors."""
    if state_is_p:
        scale = scale * scale
    return [tuple(f * (scale ** (1.0 / len(unit))).astype(f.dtype) for f in unit) for unit in units]


def rescaled(config: EngineConfig, factors: list[Any], scale: Any) -> tuple[list, list]:
    """The factors rescaled by ``scale`` (:func:`rescale`), and their new caches."""
    factors = rescale(factors, scale, config.state_is_p)
    return factors, [cached(config, f) for f in factors]


def stack_rows(config: EngineConfig, stack: Stack, layered: list[Any]) -> Any:
    """The members' ``(S, *shape)`` tensors as the stack's ``(rows, *block_shape)`` blocks:
    concatenated, zero-padded and, when sharded, split over the mesh axis."""
    blocks = stack.plan.to_blocks(concat_rows(layered), OPS, stacked=True)
    return constrain_rows(pad_rows(blocks, stack.padding), config.block_axis_name)


def _row_flags(config: EngineConfig, stack: Stack, keep: list[Any]) -> Any:
    """The members' per-layer ``keep`` flags as per-row flags ``(rows,)``; False on padding
    rows. Split like the rows, so every device selects among the rows it owns."""
    per_layer = [jnp.repeat(keep[i], stack.plan.num_blocks) for i in stack.members]
    padded = pad_rows(concat_rows(per_layer), stack.padding, False)
    return constrain_rows(padded, config.block_axis_name)


def unit_flags(
    config: EngineConfig, keep: list[Any], layouts: list[LeafLayout], stacks: list[Stack]
) -> list[Any]:
    """Per-layer ``keep`` flags as per-row flags of each unit: ``(rows,)`` per stack (False
    on padding rows, split like the rows) when the state is stacked, else ``(S·B,)`` per
    leaf."""
    if config.stacked_state:
        return [_row_flags(config, stack, keep) for stack in stacks]
    return [jnp.repeat(k, lay.plan.num_blocks) for k, lay in zip(keep, layouts)]


def select_units(config: EngineConfig, rows: list[Any], new: list[Any], old: list[Any]) -> list:
    """Per unit (a stack, or a leaf when the state is per leaf), ``new`` rows (factors,
    estimates or caches) where ``rows`` holds and ``old`` rows elsewhere; padding rows
    always keep ``old``, so they stay inert."""
    axis = config.block_axis_name
    return [
        tuple(constrain_rows(jnp.where(expand(flags, a), a, b), axis) for a, b in zip(n, o))
        if config.stacked_state
        else tuple(jnp.where(expand(flags, a), a, b) for a, b in zip(n, o))
        for flags, n, o in zip(rows, new, old)
    ]
