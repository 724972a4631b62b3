"""The checks :mod:`kron.optax.engine` runs on params, gradients and state while it traces.

They run in Python, on shapes, dtypes and tree structures only, so a jitted step pays nothing
for them. Each raises a ``ValueError`` that names the leaf (its path in the tree, as
``jax.tree_util.keystr`` writes it) and the likely cause (a state built for other params or with
other options), where JAX would otherwise fail deep inside the update, printing every array or
naming no leaf.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import dtypes

from kron.core import Plan
from kron.optax.options import EngineConfig
from kron.optax.stacks import LeafLayout, Stack, leaf_layouts, scanned_flags, stacks_of
from kron.optax.state import KronState
from kron.optax.units import cached, initial_factors, initial_lipschitz


def check_leaves(params: Any, flags: list[bool]) -> None:
    """Refuse by name the leaves the fit cannot take: complex ones would lose their imaginary
    part in the real-valued fit, integer and boolean ones have no gradient to fit on (JAX
    gives them float0 gradients), and empty ones (a scanned leaf of zero layers too) have
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
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise ValueError(
                f"kron.optax steps floating-point leaves only; got {jnp.result_type(leaf)} at "
                f"{jax.tree_util.keystr(path) or 'the root'}. Leave it out with optax.masked, "
                "or step it with another transformation (optax.multi_transform)."
            )


def check_newton_args(config: EngineConfig, params: Any, value_fn: Any) -> None:
    """Newton type fits on Hessian-vector products, so its update needs the params and the loss."""
    if config.newton and (params is None or value_fn is None):
        raise ValueError(
            "preconditioner_type='newton' needs update(grads, state, params, "
            "value_fn=loss_of_params); got "
            f"params={'None' if params is None else 'given'}, "
            f"value_fn={'None' if value_fn is None else 'given'}."
        )


def checked_layouts(
    config: EngineConfig,
    state: KronState,
    updates: Any,
    treedef: Any,
    grads: list[Any],
    templates: dict[Plan, Any],
) -> tuple[list[LeafLayout], list[Stack]]:
    """The gradients' layouts and stacks, once the state has been checked against them: its
    structure, the momentum's shapes and dtype, and every unit's shapes and dtypes.
    ``templates`` caches :func:`unit_template` per plan for the transformation's lifetime."""
    if not config.stacked_state:
        check_per_leaf(state, treedef)
    check_gradients(config, state, updates, treedef, grads)
    flags = scanned_flags(config.scanned_layers, updates)
    layouts = leaf_layouts(grads, flags, config.step.layout)
    stacks = stacks_of(layouts, config.row_multiple)
    if config.stacked_state:
        check_stacked(config, state, stacks)
    check_units(config, state, updates, treedef, layouts, stacks, templates)
    return layouts, stacks


def check_per_leaf(state: KronState, treedef: Any) -> None:
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


def check_gradients(
    config: EngineConfig, state: KronState, updates: Any, treedef: Any, grads: list[Any]
) -> None:
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


def check_stacked(config: EngineConfig, state: KronState, stacks: list[Stack]) -> None:
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


def check_units(
    config: EngineConfig,
    state: KronState,
    updates: Any,
    treedef: Any,
    layouts: list[LeafLayout],
    stacks: list[Stack],
    templates: dict[Plan, Any],
) -> None:
    """Each unit's factors, Lipschitz estimates and caches must have the shapes and dtypes
    that init makes for these params. A state built with other options (another layout,
    geometry, dtype or caching) otherwise either ran on with the wrong factors (with
    ``max_skew_triangular=0``, diagonal factors where this transformation fits dense ones)
    or failed inside ``lax.cond`` naming neither the leaf nor the cause."""
    stacked = config.stacked_state
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
        for (what, _), have, want in zip(parts, found, unit_template(config, plan, templates)):
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


def unit_template(config: EngineConfig, plan: Plan, templates: dict[Plan, Any]) -> Any:
    """Shapes and dtypes of one row's factors, Lipschitz estimates and caches as init makes
    them, traced once per plan (nothing is computed) and kept in ``templates``."""
    if plan not in templates:

        def one_row() -> Any:
            factors = initial_factors(config, plan, 1.0, 1)
            return factors, initial_lipschitz(config, plan, 1), cached(config, factors)

        templates[plan] = jax.eval_shape(one_row)
    return templates[plan]


def _leaf_name(tree: Any, index: int) -> str:
    """The path of ``tree``'s leaf number ``index``, as an error message names it."""
    path = jax.tree_util.tree_flatten_with_path(tree)[0][index][0]
    return jax.tree_util.keystr(path) or "the root"


def _shapes(parts: list[tuple[tuple[int, ...], Any]]) -> str:
    """``[(shape, dtype), ...]`` as ``"(1, 3, 3) float32, (1, 4) float32"``; ``"none"``."""
    return ", ".join(f"{shape} {jnp.dtype(dtype).name}" for shape, dtype in parts) or "none"
