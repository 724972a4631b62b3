"""eformer's state records, :class:`DenseState` and :class:`LeafState`, read from a ``quad`` or
``skew`` state.

eformer's white kron keeps its preconditioner in two kinds of record: one :class:`DenseState`
holding every block of every leaf whose merged 2-D view has two dense factors, padded to
``block_size × block_size`` and concatenated, and one :class:`LeafState` per leaf saying how the
leaf is laid out (and holding the factors of the leaves off that dense path). kron.optax keeps a
single :class:`~kron.optax.KronState` for every contract; :func:`white_kron_states` reads it as
eformer's records, so code written against them (inspection, logging, checkpoint converters)
runs on ours. The records are views: the update still takes the ``KronState``.

Both records are frozen dataclasses registered as pytrees (the arrays are children, the layout
fields static), with eformer's ``replace``, ``to_dict``/``from_dict`` and ``to_json``/``from_json``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kron.core import Plan
from kron.optax.quad_skew import quad, white_kron_layout
from kron.optax.stacks import leaf_layouts, scanned_flags, split_rows, stacks_of
from kron.optax.state import KronState, from_json_value, json_value

# LeafState.kind: eformer's three paths.
DENSE_PATH = 0  # a 2-D view with two dense factors; its blocks live in DenseState
LARGE_PATH = 1  # a 2-D view with a diagonal factor on at least one side
ONE_D_PATH = 2  # a view with one axis (vectors, scalars, matrices with a size-1 axis)

_ARRAY_FIELDS = ("Ql", "Qr", "Ll", "Lr", "valid_rows", "valid_cols")


class _Record:
    """eformer's serialisation methods for a frozen dataclass whose array fields are
    :data:`_ARRAY_FIELDS`."""

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict; arrays become NumPy arrays, the rest stays as it is."""
        data = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            data[field.name] = (
                _map_array(np.asarray, value) if field.name in _ARRAY_FIELDS else value
            )
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        """Inverse of :meth:`to_dict`; arrays become JAX arrays of the same dtype."""
        values = {}
        for field in dataclasses.fields(cls):
            value = data.get(field.name, field.default)
            values[field.name] = (
                _map_array(jnp.asarray, value)
                if field.name in _ARRAY_FIELDS
                else (tuple(value) if isinstance(value, list) else value)
            )
        return cls(**values)

    def to_json(self, **kwargs: Any) -> str:
        """The record as JSON (arrays restored bit for bit, bfloat16 included); ``kwargs`` go
        to :func:`json.dumps`."""
        return json.dumps({k: json_value(v) for k, v in self.to_dict().items()}, **kwargs)

    @classmethod
    def from_json(cls, text: str) -> Any:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict({k: from_json_value(v) for k, v in json.loads(text).items()})


def _map_array(function: Any, value: Any) -> Any:
    return None if value is None else function(value)


