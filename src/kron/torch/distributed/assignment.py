"""Which rank owns each parameter's preconditioner: a cost model and balanced packing.

Pure Python (no process group needed), so that every rank computes the same assignment from the
same inputs without communicating.

**Two kinds of step.** On a step that fits the preconditioner the work is the fit's ``d×d``
products; on a step that only applies it, the work is one mode product per axis. Every parameter
of a group takes the same kind of step together, and a synchronous step lasts as long as the
slowest rank's share, so the owners must balance *both* kinds: at update probability 1 every step
fits, under the default schedule's tail (0.03) almost none does. A :class:`Cost` holds both.

Cost model, per parameter, from its :class:`kron.core.Plan` (blocks of ``n`` elements each), in
multiply-adds up to a constant factor per kind of step:

* fit: a dense factor of size ``d`` costs ``d³ + 2·n·d`` (products of ``d×d`` matrices, and the
  contractions of the block with it); a diagonal factor ``n``;
* apply: a dense factor costs ``n·d`` (one mode product with the cached ``P``); a diagonal
  factor ``n``;
* summed over the parameter's axes and multiplied by the number of blocks;
* plus :data:`PARAM_OVERHEAD` for the parameter's own share of a batched call (stacking its
  gradient, slicing its state back out);
* plus, once per rank and batched call, :data:`CALL_OVERHEAD`: parameters of one group with the
  same shape and dtype that land on the same rank are stepped in one batched call, whose fixed
  cost (Python bookkeeping and a few dozen small kernels) does not depend on their size.

**Packing.** Bucket by bucket (the same-shape parameters that could share a call), largest
first, parameters are packed onto ranks under a per-rank capacity, as a share of each kind's
total: a bucket goes whole to the fullest rank that can take all of it, otherwise as many of its
parameters as fit go to the rank that takes most, and the rest continue; a parameter that fits
nowhere goes to the least loaded rank. Packing is repeated for capacities from ``1/W`` up to
``2/W`` (steps of 5%, then of 0.5% around the best) and the assignment whose largest share is
smallest is kept. Keeping buckets whole is what balances the steps that do not fit, where each
call's fixed cost is a large part of the work.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import NamedTuple

from kron.core import LayoutOptions, make_plan


class Cost(NamedTuple):
    """Work of one parameter's preconditioner on each kind of step (see the module docstring).

    Attributes:
      fit: a step that fits the preconditioner (and applies it).
      apply: a step that only applies it.
    """

    fit: float
    apply: float


# The fixed cost of one batched call, in each kind's unit. Measured on one core of the benchmark
# CPU (benchmarks/RESULTS.md): a call costs about 1.7 ms with a fit and 0.6 ms without one,
# whatever its size, while fitting a 512×128 weight (fit cost 220M) takes about 18 ms and
# applying its P (apply cost 42M) about 1.15 ms: both fixed costs are about 2·10⁷ units.
CALL_OVERHEAD = Cost(fit=2e7, apply=2e7)
# Each further parameter in a call adds about 0.013-0.015 ms (25 biases of 128 cost 0.3 ms more
# than 4 of 384).
PARAM_OVERHEAD = Cost(fit=1.6e5, apply=5e5)

# Capacities tried, as multiples of the even share 1/W: a coarse pass over [1, 2], then a fine
# one around the coarse pass's best.
_COARSE_STEP, _FINE_STEP = 0.05, 0.005


def parameter_cost(shape: Sequence[int], layout: LayoutOptions) -> Cost:
    """Preconditioner work of one parameter of ``shape`` under ``layout`` on each kind of step,
    in multiply-adds up to a constant (see the module docstring), :data:`PARAM_OVERHEAD`
    included. An empty parameter costs nothing: it is never stepped."""
    if 0 in tuple(shape):
        return Cost(0.0, 0.0)
    plan = make_plan(tuple(int(n) for n in shape), layout)
    block = math.prod(plan.block_shape)
    fit = apply = 0.0
    for d, dense in zip(plan.block_shape, plan.dense):
        fit += float(d) ** 3 + 2.0 * block * d if dense else block
        apply += float(block) * d if dense else block
    return Cost(
        PARAM_OVERHEAD.fit + plan.num_blocks * fit, PARAM_OVERHEAD.apply + plan.num_blocks * apply
    )


def _as_vector(value: float | Sequence[float], kinds: int, name: str) -> tuple[float, ...]:
    vector = (float(value),) * kinds if isinstance(value, (int, float)) else tuple(value)
    if len(vector) != kinds:
        raise ValueError(
            f"{name} has {len(vector)} kinds of step; expected {kinds} like the costs."
        )
    for part in vector:
        if not (part >= 0 and math.isfinite(part)):
            raise ValueError(f"costs and overhead must be finite and >= 0; got {value!r}.")
    return vector


def assign_owners(
    costs: Sequence[float | Sequence[float]],
    world_size: int,
    loads: list | None = None,
    *,
    buckets: Sequence[Hashable] | None = None,
    overhead: float | Sequence[float] = 0.0,
) -> list[int]:
    """Owner ranks that balance every kind of step (module docstring: *Packing*).

    With scalar costs and no ``overhead`` no rank's load exceeds the mean by more than the
    largest single cost: the first capacity tried is the mean, and a parameter over it goes to
    the least loaded rank. With several kinds a placement weighs all of them, and one kind may
    exceed that bound.

    Args:
      costs: one cost per parameter: a number, or one number per kind of step (e.g. a
        :class:`Cost` from :func:`parameter_cost`), the same kinds for every parameter.
      world_size: number of ranks, ≥ 1.
      loads: each rank's load so far (length ``world_size``; numbers, or one number per kind),
        updated in place; lets parameter groups added later continue from the current balance.
        Default: all zero.
      buckets: one hashable per parameter; parameters with equal keys on one rank share a
        batched call (e.g. ``(group, shape, dtype)``). Default: none share.
      overhead: cost of each distinct bucket on a rank, paid by its first parameter there
        (e.g. :data:`CALL_OVERHEAD`), per kind like ``costs``. Default 0.

    Returns:
      The owner rank of each parameter, in the order of ``costs``; ties go to the lowest rank.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1; got {world_size!r}.")
    if not costs:  # an empty param group: nothing to place, whatever the overhead's kinds
        return []
    scalar = all(isinstance(c, (int, float)) for c in costs)
    kinds = 1 if scalar or not costs else len(costs[0])
    rows = [_as_vector(c, kinds, "a cost") for c in costs]
    extra = _as_vector(overhead, kinds, "overhead")
    if loads is None:
        loads = [0.0 if scalar else (0.0,) * kinds for _ in range(world_size)]
    if len(loads) != world_size:
        raise ValueError(f"loads has {len(loads)} entries; expected world_size={world_size}.")
    start = [_as_vector(load, kinds, "a load") for load in loads]
    if buckets is None:
        buckets = [object() for _ in costs]  # all distinct
    if len(buckets) != len(costs):
        raise ValueError(
            f"buckets has {len(buckets)} entries; expected one per cost ({len(costs)})."
        )
    members: dict[Hashable, list[int]] = {}
    for position, key in enumerate(buckets):
        members.setdefault(key, []).append(position)
    totals = [
        sum(load[k] for load in start) + sum(row[k] for row in rows) + extra[k] * len(members)
        for k in range(kinds)
    ]
    scale = [1.0 / t if t > 0 else 0.0 for t in totals]
    packing = _Packing(rows, extra, scale, start, list(members.values()))
    coarse = [1.0 + j * _COARSE_STEP for j in range(round(1 / _COARSE_STEP) + 1)]
    best = packing.best(coarse, world_size)
    half = round(_COARSE_STEP / _FINE_STEP)
    fine = [best.multiple + j * _FINE_STEP for j in range(-half, half + 1)]
    best = packing.best(fine, world_size, best)
    owners, final = best.owners, best.loads
    for rank, load in enumerate(final):
        loads[rank] = load[0] if scalar else tuple(load)
    return owners


