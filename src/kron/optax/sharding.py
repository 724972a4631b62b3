"""Where the state of a :mod:`kron.optax` transformation lives on a device mesh.

With a mesh axis (``pipeline_axis_name``, the engine's ``block_axis_name``), the factors,
Lipschitz estimates and cached preconditioners are kept as one stack of rows per plan, ``(R, ...)``
with ``R`` padded to a multiple of the axis size, and their leading axis is split over the axis:
each device owns ``R / axis_size`` rows (the distributed-Shampoo pattern). The momentum follows the
parameters' specs. Scalars (count, key, counters) are replicated. Without an axis everything but
the momentum is replicated.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
from jax.sharding import PartitionSpec

from kron.optax.state import KronState


def check_axis_options(axis_name: Any, axis_size: Any) -> None:
    """Validate the ``pipeline_axis_name``/``pipeline_axis_size`` pair of a constructor.

    ``axis_name`` is ``None`` or a string; ``axis_size`` a positive int, and more than 1 only with
    an axis name (a size without a name would silently shard nothing).
    """
    if axis_name is not None and not isinstance(axis_name, str):
        raise ValueError(
            f"pipeline_axis_name must be a mesh axis name (str) or None; got {axis_name!r}."
        )
    if isinstance(axis_size, bool) or not isinstance(axis_size, numbers.Integral) or axis_size < 1:
        raise ValueError(f"pipeline_axis_size must be a positive int; got {axis_size!r}.")
    if axis_name is None and axis_size > 1:
        raise ValueError(
            f"pipeline_axis_size={axis_size} needs a pipeline_axis_name (the mesh axis to split "
            "the factor stacks over); got pipeline_axis_name=None."
        )


def block_spec(shape: tuple[int, ...], axis_name: str | None, axis_size: int) -> PartitionSpec:
    """``P(axis_name, None, ...)`` for a stack of rows, ``P()`` (replicated) without an axis.

    Stacks are padded to a multiple of ``axis_size`` when they are built, so a length that does
    not divide means the state was made with another axis size: that raises ``ValueError``.
    """
    if axis_name is None or not shape:
        return PartitionSpec()
    if shape[0] % axis_size:
        raise ValueError(
            f"a factor stack of {shape[0]} rows cannot be split over pipeline_axis_size="
            f"{axis_size}; the state was built with another pipeline_axis_size (stacks are "
            "padded to a multiple of it)."
        )
    return PartitionSpec(axis_name, *([None] * (len(shape) - 1)))


def specs_like(tree: Any, params_partition_specs: Any) -> Any:
    """``params_partition_specs`` in ``tree``'s structure (``tree`` is the params, the momentum or
    the updates). It is one ``PartitionSpec`` for every leaf (eformer's single-spec form) or a
    tree shaped like the params, read by each leaf's path, so a tree that ``optax.masked``
    thinned out (``MaskedNode`` in place of the leaves it left out) takes the specs of the leaves
    it kept."""
    if isinstance(params_partition_specs, PartitionSpec):
        return jax.tree.map(lambda _: params_partition_specs, tree)
    given = jax.tree_util.tree_flatten_with_path(
        params_partition_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )[0]
    by_path = dict(given)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    missing = [path for path, _ in leaves if not isinstance(by_path.get(path), PartitionSpec)]
    if missing:
        raise ValueError(
            "params_partition_specs must be one PartitionSpec or a tree of them shaped like the "
            f"params; it has no PartitionSpec at {jax.tree_util.keystr(missing[0]) or 'the root'} "
            f"(its leaves: {[jax.tree_util.keystr(path) for path, _ in given]})."
        )
    return treedef.unflatten([by_path[path] for path, _ in leaves])


def param_specs(params: Any, params_partition_specs: Any = None) -> Any:
    """The given specs in the params' structure, or each param's own ``.sharding.spec``
    (``P()`` when it has none)."""
    if params_partition_specs is not None:
        return specs_like(params, params_partition_specs)
    return jax.tree.map(
        lambda p: getattr(getattr(p, "sharding", None), "spec", None) or PartitionSpec(), params
    )


def kron_state_specs(
    state: KronState, axis_name: str | None, axis_size: int, mu_specs: Any
) -> KronState:
    """The spec of every leaf of ``state`` (arrays or ``ShapeDtypeStruct``s)."""
    replicated = PartitionSpec()

    def rows(tree: Any) -> Any:
        return jax.tree.map(lambda x: block_spec(tuple(x.shape), axis_name, axis_size), tree)

    return KronState(
        count=replicated,
        mu=(
            specs_like(state.mu, mu_specs)
            if mu_specs is not None
            else jax.tree.map(lambda _: replicated, state.mu)
        ),
        factors=rows(state.factors),
        lipschitz=rows(state.lipschitz),
        decision_total=replicated,
        needs_scale_init=replicated,
        skipped=jax.tree.map(lambda _: replicated, state.skipped),
        key=replicated,
        cache=rows(state.cache),
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


def check_mesh(axis_name: str | None = None, axis_size: int = 1) -> None:
    """Check the active mesh (``jax.set_mesh``) against the transformation's axis options.

    No mesh: nothing to check (the transformation runs on one device, or the caller places the
    state with ``jit`` shardings). A mesh with explicit axes raises ``NotImplementedError``: the
    core reshapes blocks without naming output shardings, which explicit sharding requires. With
    ``axis_name`` given, the mesh must have that axis, of size ``axis_size`` (``ValueError``).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return
    if mesh.explicit_axes:
        raise NotImplementedError(
            f"kron.optax runs under meshes with automatic axes; the active mesh has explicit axes "
            f"{mesh.explicit_axes}. Build it with axis_types=(jax.sharding.AxisType.Auto, ...)."
        )
    if axis_name is None:
        return
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"pipeline_axis_name={axis_name!r} is not an axis of the active mesh; its axes are "
            f"{tuple(mesh.axis_names)}."
        )
    actual = mesh.shape[axis_name]
    if actual != axis_size:
        raise ValueError(
            f"pipeline_axis_size={axis_size} but mesh axis {axis_name!r} has {actual} devices; "
            f"pass pipeline_axis_size={actual}."
        )


