"""eformer's state records (``DenseState``, ``LeafState``) read from a ``quad``/``skew`` state:
each leaf's path and block counts follow its layout, the records hold exactly the state's factors
(zeros past each block's real rows and columns, as eformer pads), a stacked state reads the same
as a per-leaf one, and the records serialise and travel through ``jit``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kron.core import make_plan
from kron.optax import DenseState, LeafState, quad, scale_by_skew, white_kron_states
from kron.optax.quad_skew import white_kron_layout
from kron.optax.white_kron_state import DENSE_PATH, LARGE_PATH, ONE_D_PATH

BLOCK = 8
# Blocks of 8 and dense factors up to 16: a longer axis gets a diagonal factor and stays whole.
PARAMS = {
    "tall": jnp.zeros((20, 12)),  # rows diagonal and whole; columns dense in blocks of 8 + 4
    "wide": jnp.zeros((3, 30)),  # rows dense, columns diagonal and whole
    "grid": jnp.zeros((12, 10)),  # a 2 × 2 grid of dense blocks: (8 + 4) × (8 + 2)
    "conv": jnp.zeros((3, 2, 2, 2)),  # merged to 2-D, both sides dense
    "scan": jnp.zeros((2, 6, 5)),  # two scanned layers, both sides dense
    "bias": jnp.zeros(11),  # the 1-D path: one diagonal factor, longer than a block, not tiled
    "row": jnp.zeros((1, 6)),  # a size-1 axis: the 1-D path too (eformer: size == longest axis)
}
SCANNED = {name: name == "scan" for name in PARAMS}
OPTIONS = dict(block_size=BLOCK, max_size_dense=16, scanned_layers=SCANNED, dtype=jnp.float32)
KINDS = {
    "tall": LARGE_PATH,
    "wide": LARGE_PATH,
    "grid": DENSE_PATH,
    "conv": DENSE_PATH,
    "scan": DENSE_PATH,
    "bias": ONE_D_PATH,
    "row": ONE_D_PATH,
}


def _trained_state(**options):
    tx = quad(learning_rate=1e-2, **options)
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(0)
    for _ in range(3):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), PARAMS)
        _, state = update(grads, state, PARAMS)
    return state


@pytest.fixture(scope="module")
def state():
    return _trained_state(**OPTIONS)


def _real_rows_and_cols(name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Per block, the rows (columns) holding real entries, counted on the plan's padding mask."""
    layers = 2 if name == "scan" else 1
    shape = PARAMS[name].shape[1:] if name == "scan" else PARAMS[name].shape
    plan = make_plan(shape, white_kron_layout(OPTIONS["max_size_dense"], BLOCK))
    mask = plan.mask()
    if mask is None:
        mask = np.ones((plan.num_blocks, *plan.block_shape))
    rows = np.tile(mask.any(axis=tuple(range(2, mask.ndim))).sum(axis=1), layers)
    cols = np.tile(mask.any(axis=1).sum(axis=1), layers) if mask.ndim == 3 else None
    return rows, cols


def _real_part(factor, real, size: int) -> np.ndarray:
    """What a record holds for a stored ``factor`` (``(R, k, k)`` or ``(R, k)``): per block, its
    ``real[r]`` real rows and columns, zeros everywhere else (eformer's padding), ``size`` wide."""
    factor = np.asarray(factor)
    out = np.zeros((factor.shape[0], *(size,) * (factor.ndim - 1)), factor.dtype)
    for r, n in enumerate(real):
        block = (r, *(slice(0, n),) * (factor.ndim - 1))
        out[block] = factor[block]
    return out


def test_leaf_records_follow_the_layout(state):
    _, leaves = white_kron_states(PARAMS, state, **OPTIONS)
    assert {name: leaf.kind for name, leaf in leaves.items()} == KINDS
    tall, wide, scan, bias, row = (leaves[k] for k in ("tall", "wide", "scan", "bias", "row"))
    assert (tall.merged, tall.nr, tall.nc, tall.stack) == ((20, 12), 1, 2, 2)
    assert (tall.diag_left, tall.diag_right) == (True, False)
    assert tall.Ql.shape == (2, 20) and tall.Qr.shape == (2, 8, 8)
    assert (wide.diag_left, wide.diag_right, wide.nr, wide.nc, wide.stack) == (False, True, 1, 1, 1)
    assert (scan.scanned, scan.B, scan.shape, scan.stack) == (1, 2, (6, 5), 2)
    assert leaves["conv"].merged in {(4, 6), (6, 4)}
    assert (bias.merged, bias.nr, bias.stack, bias.diag_left) == ((11,), 1, 1, True)
    assert bias.Ql.shape == (1, 11) and bias.Ll.shape == (1,)
    assert (row.merged, row.nc, row.diag_left, row.diag_right) == ((6,), None, True, None)
    assert row.Qr is None
    assert row.Ql.shape == (1, 6)
    for name in ("tall", "wide", "bias", "row"):  # the dense path keeps its counts in DenseState
        rows, cols = _real_rows_and_cols(name)
        np.testing.assert_array_equal(leaves[name].valid_rows, rows)
        if cols is None:
            assert leaves[name].valid_cols is None
        else:
            np.testing.assert_array_equal(leaves[name].valid_cols, cols)
    for name, leaf in leaves.items():
        on_dense_path = leaf.kind == DENSE_PATH
        assert (leaf.Ql is None) == on_dense_path, name