def _pytree(cls: type) -> type:
    names = [field.name for field in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(
        cls,
        data_fields=[n for n in names if n in _ARRAY_FIELDS],
        meta_fields=[n for n in names if n not in _ARRAY_FIELDS],
    )


@_pytree
@dataclasses.dataclass(frozen=True)
class DenseState(_Record):
    """Every block of the dense-path leaves, in the params' flatten order (a leaf's blocks in
    row-major grid order, layer by layer for a scanned leaf).

    Attributes:
      Ql, Qr: ``(valid_count, block_size, block_size)`` left and right factors in the state's
        dtype; each block's real rows and columns (``valid_rows``, ``valid_cols``) in the
        top-left corner, zeros in the rest (eformer's padding).
      Ll, Lr: ``(valid_count,)`` Lipschitz estimates of the left and right fits (float32).
      valid_rows, valid_cols: ``(valid_count,)`` int32, the real rows and columns of each block.
      valid_count: the number of blocks.
      block_size: the tile size.
    """

    Ql: Any
    Qr: Any
    Ll: Any
    Lr: Any
    valid_rows: Any
    valid_cols: Any
    valid_count: int
    block_size: int


@_pytree
@dataclasses.dataclass(frozen=True)
class LeafState(_Record):
    """How one leaf is preconditioned.

    Attributes:
      kind: :data:`DENSE_PATH`, :data:`LARGE_PATH` or :data:`ONE_D_PATH`.
      scanned: 1 if the leaf is a stack of scanned layers, else 0.
      B: the number of layers (the leading axis of a scanned leaf; 1 otherwise).
      shape: one layer's shape.
      merged: the view the factors act on: ``(m, n)``, or ``(m,)`` on the 1-D path.
      nr, nc: blocks along the rows and the columns (``nc`` None on the 1-D path).
      block_size: the tile size.
      diag_left, diag_right: whether the row (column) factor is diagonal (``diag_right`` None on
        the 1-D path).
      stack: the leaf's blocks, ``B·nr·nc``; a dense-path leaf owns that many consecutive rows of
        :class:`DenseState`.
      Ql, Qr: ``(stack, k, k)`` dense or ``(stack, k)`` diagonal factors, ``k`` the block's side
        (at most ``block_size``); None on the dense path, whose factors are in
        :class:`DenseState`, and ``Qr`` None on the 1-D path.
      Ll, Lr: ``(stack,)`` Lipschitz estimates, None where the factor is.
      valid_rows, valid_cols: ``(stack,)`` int32, the real rows and columns of each block (None
        on the dense path; ``valid_cols`` None on the 1-D path).
    """

    kind: int
    scanned: int
    B: int
    shape: tuple[int, ...] | None = None
    merged: tuple[int, ...] | None = None
    nr: int | None = None
    nc: int | None = None
    block_size: int | None = None
    diag_left: bool | None = None
    diag_right: bool | None = None
    stack: int | None = None
    Ql: Any = None
    Qr: Any = None
    Ll: Any = None
    Lr: Any = None
    valid_rows: Any = None
    valid_cols: Any = None


def white_kron_states(params: Any, opt_state: Any, **quad_kwargs: Any) -> tuple[DenseState, Any]:
    """eformer's records of a ``quad``/``skew`` state.

    Args:
      params: the params the state was built for (arrays or shape-dtype structs).
      opt_state: the state of ``quad(**quad_kwargs)``, ``skew(...)``, ``scale_by_quad(...)`` or
        ``scale_by_skew(...)``, or any pytree holding that :class:`~kron.optax.KronState`.
      **quad_kwargs: the options the optimizer was built with; only those that set the layout
        matter (``max_size_dense``, ``block_size``, ``scanned_layers``, ``pipeline_axis_name``,
        ``pipeline_axis_size``), the others are accepted and ignored.

    Returns:
      ``(dense, leaves)``: the :class:`DenseState` of the dense-path blocks and a tree like
      ``params`` of :class:`LeafState`.

    Raises:
      TypeError: for an option ``quad`` does not take.
      ValueError: when ``opt_state`` holds no ``KronState``, or its factors do not fit these
        params and options.
    """
    options = inspect.signature(quad).bind(**quad_kwargs)
    options.apply_defaults()
    options = options.arguments
    state = _kron_state(opt_state)
    leaves, treedef = jax.tree.flatten(params)
    flags = scanned_flags(options["scanned_layers"], params)
    layout = white_kron_layout(options["max_size_dense"], options["block_size"])
    layouts = leaf_layouts(leaves, flags, layout)
    units = _leaf_units(state, treedef, layouts, options)
    records, dense = [], []
    for flag, lay, (factors, lipschitz) in zip(flags, layouts, units):
        record = _leaf_record(lay.plan, lay.layers, int(flag), options["block_size"])
        _check_unit(lay.plan, record.stack, factors, len(records))
        rows, cols = _valid_counts(lay.plan, lay.layers)
        if record.kind == DENSE_PATH:
            dense.append((factors, lipschitz, rows, cols))
        elif record.kind == LARGE_PATH:
            record = record.replace(
                Ql=_zero_padding(factors[0], rows),
                Qr=_zero_padding(factors[1], cols),
                Ll=lipschitz[0],
                Lr=lipschitz[1],
                valid_rows=rows,
                valid_cols=cols,
            )
        else:
            record = record.replace(
                Ql=_zero_padding(factors[0], rows), Ll=lipschitz[0], valid_rows=rows
            )
        records.append(record)
    return _dense_state(dense, options["block_size"], state), treedef.unflatten(records)


def _kron_state(opt_state: Any) -> KronState:
    found = [
        x
        for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, KronState))
        if isinstance(x, KronState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"opt_state must hold exactly one KronState (the state of quad, skew, scale_by_quad "
            f"or scale_by_skew); found {len(found)} in a {type(opt_state).__name__}."
        )
    return found[0]


def _leaf_units(state: KronState, treedef: Any, layouts: list, options: dict) -> list:
    """Per leaf, its ``(factors, lipschitz)`` tuples, cut out of the stacks when the state is
    stacked over ``pipeline_axis_name``."""
    if options["pipeline_axis_name"] is None:
        try:
            return list(
                zip(treedef.flatten_up_to(state.factors), treedef.flatten_up_to(state.lipschitz))
            )
        except (ValueError, TypeError) as error:
            raise ValueError(
                "the state's factors are not laid out like these params (without "
                f"pipeline_axis_name, one tuple per leaf): {error}"
            ) from None
    stacks = stacks_of(layouts, options["pipeline_axis_size"])
    if not isinstance(state.factors, tuple) or len(state.factors) != len(stacks):
        raise ValueError(
            f"with pipeline_axis_name these params make {len(stacks)} factor stacks; the state "
            f"holds {len(state.factors) if isinstance(state.factors, tuple) else 'no'} stacks."
        )
    units: list[Any] = [None] * len(layouts)
    for stack, factors, lipschitz in zip(stacks, state.factors, state.lipschitz):
        pieces = [split_rows(x[: stack.real_rows], stack.blocks) for x in (*factors, *lipschitz)]
        order = stack.plan.order
        for k, member in enumerate(stack.members):
            cut = tuple(piece[k] for piece in pieces)
            units[member] = (cut[:order], cut[order:])
    return units


