"""Owner assignment: the cost model and the balanced packing (no processes needed)."""

from __future__ import annotations

import math
import random

import pytest

from kron.core import LayoutOptions
from kron.torch.distributed import Cost, assign_owners, parameter_cost
from kron.torch.distributed.assignment import CALL_OVERHEAD, PARAM_OVERHEAD

# kron.torch.Kron's default layout: dense factors up to 8192, only for tensors of 2+ axes.
KRON_LAYOUT = LayoutOptions(max_size=8192, max_skew=math.inf, min_ndim_dense=2)


def _loads(costs, owners, world):
    loads = [0.0] * world
    for cost, owner in zip(costs, owners):
        loads[owner] += cost
    return loads


def test_cost_model_counts_each_kind_of_step_for_dense_factors_and_diagonals():
    numel = 128 * 512

    def cost(fit, apply):  # every parameter also pays its share of a batched call
        return Cost(fit + PARAM_OVERHEAD.fit, apply + PARAM_OVERHEAD.apply)

    # Two dense factors: fitting costs d³ + 2·numel·d per factor, applying numel·d per factor.
    assert parameter_cost((128, 512), KRON_LAYOUT) == cost(
        128**3 + 512**3 + 2 * numel * (128 + 512), numel * (128 + 512)
    )
    # A vector gets a diagonal factor: one pass over its entries on either kind of step.
    assert parameter_cost((512,), KRON_LAYOUT) == cost(512, 512)
    # max_skew=1 makes the long side diagonal.
    skew = LayoutOptions(max_size=8192, max_skew=1.0, min_ndim_dense=2)
    assert parameter_cost((128, 512), skew) == cost(
        128**3 + 2 * numel * 128 + numel, numel * 128 + numel
    )
    # Blocks each cost their own: a 1000-long axis cut in blocks of 256 -> 4 blocks of 256×8.
    blocked = LayoutOptions(max_size=8192, max_skew=math.inf, min_ndim_dense=2, block_size=256)
    block = 256 * 8
    assert parameter_cost((1000, 8), blocked) == cost(
        4 * (256**3 + 8**3 + 2 * block * (256 + 8)), 4 * block * (256 + 8)
    )
    assert min(parameter_cost((1,), KRON_LAYOUT)) > 0  # nothing costs zero


def test_one_expensive_parameter_is_balanced_against_many_cheap_ones():
    costs = [1.0] * 6 + [100.0]
    owners = assign_owners(costs, 2)
    # By cost, not by count: the big one alone on one rank, the six small ones on the other.
    assert owners[-1] == 0 and owners[:-1] == [1] * 6
    assert _loads(costs, owners, 2) == [100.0, 6.0]


def test_call_overhead_keeps_cheap_same_shape_parameters_in_few_batched_calls():
    # Four big matrices and 24 biases of three shapes, over 4 ranks.
    costs = [100.0] * 4 + [1.0] * 24
    buckets = ["w"] * 4 + ["a", "b", "c"] * 8

    def calls(owners):  # batched calls of bias shapes, over all ranks
        return len({(k, o) for k, o in zip(buckets, owners) if k != "w"})

    # Without an overhead the loads are split exactly evenly (106 each), which takes 6 bias
    # calls; with one, each bias shape stays whole on one rank: 3 calls instead of up to 12.
    # Either way the big ones spread one per rank.
    even = assign_owners(costs, 4, buckets=buckets)
    assert _loads(costs, even, 4) == [106.0] * 4 and calls(even) == 6
    clustered = assign_owners(costs, 4, buckets=buckets, overhead=10.0)
    assert calls(clustered) == 3
    assert sorted(even[:4]) == sorted(clustered[:4]) == [0, 1, 2, 3]


