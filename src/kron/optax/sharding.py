"""Where the state of a :mod:`kron.optax` transformation lives on a device mesh.

Factors and Lipschitz estimates are stacks of blocks, ``(S·B, ...)``; their leading axis is
split over one mesh axis (eformer's ``pipeline_axis_name``, the distributed-Shampoo pattern: each
device owns a slice of the blocks) when the block count divides evenly, and replicated otherwise.
The momentum follows the parameters' specs. Scalars are replicated.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import PartitionSpec

from kron.optax.state import KronState


def block_spec(shape: tuple[int, ...], axis_name: str | None, axis_size: int) -> PartitionSpec:
    """``P(axis_name, None, ...)`` for a block stack whose length divides by ``axis_size``,
    else ``P()`` (replicated)."""
    if axis_name is None or not shape or shape[0] % axis_size:
        return PartitionSpec()
    return PartitionSpec(axis_name, *([None] * (len(shape) - 1)))


def param_specs(params: Any, params_partition_specs: Any = None) -> Any:
    """The given specs, or each param's own ``.sharding.spec`` (``P()`` when it has none)."""
    if params_partition_specs is not None:
        return params_partition_specs
    return jax.tree.map(
        lambda p: getattr(getattr(p, "sharding", None), "spec", None) or PartitionSpec(), params
    )


def kron_state_specs(
    state: KronState, axis_name: str | None, axis_size: int, mu_specs: Any
) -> KronState:
    """The spec of every leaf of ``state`` (arrays or ``ShapeDtypeStruct``s)."""
    replicated = PartitionSpec()

    def blocks(tree: Any) -> Any:
        return jax.tree.map(lambda x: block_spec(tuple(x.shape), axis_name, axis_size), tree)

    return KronState(
        count=replicated,
        mu=mu_specs if mu_specs is not None else jax.tree.map(lambda _: replicated, state.mu),
        factors=blocks(state.factors),
        lipschitz=blocks(state.lipschitz),
        decision_total=replicated,
        needs_scale_init=replicated,
        skipped=jax.tree.map(lambda _: replicated, state.skipped),
        key=replicated,
        cache=blocks(state.cache),
    )


def chain_state_specs(state: Any, axis_name: str | None, axis_size: int, mu_specs: Any) -> Any:
    """Specs for a whole (chained) optimizer state: :func:`kron_state_specs` for every
    :class:`KronState` in it, ``P()`` for every other leaf. The tree always has the state's
    structure, whatever the chain holds."""

    def spec(node: Any) -> Any:
        if isinstance(node, KronState):
            return kron_state_specs(node, axis_name, axis_size, mu_specs)
        return PartitionSpec()

    return jax.tree.map(spec, state, is_leaf=lambda node: isinstance(node, KronState))


def check_mesh() -> None:
    """Raise if the active mesh has explicit axes: the core reshapes blocks without naming output
    shardings, which explicit sharding requires. Automatic (GSPMD) axes are supported."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.explicit_axes:
        raise NotImplementedError(
            f"kron.optax runs under meshes with automatic axes; the active mesh has explicit axes "
            f"{mesh.explicit_axes}. Build it with axis_types=(jax.sharding.AxisType.Auto, ...)."
        )


def _mesh_has(axis_name: str | None) -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return axis_name is not None and not mesh.empty and axis_name in mesh.axis_names


def constrain(state: KronState, axis_name: str | None, axis_size: int, mu_specs: Any) -> KronState:
    """Pin ``state`` to its specs when a mesh with ``axis_name`` is active (``jax.set_mesh``);
    otherwise return it unchanged, so the same transformation runs on one device."""
    if not _mesh_has(axis_name):
        return state
    specs = kron_state_specs(state, axis_name, axis_size, mu_specs)
    return jax.tree.map(jax.lax.with_sharding_constraint, state, specs)


def constrain_like_params(updates: Any, params_partition_specs: Any) -> Any:
    """Pin the updates to the params' specs when they are given and a mesh is active."""
    mesh = jax.sharding.get_abstract_mesh()
    if params_partition_specs is None or mesh.empty:
        return updates
    return jax.tree.map(jax.lax.with_sharding_constraint, updates, params_partition_specs)


__all__ = [
    "block_spec",
    "chain_state_specs",
    "check_mesh",
    "constrain",
    "constrain_like_params",
    "kron_state_specs",
    "param_specs",
]