def _leaf_record(plan: Plan, layers: int, scanned: int, block_size: int) -> LeafState:
    merged = plan.work_shape
    if len(merged) == 1:
        kind = ONE_D_PATH
    elif len(merged) == 2:
        kind = DENSE_PATH if all(plan.dense) else LARGE_PATH
    else:  # white_kron_layout merges every leaf to at most 2 axes
        raise AssertionError(f"unexpected merged shape {merged}")
    two_d = kind != ONE_D_PATH
    return LeafState(
        kind=kind,
        scanned=scanned,
        B=layers,
        shape=plan.shape,
        merged=merged,
        nr=plan.grid[0],
        nc=plan.grid[1] if two_d else None,
        block_size=block_size,
        diag_left=not plan.dense[0],
        diag_right=not plan.dense[1] if two_d else None,
        stack=layers * plan.num_blocks,
    )


def _check_unit(plan: Plan, rows: int, factors: tuple, index: int) -> None:
    expected = [
        (rows, n, n) if dense else (rows, n) for n, dense in zip(plan.block_shape, plan.dense)
    ]
    found = [tuple(f.shape) for f in factors]
    if found != expected:
        raise ValueError(
            f"leaf {index} (shape {plan.shape}) needs factors shaped {expected}; the state holds "
            f"{found}: it was built for other params or other options."
        )


def _valid_counts(plan: Plan, layers: int) -> tuple[jax.Array, jax.Array | None]:
    """Real rows and columns of each block, ``(layers·num_blocks,)`` int32 each (columns None
    for a 1-D view); blocks run over the grid in row-major order, layer after layer."""
    counts = []
    for size, blocks, side in zip(plan.work_shape, plan.grid, plan.block_shape):
        counts.append(np.minimum(side, size - side * np.arange(blocks)))
    if len(counts) == 1:
        return jnp.asarray(np.tile(counts[0], layers), jnp.int32), None
    rows, cols = np.meshgrid(counts[0], counts[1], indexing="ij")
    return (
        jnp.asarray(np.tile(rows.ravel(), layers), jnp.int32),
        jnp.asarray(np.tile(cols.ravel(), layers), jnp.int32),
    )


def _dense_state(blocks: list, block_size: int, state: KronState) -> DenseState:
    """The dense-path leaves' blocks padded to ``block_size`` and concatenated."""
    if not blocks:
        dtype = _factor_dtype(state)
        empty_q = jnp.zeros((0, block_size, block_size), dtype)
        empty_l = jnp.zeros((0,), jnp.promote_types(dtype, jnp.float32))
        no_rows = jnp.zeros((0,), jnp.int32)
        return DenseState(empty_q, empty_q, empty_l, empty_l, no_rows, no_rows, 0, block_size)
    pad = partial(_pad_to, size=block_size)
    left = jnp.concatenate([pad(_zero_padding(f[0], rows)) for f, _, rows, _ in blocks])
    return DenseState(
        Ql=left,
        Qr=jnp.concatenate([pad(_zero_padding(f[1], cols)) for f, _, _, cols in blocks]),
        Ll=jnp.concatenate([lipschitz[0] for _, lipschitz, _, _ in blocks]),
        Lr=jnp.concatenate([lipschitz[1] for _, lipschitz, _, _ in blocks]),
        valid_rows=jnp.concatenate([rows for _, _, rows, _ in blocks]),
        valid_cols=jnp.concatenate([cols for _, _, _, cols in blocks]),
        valid_count=int(left.shape[0]),
        block_size=block_size,
    )


def _pad_to(q: Any, size: int) -> Any:
    """``(R, k, k)`` -> ``(R, size, size)``: ``q`` in the top-left corner, zeros around it."""
    k = q.shape[-1]
    if k == size:
        return q
    return jnp.zeros((q.shape[0], size, size), q.dtype).at[:, :k, :k].set(q)


def _zero_padding(q: Any, valid: Any) -> Any:
    """``q`` (``(R, k, k)`` or diagonal ``(R, k)``) with the rows and columns past each block's
    ``valid`` count zeroed, as eformer keeps them. Our own state leaves them at whatever the fit
    made of them (masked out of every statistic, they never reach a real entry), but eformer's
    QUAD update grows a nonzero padded corner without bound, so a record it reads must not hold
    one."""
    inside = jnp.arange(q.shape[-1])[None, :] < valid[:, None]
    if q.ndim == 3:
        inside = inside[:, :, None] & inside[:, None, :]
    return jnp.where(inside, q, jnp.zeros((), q.dtype))


def _factor_dtype(state: KronState) -> Any:
    factors = jax.tree.leaves(state.factors)
    return factors[0].dtype if factors else jnp.bfloat16


__all__ = [
    "DENSE_PATH",
    "LARGE_PATH",
    "ONE_D_PATH",
    "DenseState",
    "LeafState",
    "white_kron_states",
]
