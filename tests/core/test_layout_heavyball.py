"""``merge_dims="heavyball"``: heavyball 1.5's ``utils.dim_merger``, shape for shape."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kron.core import LayoutOptions, make_plan
from kron.core.layout import heavyball_merge


def dim_merger_shape(shape, max_precond_dim):
    """heavyball 1.5.0's ``utils.dim_merger`` (split=False), as written there, on a shape."""
    new_shape = []

    curr_shape = 1

    for sh in shape[1:][::-1]:
        temp_shape = curr_shape * sh
        if temp_shape > max_precond_dim:
            if curr_shape > 1:
                new_shape.append(curr_shape)
                curr_shape = sh
            else:
                new_shape.append(sh)
                curr_shape = 1
        else:
            curr_shape = temp_shape
    new_shape = [*shape[:1], *new_shape[::-1]]

    if curr_shape > 1 or len(new_shape) == 0:
        new_shape.append(curr_shape)
    return tuple(new_shape)


@pytest.mark.parametrize(
    ("shape", "limit", "merged"),
    [
        ((128, 64, 3, 3), 2048, (128, 576)),  # dim_merger's docstring example
        ((4, 5, 6, 7), 40, (4, 7, 30)),  # a reshape, not a merge of neighbours, as in 1.5
        ((8, 50, 50), 2048, (8, 50, 50)),  # 2500 > 2048: nothing folds
        ((3000, 2), 2048, (3000, 2)),  # axis 0 is kept, however long
        ((5, 1), 2048, (5,)),  # a trailing 1 folds away
        ((4, 1, 5), 2048, (4, 5)),
        ((6,), 2048, (6,)),
        ((), 2048, (1,)),
    ],
)
def test_heavyball_merge_is_dim_merger(shape, limit, merged):
    assert heavyball_merge(shape, limit) == merged == dim_merger_shape(shape, limit)


def test_heavyball_merge_matches_dim_merger_on_random_shapes():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        shape = tuple(int(n) for n in rng.integers(1, 12, size=rng.integers(0, 6)))
        limit = int(rng.choice([1, 4, 16, 40, 100, 2048]))
        assert heavyball_merge(shape, limit) == dim_merger_shape(shape, limit), (shape, limit)


def test_the_heavyball_rule_in_a_plan():
    """The work shape is the merged one with size-1 axes dropped; the limit is ``merge_size``
    (``max_size`` when None), and ``min_ndim_dense`` counts the merged axes, as heavyball's
    ``init_Q_exprs`` sees the merged tensor."""
    heavyball = LayoutOptions(max_size=2048, max_skew=math.inf, merge_dims="heavyball")
    conv = make_plan((128, 64, 3, 3), heavyball)
    assert conv.work_shape == (128, 576) and conv.dense == (True, True)
    assert make_plan((8, 4, 3, 3), heavyball).work_shape == (8, 36)
    assert make_plan((8, 4, 3, 3), LayoutOptions(merge_dims=True)).work_shape == (32, 9)
    tiled = LayoutOptions(max_size=math.inf, block_size=40, merge_dims="heavyball", merge_size=40)
    plan = make_plan((4, 5, 6, 7), tiled)
    assert plan.work_shape == (4, 7, 30) and plan.grid == (1, 1, 1)
    column = LayoutOptions(merge_dims="heavyball", min_ndim_dense=2, max_skew=math.inf)
    assert make_plan((5, 1), column).dense == (False,)  # merged to (5,): one axis
    assert make_plan((5, 1), LayoutOptions(min_ndim_dense=2, max_skew=math.inf)).dense == (True,)
    with pytest.raises(ValueError, match="merge_size must be >= 0 or None; got -1"):
        LayoutOptions(merge_size=-1)
