"""Layout plans (algorithm.md §2.2-2.3): dense/diagonal decisions, squeeze, merge, blocking."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kron.core import LayoutOptions, get_ops, make_plan
from kron.core.layout import squarest_split

INF = math.inf
# kron_torch's rule family: max_size_triangular=8192, min_ndim_triangular=2, no skew rule.
KT = {"max_size": 8192, "max_skew": INF, "min_ndim_dense": 2}


# --------------------------------------------------------------------------------------------
# psgd_torch family: diagonal iff n == 1, n > max_size or n² > max_skew·N.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "options", "dense"),
    [
        ((5,), LayoutOptions(), (False,)),  # n² = 25 > 5: vectors are diagonal by default
        ((5,), LayoutOptions(max_skew=INF), (True,)),
        ((6, 6), LayoutOptions(), (True, True)),
        ((5, 7), LayoutOptions(), (True, False)),  # 49 > 35: the long side is diagonal
        ((7, 5), LayoutOptions(), (False, True)),
        ((2, 100), LayoutOptions(), (True, False)),
        ((3, 4, 5), LayoutOptions(), (True, True, True)),  # 25 <= 60
        ((5, 7), LayoutOptions(max_skew=0.0), (False, False)),
        ((5, 7), LayoutOptions(max_skew=INF), (True, True)),
        ((10, 3), LayoutOptions(max_size=5, max_skew=INF), (False, True)),
        # max_skew boundary: n² == max_skew·N stays dense (the rule is strict).
        ((5, 10), LayoutOptions(max_skew=2.0), (True, True)),
        ((5, 11), LayoutOptions(max_skew=2.0), (True, False)),
        # max_size boundary: n == max_size stays dense.
        ((4, 5), LayoutOptions(max_size=5, max_skew=INF), (True, True)),
        ((4, 6), LayoutOptions(max_size=5, max_skew=INF), (True, False)),
    ],
)
def test_psgd_torch_rule(shape, options, dense):
    assert make_plan(shape, options).dense == dense


# --------------------------------------------------------------------------------------------
# kron_torch family: diagonal iff n == 1, n > max_size, k < min_ndim or memory_save_mode marks it.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "mode", "dense"),
    [
        ((5,), None, (False,)),  # order 1 < min_ndim_dense = 2
        ((5, 7), None, (True, True)),
        ((5, 9000), None, (True, False)),  # 9000 > max_size_triangular
        ((5, 7), "one_diag", (True, False)),
        ((7, 5), "one_diag", (False, True)),
        ((5, 7), "smart_one_diag", (True, False)),
        ((5, 7), "one_triu", (True, False)),
        ((5, 7), "all_diag", (False, False)),
        ((7, 3, 7, 2), "one_triu", (False, False, False, True)),
        ((4, 9, 6), "one_diag", (True, False, True)),
        ((4, 9, 6), "smart_one_diag", (True, False, True)),
        ((4, 9, 6), "one_triu", (True, False, False)),
        # Ties, as documented in LayoutOptions: one_diag marks the *last* of the largest axes,
        # smart_one_diag marks nothing, one_triu keeps the *first* of the smallest axes dense.
        ((6, 6), "one_diag", (True, False)),
        ((6, 6), "smart_one_diag", (True, True)),
        ((6, 6), "one_triu", (True, False)),
        ((6, 4, 6), "one_diag", (True, True, False)),
        ((6, 4, 6), "smart_one_diag", (True, True, True)),
        ((4, 6, 4), "one_triu", (True, False, False)),
        ((3, 3, 3), "one_triu", (True, False, False)),
    ],
)
def test_kron_torch_rule(shape, mode, dense):
    assert make_plan(shape, LayoutOptions(**KT, memory_save_mode=mode)).dense == dense


@pytest.mark.parametrize("shape", [(5, 7), (6, 6), (6, 4, 6), (2, 2, 2, 2), (3, 8, 8, 1, 2)])
def test_one_diag_matches_numpy_argsort(shape):
    """kron_torch marks ``np.argsort(shape)[::-1][0]`` (stable sort for these short shapes)."""
    plan = make_plan(shape, LayoutOptions(max_skew=INF, memory_save_mode="one_diag"))
    work = plan.work_shape
    expected = int(np.argsort(work, kind="stable")[::-1][0])
    assert [i for i, d in enumerate(plan.dense) if not d] == [expected]


@pytest.mark.parametrize("mode", ["one_diag", "smart_one_diag", "one_triu"])
def test_memory_modes_on_a_vector(mode):
    # Order 1, no min_ndim: one_diag marks the only axis; smart_one_diag needs a second axis to
    # compare with; one_triu keeps the smallest axis (the only one) dense.
    dense = make_plan((5,), LayoutOptions(max_skew=INF, memory_save_mode=mode)).dense
    assert dense == ((False,) if mode == "one_diag" else (True,))


def test_min_ndim_dense_counts_axes_before_squeeze():
    """kron_torch compares the parameter's own ndim (LayoutOptions: "before squeezing")."""
    options = LayoutOptions(**KT)
    assert make_plan((5,), options).dense == (False,)
    assert make_plan((1, 5), options).dense == (True,)  # ndim 2, squeezed to one dense axis
    assert make_plan((1, 5, 1, 3), options).dense == (True, True)
    assert make_plan((), options).dense == (False,)
    assert make_plan((5, 7), LayoutOptions(**{**KT, "min_ndim_dense": 3})).dense == (False, False)