class _Attempt(NamedTuple):
    """One packing: its largest share, the capacity (as a multiple of 1/W), owners, loads."""

    peak: float
    multiple: float
    owners: list[int]
    loads: list[list[float]]


class _Packing:
    """One packing pass per capacity over fixed costs (see :func:`assign_owners`)."""

    def __init__(self, rows, extra, scale, start, groups):
        self.rows, self.extra, self.scale, self.start = rows, extra, scale, start
        # Largest bucket first; ties keep the order of first appearance.
        self.groups = sorted(
            groups,
            key=lambda g: (
                -self.share([sum(rows[i][k] for i in g) + extra[k] for k in range(len(extra))])
            ),
        )

    def share(self, load: Sequence[float]) -> float:
        """The largest share of its kind's total that ``load`` represents."""
        return max(part * s for part, s in zip(load, self.scale))

    def best(
        self, multiples: Sequence[float], world_size: int, incumbent: _Attempt | None = None
    ) -> _Attempt:
        """The first packing with the smallest largest share among ``incumbent`` and capacities
        ``multiple / world_size`` (multiples below 1 count as 1)."""
        for multiple in multiples:
            owners, loads = self.run(max(multiple, 1.0) / world_size)
            peak = max(self.share(load) for load in loads)
            if incumbent is None or peak < incumbent.peak - 1e-12:
                incumbent = _Attempt(peak, multiple, owners, loads)
        return incumbent

    def run(self, capacity: float) -> tuple[list[int], list[list[float]]]:
        ranks = range(len(self.start))
        load = [list(row) for row in self.start]
        owners = [0] * len(self.rows)
        for group in self.groups:
            left = group
            while left:
                fits = [self._fitting(load[r], left, capacity) for r in ranks]
                whole = [r for r in ranks if fits[r] == len(left)]
                if whole:  # best fit: the fullest rank that takes the whole remainder
                    rank = max(whole, key=lambda r: (self.share(load[r]), -r))
                elif max(fits) > 0:  # the rank that takes most, the least loaded among those
                    rank = max(ranks, key=lambda r: (fits[r], -self.share(load[r]), -r))
                else:  # over capacity everywhere: the least loaded rank takes one
                    rank = min(ranks, key=lambda r: (self.share(load[r]), r))
                taken = max(fits[rank], 1)
                for i in left[:taken]:
                    owners[i] = rank
                    load[rank] = [a + b for a, b in zip(load[rank], self.rows[i])]
                load[rank] = [a + b for a, b in zip(load[rank], self.extra)]
                left = left[taken:]
        return owners, load

    def _fitting(self, load: Sequence[float], left: Sequence[int], capacity: float) -> int:
        """How many of ``left``, in order, a rank holding ``load`` takes under ``capacity``."""
        trial = [a + b for a, b in zip(load, self.extra)]
        count = 0
        for i in left:
            trial = [a + b for a, b in zip(trial, self.rows[i])]
            if self.share(trial) > capacity + 1e-12:
                break
            count += 1
        return count
