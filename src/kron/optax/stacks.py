"""How :mod:`kron.optax` groups leaves into stacks.

A leaf is laid out by :func:`kron.core.make_plan`; a leaf flagged as scanned contributes its
leading axis as that many stacked layers. Leaves that share a plan form one :class:`Stack` of
blocks, fitted in one batched call, its rows optionally padded so that it splits evenly over a
mesh axis. The row helpers here assemble and cut those stacks.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kron.core import LayoutOptions, Plan, make_plan


class LeafLayout(NamedTuple):
    """How one leaf is preconditioned: ``layers`` stacked copies of ``plan``."""

    plan: Plan
    layers: int

    @property
    def blocks(self) -> int:
        return self.layers * self.plan.num_blocks


def _is_masked(node: Any) -> bool:
    return isinstance(node, optax.MaskedNode)


def scanned_flags(scanned_layers: Any, tree: Any) -> list[bool]:
    """One bool per leaf of ``tree`` from a bool pytree or a function returning one."""
    count = len(jax.tree.leaves(tree))
    if scanned_layers is None:
        return [False] * count
    flags_tree = scanned_layers(tree) if callable(scanned_layers) else scanned_layers

    # Under optax.masked the leaves left out are MaskedNodes (no leaves of their own) where a
    # params-shaped flags tree has a bool: their flags are dropped.
    def flag_of(leaf: Any, flag: Any) -> bool | None:
        return None if _is_masked(leaf) else bool(flag)

    try:
        flagged = jax.tree.map(flag_of, tree, flags_tree, is_leaf=_is_masked)
        flags = jax.tree.leaves(flagged)
    except (ValueError, TypeError) as error:
        raise ValueError(
            "scanned_layers must be a pytree of bools with the structure of the params (or a "
            f"function of the params returning one): {error}"
        ) from None
    return flags


def leaf_layouts(leaves: list[Any], flags: list[bool], layout: LayoutOptions) -> list[LeafLayout]:
    """Each leaf's plan under ``layout``; a scanned leaf's leading axis counts its layers."""
    layouts = []
    for leaf, scanned in zip(leaves, flags):
        shape = tuple(jnp.shape(leaf))  # a Python number is a 0-d leaf
        if scanned and not shape:
            raise ValueError("a scanned leaf needs a leading layer axis; got a scalar leaf.")
        layer_shape = shape[1:] if scanned else shape
        plan = make_plan(layer_shape, layout)
        layouts.append(LeafLayout(plan, shape[0] if scanned else 1))
    return layouts


class Stack(NamedTuple):
    """Leaves that share one plan, fitted as one stack of blocks.

    ``members`` are leaf indices (flatten order) and ``layers`` their layer counts; member ``k``
    owns the next ``layers[k]·B`` rows. The ``real_rows`` blocks are stored in ``rows`` rows: when
    the state is sharded, the stack is padded to a multiple of the axis size with inert rows
    (identity factors, zero inputs, outputs dropped, state never kept) so that it splits evenly.
    """

    plan: Plan
    members: tuple[int, ...]
    layers: tuple[int, ...]
    rows: int

    @property
    def blocks(self) -> list[int]:
        """Rows of each member."""
        return [n * self.plan.num_blocks for n in self.layers]

    @property
    def real_rows(self) -> int:
        return sum(self.blocks)

    @property
    def padding(self) -> int:
        return self.rows - self.real_rows


def stacks_of(layouts: list[LeafLayout], multiple: int = 1) -> list[Stack]:
    """Leaves grouped by plan, in order of first appearance (a stack's index, folded into its
    random keys, is its position here); rows padded up to a multiple of ``multiple``."""
    members: dict[Plan, list[int]] = {}
    for index, layout in enumerate(layouts):
        members.setdefault(layout.plan, []).append(index)
    stacks = []
    for plan, indices in members.items():
        layers = tuple(layouts[i].layers for i in indices)
        real = sum(layers) * plan.num_blocks
        stacks.append(Stack(plan, tuple(indices), layers, -(-real // multiple) * multiple))
    return stacks


def concat_rows(arrays: list[Any]) -> Any:
    return arrays[0] if len(arrays) == 1 else jnp.concatenate(arrays)


def pad_rows(x: Any, padding: int, value: float = 0.0) -> Any:
    """``x`` with ``padding`` more rows of ``value`` at the end of its leading axis."""
    if not padding:
        return x
    return jnp.pad(x, [(0, padding)] + [(0, 0)] * (x.ndim - 1), constant_values=value)


def split_rows(array: Any, sizes: list[int]) -> list[Any]:
    """``array`` cut along its leading axis into consecutive pieces of ``sizes`` rows."""
    if len(sizes) == 1:
        return [array]
    cuts, total = [], 0
    for size in sizes[:-1]:
        total += size
        cuts.append(total)
    return jnp.split(array, cuts)


__all__ = [
    "LeafLayout",
    "Stack",
    "concat_rows",
    "leaf_layouts",
    "pad_rows",
    "scanned_flags",
    "split_rows",
    "stacks_of",
]