# --------------------------------------------------------------------------------------------
# Squeeze, scalars, merge_dims
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "work"),
    [((), (1,)), ((1,), (1,)), ((1, 1, 1), (1,)), ((1, 5, 1, 7), (5, 7)), ((3, 1), (3,))],
)
def test_squeeze(shape, work):
    plan = make_plan(shape)
    assert plan.work_shape == work
    assert plan.shape == shape
    assert plan.block_shape == work and plan.num_blocks == 1


def test_scalar_plan():
    plan = make_plan(())
    assert plan.block_shape == (1,)
    assert plan.dense == (False,)
    assert plan.order == 1
    assert not plan.padded and plan.mask() is None


@pytest.mark.parametrize(
    ("shape", "work"),
    [
        ((2, 3, 4), (6, 4)),
        ((4, 3, 2), (4, 6)),
        ((2, 3, 4, 5), (6, 20)),
        ((2, 3, 2), (2, 6)),  # (2,6) and (6,2) tie: the first split wins
        ((1, 2, 1, 3, 4), (6, 4)),  # squeeze first, then merge
        ((3, 50), (3, 50)),  # order 2 is never merged
        ((1, 3, 1, 4), (3, 4)),
        ((7,), (7,)),
    ],
)
def test_merge_dims_squarest_view(shape, work):
    assert make_plan(shape, LayoutOptions(merge_dims=True)).work_shape == work


@pytest.mark.parametrize(
    ("shape", "work"),
    [
        ((5, 3, 3, 3), (45, 3)),  # a conv kernel: the squarest view would be (15, 9)
        ((2, 3, 4), (6, 4)),
        ((4, 3, 2), (12, 2)),  # signed differences: -10 against 2
        ((2, 6, 3), (12, 3)),  # -9 against 16
        ((8, 2, 2), (16, 2)),
        ((5, 1, 3, 3), (15, 3)),  # merged before size-1 axes are dropped
        ((1, 4, 6), (4, 6)),  # (4, 6) against (1, 24): the size-1 row is dropped afterwards
        ((3, 50), (3, 50)),  # order 2 is never merged
    ],
)
def test_merge_dims_first_last_is_kron_torchs_rule(shape, work):
    assert make_plan(shape, LayoutOptions(merge_dims="first_last")).work_shape == work
    # kron_torch 0.3.3's own expression, on the unsqueezed shape
    if len(shape) > 2:
        shape1 = [math.prod(shape[:-1]), shape[-1]]
        shape2 = [shape[0], math.prod(shape[1:])]
        peer = shape1 if np.diff(shape1) <= np.diff(shape2) else shape2
        assert tuple(n for n in peer if n > 1) == work


def test_unknown_merge_rule_is_refused():
    with pytest.raises(ValueError, match=r"merge_dims 'squarest'.*'first_last'"):
        LayoutOptions(merge_dims="squarest")


@pytest.mark.parametrize("merge", [1, 0, 1.0, np.True_])
def test_merge_dims_takes_a_bool_not_a_number_equal_to_one(merge):
    """``1 == True``, so the rules' membership test took ``merge_dims=1`` (or 0) and kept it as
    the stored value; only a real bool or a rule's name is a merge rule."""
    with pytest.raises(ValueError, match=rf"Unknown merge_dims {merge!r}; accepted: False, True"):
        LayoutOptions(merge_dims=merge)
    for accepted in (False, True, "first_last", "heavyball"):
        assert LayoutOptions(merge_dims=accepted).merge_dims is accepted