def test_both_kinds_of_step_are_balanced():
    # Per parameter (fit, apply): "f" is expensive to fit and cheap to apply, "a" the reverse.
    # Balancing only the fit would put both "a" on the rank without an "f" ...
    costs = [(90.0, 1.0)] * 2 + [(10.0, 50.0)] * 2
    loads = [(0.0, 0.0), (0.0, 0.0)]
    owners = assign_owners(costs, 2, loads)
    # ... balancing both gives each rank one of each.
    assert sorted(owners[:2]) == [0, 1] and sorted(owners[2:]) == [0, 1]
    assert loads == [(100.0, 51.0), (100.0, 51.0)]
    with pytest.raises(ValueError, match="a cost has 1 kinds of step; expected 2"):
        assign_owners([(1.0, 2.0), (1.0,)], 2)


def test_balance_is_within_one_largest_cost_of_the_mean():
    rng = random.Random(0)
    for world in (2, 3, 4, 8):
        for _ in range(50):
            costs = [rng.choice([1, 10, 1000]) * rng.random() for _ in range(rng.randint(1, 40))]
            loads = _loads(costs, assign_owners(costs, world), world)
            assert max(loads) <= sum(costs) / world + max(costs) + 1e-9
            assert math.isclose(sum(loads), sum(costs))


def test_transformer_layers_split_into_near_equal_shares_of_both_kinds_over_4_ranks():
    # The 4-layer d=128 encoder LM of benchmarks/torch_step.py (per layer: attention in/out
    # projections, two feed-forward matrices, biases and norms), plus embeddings and head.
    layer = [(384, 128), (384,), (128, 128), (128,), (512, 128), (512,), (128, 512), (128,)]
    layer += [(128,)] * 4
    shapes = [(128, 128), (64, 128), *layer * 4, (128, 128), (128,)]
    costs = [parameter_cost(s, KRON_LAYOUT) for s in shapes]
    owners = assign_owners(costs, 4, buckets=shapes, overhead=CALL_OVERHEAD)
    replicated = [sum(c[k] for c in costs) + CALL_OVERHEAD[k] * len(set(shapes)) for k in range(2)]
    for k in range(2):  # fitting steps, then applying steps; 0.25 is a perfect split
        loads = [0.0] * 4
        for rank in range(4):
            mine = [i for i, o in enumerate(owners) if o == rank]
            calls = len({shapes[i] for i in mine})
            loads[rank] = sum(costs[i][k] for i in mine) + CALL_OVERHEAD[k] * calls
        assert max(loads) / replicated[k] < 0.29


def test_assignment_is_deterministic_ties_go_to_the_lowest_rank_and_loads_carry_over():
    assert assign_owners([5.0, 5.0, 5.0], 3) == [0, 1, 2]
    assert assign_owners([3.0, 1.0, 2.0], 2) == assign_owners([3.0, 1.0, 2.0], 2) == [0, 1, 1]
    loads = [0.0, 0.0]
    first = assign_owners([4.0], 2, loads)
    second = assign_owners([1.0, 1.0], 2, loads)  # continues from rank 0 holding 4
    assert first == [0] and second == [1, 1] and loads == [4.0, 2.0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(costs=[1.0], world_size=0), "world_size must be an int >= 1; got 0"),
        (dict(costs=[1.0], world_size=2.0), "world_size must be an int >= 1; got 2.0"),
        (dict(costs=[-1.0], world_size=2), "costs and overhead must be finite and >= 0; got -1.0"),
        (dict(costs=[math.nan], world_size=2), "costs and overhead must be finite"),
        (dict(costs=[1.0], world_size=2, overhead=-1.0), "must be finite and >= 0; got -1.0"),
        (dict(costs=[1.0], world_size=2, buckets=[]), "buckets has 0 entries; expected one per"),
        (
            dict(costs=[1.0], world_size=2, loads=[0.0]),
            "loads has 1 entries; expected world_size=2",
        ),
    ],
)
def test_bad_input_is_rejected_with_what_was_given(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        assign_owners(**kwargs)