def test_records_hold_the_states_factors(state):
    dense, leaves = white_kron_states(PARAMS, state, **OPTIONS)
    kron_state = state[0]
    start = 0
    for name in sorted(PARAMS):  # a dict flattens in key order, and so do DenseState's rows
        leaf = leaves[name]
        factors, lipschitz = kron_state.factors[name], kron_state.lipschitz[name]
        real_rows, real_cols = _real_rows_and_cols(name)
        if leaf.kind != DENSE_PATH:
            order = len(factors)
            records = (leaf.Ql, leaf.Qr)[:order] + (leaf.Ll, leaf.Lr)[:order]
            for record, stored, real in zip(records[:order], factors, (real_rows, real_cols)):
                np.testing.assert_array_equal(record, _real_part(stored, real, record.shape[-1]))
            for record, stored in zip(records[order:], lipschitz, strict=True):
                np.testing.assert_array_equal(record, stored)
            continue
        rows = slice(start, start + leaf.stack)
        start += leaf.stack
        np.testing.assert_array_equal(dense.valid_rows[rows], real_rows)
        np.testing.assert_array_equal(dense.valid_cols[rows], real_cols)
        pairs = zip((dense.Ql[rows], dense.Qr[rows]), factors, (real_rows, real_cols))
        for padded, stored, real in pairs:
            np.testing.assert_array_equal(padded, _real_part(stored, real, BLOCK))
        np.testing.assert_array_equal(dense.Ll[rows], lipschitz[0])
        np.testing.assert_array_equal(dense.Lr[rows], lipschitz[1])
    assert dense.valid_count == start == 1 + 4 + 2  # conv, the grid's 2 × 2, two scan layers
    assert dense.Ql.shape == (start, BLOCK, BLOCK) and dense.block_size == BLOCK


def test_stacked_state_reads_like_the_per_leaf_state(state):
    per_leaf = white_kron_states(PARAMS, state, **OPTIONS)
    stacked_options = dict(OPTIONS, pipeline_axis_name="dp", pipeline_axis_size=4)
    stacked = white_kron_states(PARAMS, _trained_state(**stacked_options), **stacked_options)
    assert jax.tree.structure(stacked) == jax.tree.structure(per_leaf)
    for a, b in zip(jax.tree.leaves(per_leaf), jax.tree.leaves(stacked)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_records_serialise_and_pass_through_jit():
    options = dict(OPTIONS, dtype=jnp.bfloat16)
    dense, leaves = white_kron_states(PARAMS, _trained_state(**options), **options)
    assert dense.Ql.dtype == jnp.bfloat16
    restored = DenseState.from_json(dense.to_json())
    assert restored.valid_count == dense.valid_count
    for a, b in zip(jax.tree.leaves(dense), jax.tree.leaves(restored)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    wide = leaves["wide"]
    no_arrays = dict.fromkeys(("Ql", "Qr", "Ll", "Lr", "valid_rows", "valid_cols"))
    for record in (LeafState.from_json(wide.to_json()), LeafState.from_dict(wide.to_dict())):
        assert record.replace(**no_arrays) == wide.replace(**no_arrays)
        for a, b in zip(jax.tree.leaves(wide), jax.tree.leaves(record)):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
    # The layout fields are static: jit sees only the six arrays, and returns the same record.
    assert len(jax.tree.leaves(wide)) == 6
    doubled = jax.jit(lambda r: r.replace(Ll=2 * r.Ll))(wide)
    assert (doubled.kind, doubled.merged, doubled.nc) == (LARGE_PATH, (3, 30), 1)
    np.testing.assert_array_equal(doubled.Ll, 2 * wide.Ll)


def test_without_dense_leaves_the_dense_record_is_empty():
    params = {"bias": jnp.zeros(5)}
    tx = scale_by_skew(block_size=4)
    dense, leaves = white_kron_states(params, tx.init(params), block_size=4)
    assert dense.valid_count == 0 and dense.Ql.shape == (0, 4, 4)
    assert dense.Ql.dtype == jnp.bfloat16 and dense.Ll.dtype == jnp.float32
    assert leaves["bias"].kind == ONE_D_PATH


def test_mismatched_input_is_refused(state):
    with pytest.raises(ValueError, match="needs factors shaped"):
        white_kron_states(PARAMS, state, **dict(OPTIONS, block_size=4))
    with pytest.raises(ValueError, match="not laid out like these params"):
        white_kron_states({"only": jnp.zeros(3)}, state, block_size=BLOCK, max_size_dense=7)
    with pytest.raises(ValueError, match="factor stacks"):
        white_kron_states(PARAMS, state, **dict(OPTIONS, pipeline_axis_name="dp"))
    with pytest.raises(ValueError, match="exactly one KronState"):
        white_kron_states(PARAMS, (), **OPTIONS)
    with pytest.raises(TypeError, match="lr"):
        white_kron_states(PARAMS, state, lr=1e-3)


def test_a_python_number_leaf_reads_as_a_0d_array():
    """``quad`` takes a Python number as a 0-d leaf, so its records must too."""
    as_number = {"w": jnp.ones((3, 4)), "s": 1.5}
    as_array = {"w": jnp.ones((3, 4)), "s": jnp.asarray(1.5)}
    tx = quad(learning_rate=1e-2)
    _, from_number = white_kron_states(as_number, tx.init(as_number))
    _, from_array = white_kron_states(as_array, tx.init(as_array))
    assert from_number["s"].kind == from_array["s"].kind == ONE_D_PATH
    np.testing.assert_array_equal(from_number["s"].Ql, from_array["s"].Ql)