@pytest.mark.parametrize("shape", [(2, 3, 4), (5, 1, 7, 2), (2, 2, 2, 2, 2), (9, 2, 2, 3, 8)])
def test_squarest_split_is_brute_force_optimum(shape):
    rows, cols = squarest_split(shape)
    assert rows * cols == math.prod(shape)
    candidates = [(math.prod(shape[:j]), math.prod(shape[j:])) for j in range(1, len(shape))]
    best = min(abs(math.log(r / c)) for r, c in candidates)
    assert abs(math.log(rows / cols)) == pytest.approx(best, abs=1e-12)
    assert (rows, cols) in candidates


def test_merge_then_decide():
    # (2,3,4,5) -> (6,20); default skew: 400 > 120 so the 20-axis is diagonal.
    plan = make_plan((2, 3, 4, 5), LayoutOptions(merge_dims=True))
    assert plan.block_shape == (6, 20) and plan.dense == (True, False)


# --------------------------------------------------------------------------------------------
# Blocking
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "block_size", "grid", "block", "padded", "dense"),
    [
        ((20, 6), 8, (3, 1), (8, 6), True, (False, True)),  # 64 > 48
        ((16, 8), 8, (2, 1), (8, 8), False, (True, True)),
        ((5,), 8, (1,), (5,), False, (False,)),
        ((17, 17, 3), 8, (3, 3, 1), (8, 8, 3), True, (True, True, True)),
        ((9, 1, 9), 4, (3, 3), (4, 4), True, (True, True)),
        ((), 3, (1,), (1,), False, (False,)),
    ],
)
def test_block_grid(shape, block_size, grid, block, padded, dense):
    plan = make_plan(shape, LayoutOptions(block_size=block_size))
    assert plan.grid == grid
    assert plan.block_shape == block
    assert plan.num_blocks == math.prod(grid)
    assert plan.padded == padded
    assert plan.dense == dense


@pytest.mark.parametrize(
    ("shape", "grid", "block", "dense"),
    [
        ((50257, 4096), (1, 16), (50257, 256), (False, True)),  # a vocabulary-sized embedding
        ((4096, 50257), (16, 1), (256, 50257), (True, False)),
        ((300, 300), (2, 2), (256, 256), (True, True)),
        ((40000,), (1,), (40000,), (False,)),
    ],
)
def test_an_axis_past_max_size_is_diagonal_and_left_whole(shape, grid, block, dense):
    """max_size is the longest axis of the parameter that may be dense, whatever the tiling: a
    longer one gets a diagonal factor and is not cut, so it does not multiply the dense blocks of
    the other axis (eformer's rule; tiled, the embedding took 3152 pairs of 256² factors)."""
    options = LayoutOptions(max_size=16384, max_skew=math.inf, min_ndim_dense=2, block_size=256)
    plan = make_plan(shape, options)
    assert (plan.grid, plan.block_shape, plan.dense) == (grid, block, dense)


def test_blocks_hold_the_right_entries():
    plan = make_plan((20, 6), LayoutOptions(block_size=8))
    x = np.arange(120.0).reshape(20, 6) + 1
    blocks = plan.to_blocks(x, get_ops("numpy"))
    assert blocks.shape == (3, 8, 6)
    np.testing.assert_array_equal(blocks[0], x[:8])
    np.testing.assert_array_equal(blocks[1], x[8:16])
    np.testing.assert_array_equal(blocks[2, :4], x[16:])
    np.testing.assert_array_equal(blocks[2, 4:], 0.0)
    mask = plan.mask()
    assert mask.dtype == np.float64
    np.testing.assert_array_equal(mask, blocks != 0)


# --------------------------------------------------------------------------------------------
# to_blocks / from_blocks round trip, and the mask marks exactly the padding (property test)
# --------------------------------------------------------------------------------------------
def _reference_blocks(plan, x: np.ndarray) -> np.ndarray:
    """Block ``b`` (row-major over the grid) holds ``work[g·bs + j]``, zero outside."""
    work = x.reshape(plan.work_shape)
    out = np.zeros((plan.num_blocks, *plan.block_shape))
    for b, g in enumerate(itertools.product(*(range(n) for n in plan.grid))):
        index = tuple(
            slice(gi * bi, min((gi + 1) * bi, n))
            for gi, bi, n in zip(g, plan.block_shape, plan.work_shape)
        )
        piece = work[index]
        out[(b, *(slice(0, s) for s in piece.shape))] = piece
    return out


@st.composite
def shapes(draw):
    """Orders 0-4 with sizes up to 7, or 14-16 small axes (beyond any einsum letter budget)."""
    order = draw(st.sampled_from([0, 1, 2, 3, 4, 14, 16]))
    sizes = st.integers(1, 7) if order <= 4 else st.sampled_from([1, 1, 2, 3])
    shape = tuple(draw(st.lists(sizes, min_size=order, max_size=order)))
    if math.prod(shape) > 4096:
        shape = tuple(min(n, 2) for n in shape)
    return shape


