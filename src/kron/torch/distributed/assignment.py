"""Which rank owns each parameter's preconditioner: a cost model and greedy balancing.

Pure Python (no process group needed), so that every rank computes the same assignment from the
same inputs without communicating.

Cost model, per parameter, from its :class:`kron.core.Plan` (blocks of ``n`` elements each):

* a dense factor of size ``d`` costs ``d³`` (the fit: products of ``d×d`` matrices) plus
  ``n·d`` (applying it to the block, one mode product of the ``n``-element block);
* a diagonal factor costs ``n`` (elementwise);
* summed over the parameter's axes and multiplied by the number of blocks;
* plus, once per rank and batched call, :data:`CALL_OVERHEAD`: parameters of one group with the
  same shape and dtype that land on the same rank are stepped in one batched call, whose fixed
  cost (Python bookkeeping and a few dozen small kernels) does not depend on their size. Without
  this term, greedy balancing scatters the many cheap vectors (biases, norms) over every rank,
  and each rank pays that fixed cost once per vector shape.

It counts multiply-adds up to a constant factor per term, which is what balancing needs: a
128×512 weight with two dense factors costs ``512³ + 128³ + 65536·(512 + 128) ≈ 178M``, a
bias of 512 (diagonal) costs 512. The fit term assumes the preconditioner is fitted every step;
with a lower update probability the apply terms and the call overhead weigh more. Every
parameter of a group shares the probability, and on the transformer benchmark the same
assignment splits the work within a few percent of 1/W both at p = 1 and at p = 0.03.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

from kron.core import LayoutOptions, make_plan

# The fixed cost of one batched step, in the cost model's unit. Measured on one core of the
# benchmark CPU (benchmarks/RESULTS.md): about 0.6 ms per call without a fit and 1.7 ms with one,
# whatever the size, while fitting a 512×128 weight (cost 178M) takes about 20 ms: so about 1 ms,
# or 8M, between the two.
CALL_OVERHEAD = float(2**23)


def parameter_cost(shape: Sequence[int], layout: LayoutOptions) -> float:
    """Preconditioner work of one parameter of ``shape`` under ``layout``, in multiply-adds up to
    a constant (see the module docstring). Always ≥ 1, so that every parameter has some weight."""
    plan = make_plan(tuple(int(n) for n in shape), layout)
    block = math.prod(plan.block_shape)
    per_block = 0.0
    for d, dense in zip(plan.block_shape, plan.dense):
        per_block += float(d) ** 3 + block * d if dense else block
    return max(1.0, plan.num_blocks * per_block)


def assign_owners(
    costs: Sequence[float],
    world_size: int,
    loads: list[float] | None = None,
    *,
    buckets: Sequence[Hashable] | None = None,
    overhead: float = 0.0,
) -> list[int]:
    """Greedy longest-processing-time assignment: parameters in decreasing order of cost (ties by
    position), each to the rank whose total would be smallest after taking it (ties to the
    lowest rank). Without ``overhead`` that is the rank with the least total so far: classic LPT,
    whose largest total is at most 4/3 of the best possible (Graham's bound) and within one
    largest cost of the mean.

    Args:
      costs: one cost per parameter, e.g. from :func:`parameter_cost`.
      world_size: number of ranks, ≥ 1.
      loads: each rank's load so far (length ``world_size``), updated in place; lets parameter
        groups added later continue from the current balance. Default: all zero.
      buckets: one hashable per parameter; parameters with equal keys on one rank share a
        batched call (e.g. ``(group, shape, dtype)``). Default: none share.
      overhead: cost of each distinct bucket on a rank, paid by its first parameter there
        (e.g. :data:`CALL_OVERHEAD`). Default 0.

    Returns:
      The owner rank of each parameter, in the order of ``costs``.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1; got {world_size!r}.")
    if loads is None:
        loads = [0.0] * world_size
    if len(loads) != world_size:
        raise ValueError(f"loads has {len(loads)} entries; expected world_size={world_size}.")
    for cost in [*costs, overhead]:
        if not (cost >= 0 and math.isfinite(cost)):
            raise ValueError(f"costs and overhead must be finite and >= 0; got {cost!r}.")
    if buckets is None:
        buckets = [object() for _ in costs]  # all distinct
    if len(buckets) != len(costs):
        raise ValueError(
            f"buckets has {len(buckets)} entries; expected one per cost ({len(costs)})."
        )
    held: list[set] = [set() for _ in range(world_size)]
    owners = [0] * len(costs)
    for position in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        key, cost = buckets[position], costs[position]
        after = [
            load + cost + (0.0 if key in keys else overhead) for load, keys in zip(loads, held)
        ]
        rank = min(range(world_size), key=lambda r: (after[r], r))
        loads[rank] = after[rank]
        held[rank].add(key)
        owners[position] = rank
    return owners
