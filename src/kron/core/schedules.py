"""When to update the preconditioner (algorithm.md §6.3).

A probability ``p(step)`` comes from a float or any callable of the step; the decision is made by
one of three rules, all written with array ops on explicit state so they trace under ``jit`` and
resume exactly:

* ``"counter"`` (kron_torch, psgd_jax): update when a counter reaches ``1/p``, then reset it;
* ``"accumulator"`` (heavyball): add ``p`` to a running sum; update when its integer part grows;
* ``"bernoulli"`` (psgd_torch): update when a uniform draw ``u < p``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

DECISION_RULES = ("counter", "accumulator", "bernoulli")


def _numpy_ops() -> Any:
    from kron.core.ops import get_ops

    return get_ops("numpy")


def exponential_schedule(
    max_prob: float = 1.0,
    min_prob: float = 0.03,
    decay: float = 0.001,
    flat_start: int = 500,
    ops: Any = None,
) -> Callable[[Any], Any]:
    """kron_torch's ``clip(max_prob·exp(-decay·(step - flat_start)), min_prob, max_prob)``, where
    ``step`` counts the steps taken before this one. ``ops`` picks the array library the returned
    function computes with (NumPy by default; pass a traced backend to evaluate under ``jit``)."""
    ops = ops or _numpy_ops()

    def probability(step: Any) -> Any:
        p = max_prob * ops.exp(-decay * (ops.asarray(step, None) * 1.0 - flat_start))
        return ops.clip(p, min_prob, max_prob)

    return probability


def heavyball_schedule(
    min_prob: float = 0.03, decay: float = 0.999, flat_start: int = 1000, ops: Any = None
) -> Callable[[Any], Any]:
    """heavyball's ``max(min_prob, decay^max(step - flat_start, 0))``."""
    ops = ops or _numpy_ops()

    def probability(step: Any) -> Any:
        waited = ops.maximum(ops.asarray(step, None) * 1.0 - flat_start, 0.0)
        return ops.maximum(ops.exp(waited * float(np.log(decay))), min_prob)

    return probability


def probability_at(schedule: float | Callable[[Any], Any], step: Any) -> Any:
    """``schedule`` if it is a number, else ``schedule(step)``."""
    return schedule(step) if callable(schedule) else schedule


def counter_decision(counter: Any, p: Any, ops: Any) -> tuple[Any, Any]:
    """``(update?, new counter)``: the counter counts steps since the last update."""
    counter = counter + 1
    if isinstance(p, (int, float)):
        if p <= 0:  # never (1/p would raise)
            return False, counter
        update = counter >= 1.0 / p
    else:  # an array p <= 0 never updates either: 1/tiny is beyond any count
        update = counter >= 1.0 / ops.maximum(p, ops.tiny(ops.dtype(p)))
    if isinstance(update, bool):
        return update, 0 * counter if update else counter
    return update, ops.where(update, 0 * counter, counter)


def accumulator_decision(total: Any, p: Any, ops: Any) -> tuple[Any, Any]:
    """``(update?, new total)``: update whenever the running sum of ``p`` crosses an integer.
    Only the sum's fractional part is kept: a float32 sum that grew without bound would stop
    changing at 2²⁴ (at 2¹⁹ for p = 0.03), and with it the updates."""
    new_total = total + p
    whole = ops.floor(new_total)
    return whole > ops.floor(total), new_total - whole


def bernoulli_decision(uniform: Any, p: Any) -> Any:
    """``uniform < p`` for a uniform draw in ``[0, 1)``."""
    return uniform < p