@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    shape=shapes(),
    block_size=st.one_of(st.none(), st.integers(1, 5), st.integers(1, 2)),
    merge=st.booleans(),
)
def test_blocks_round_trip(shape, block_size, merge):
    plan = make_plan(shape, LayoutOptions(block_size=block_size, merge_dims=merge))
    x = np.arange(1.0, math.prod(shape) + 1.0).reshape(shape)  # every entry nonzero
    expected = _reference_blocks(plan, x)
    mask = plan.mask()
    for arr in (x, torch.as_tensor(x)):
        ops = get_ops("torch" if isinstance(arr, torch.Tensor) else "numpy")
        blocked = plan.to_blocks(arr, ops)
        blocked_np = np.asarray(blocked)
        assert blocked_np.shape == (plan.num_blocks, *plan.block_shape)
        np.testing.assert_array_equal(blocked_np, expected)
        back = np.asarray(plan.from_blocks(blocked, ops))
        assert back.shape == shape
        np.testing.assert_array_equal(back, x)
    # Stacked: S parameters of one plan, blocks of parameter s at s·B … (s+1)·B − 1.
    stacked = np.stack([x, -x])
    blocked = plan.to_blocks(stacked, get_ops("numpy"), stacked=True)
    np.testing.assert_array_equal(blocked, np.concatenate([expected, -expected]))
    np.testing.assert_array_equal(
        plan.from_blocks(blocked, get_ops("numpy"), stacked=True), stacked
    )
    if mask is None:
        assert not plan.padded
        assert np.all(expected != 0)
    else:
        assert plan.padded
        assert mask.shape == expected.shape
        np.testing.assert_array_equal(mask, (expected != 0).astype(float))
        assert mask.sum() == math.prod(shape)


# --------------------------------------------------------------------------------------------
# Caching and option validation
# --------------------------------------------------------------------------------------------
def test_plan_is_cached():
    options = LayoutOptions(max_skew=2.0, block_size=4)
    assert make_plan((5, 7), options) is make_plan((5, 7), options)
    # Equal options (frozen dataclass) hit the same cache entry.
    assert make_plan((5, 7), LayoutOptions(max_skew=2.0, block_size=4)) is make_plan(
        (5, 7), options
    )
    assert make_plan((5, 7)) is make_plan((5, 7))
    assert make_plan((5, 7), options) is not make_plan((5, 7), LayoutOptions())


@pytest.mark.parametrize("block_size", [None, 4])
def test_max_size_zero_makes_every_axis_diagonal(block_size):
    """As in kron_torch and psgdax ("dimensions larger than this are diagonal"): 0 is a valid
    size, and no axis is dense (nor cut into blocks). It was refused."""
    plan = make_plan((6, 5, 3), LayoutOptions(**{**KT, "max_size": 0, "block_size": block_size}))
    assert plan.dense == (False, False, False) and plan.num_blocks == 1


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_size": -1}, "max_size"),
        ({"max_size": math.nan}, "max_size"),
        ({"max_skew": -1.0}, "max_skew"),
        ({"min_ndim_dense": -1}, "min_ndim_dense"),
        ({"block_size": 2.5}, "block_size"),  # 0: tests/core/test_bad_input.py
        ({"block_size": True}, "block_size"),
        ({"min_ndim_dense": math.nan}, "min_ndim_dense"),
    ],
)
def test_invalid_layout_options(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LayoutOptions(**kwargs)


def test_empty_tensor_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        make_plan((3, 0))


@pytest.mark.parametrize("shape", [(3.7, 4), (True, 4), ("3", 4)])
def test_a_shape_of_other_than_whole_numbers_is_refused(shape):
    with pytest.raises(ValueError, match="A shape holds whole numbers"):
        make_plan(shape)


@pytest.mark.parametrize("shape", [(600,), (1, 600), (1, 1, 600), (600, 1), (1,), ()])
def test_whole_vectors_take_one_diagonal_factor_over_the_whole_axis(shape):
    """eformer's 1-D path: a parameter whose size is its longest axis gets one diagonal factor,
    untiled, however its size-1 axes sit (dense and in 256-blocks otherwise)."""
    options = LayoutOptions(max_skew=math.inf, block_size=256, whole_vectors=True)
    plan = make_plan(shape, options)
    assert (plan.grid, plan.dense) == ((1,), (False,))
    assert plan.block_shape == (max(1, math.prod(shape)),)
    without = make_plan(shape, LayoutOptions(max_skew=math.inf, block_size=256))
    if math.prod(shape) > 1:
        assert (without.grid, without.dense) == ((3,), (True,))