def _mesh_has(axis_name: str | None) -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return axis_name is not None and not mesh.empty and axis_name in mesh.axis_names


def constrain_rows(x: Any, axis_name: str | None, dim: int = 0) -> Any:
    """Split dimension ``dim`` of ``x`` (the leading row axis by default) over ``axis_name`` when a
    mesh with that axis is active; otherwise return ``x`` unchanged."""
    if not _mesh_has(axis_name):
        return x
    spec = [None] * x.ndim
    spec[dim] = axis_name
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def constrain_spec(x: Any, spec: PartitionSpec) -> Any:
    """``x`` pinned to ``spec`` while a mesh is active; unchanged without one."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec)


def constrain(state: KronState, axis_name: str | None, axis_size: int, mu_specs: Any) -> KronState:
    """Pin ``state`` to its specs when a mesh with ``axis_name`` is active (``jax.set_mesh``);
    under a mesh without that axis (or without an axis name) pin only the momentum, to
    ``mu_specs`` when given; otherwise return it unchanged, so the same transformation runs on
    one device."""
    if _mesh_has(axis_name):
        specs = kron_state_specs(state, axis_name, axis_size, mu_specs)
        return jax.tree.map(jax.lax.with_sharding_constraint, state, specs)
    if mu_specs is None or jax.sharding.get_abstract_mesh().empty:
        return state
    specs = specs_like(state.mu, mu_specs)
    return state._replace(mu=jax.tree.map(jax.lax.with_sharding_constraint, state.mu, specs))


def constrain_like_params(updates: Any, params_partition_specs: Any) -> Any:
    """Pin the updates to the params' specs when they are given and a mesh is active."""
    mesh = jax.sharding.get_abstract_mesh()
    if params_partition_specs is None or mesh.empty:
        return updates
    specs = specs_like(updates, params_partition_specs)
    return jax.tree.map(jax.lax.with_sharding_constraint, updates, specs)


def bytes_on(device: Any, tree: Any) -> int:
    """Bytes of the shards of ``tree``'s arrays that live on ``device``: what one device of a
    mesh holds of a params or optimizer-state tree (for the benchmarks and the mesh tests)."""
    return sum(
        shard.data.nbytes
        for leaf in jax.tree.leaves(tree)
        for shard in leaf.addressable_shards
        if shard.device == device
    )


__all__ = [
    "block_spec",
    "bytes_on",
    "chain_state_specs",
    "check_axis_options",
    "check_mesh",
    "constrain",
    "constrain_like_params",
    "constrain_rows",
    "constrain_spec",
    "kron_state_specs",
    "param_specs",
    "specs_like",
]
