"""When a param group of :class:`kron.torch.Kron` fits its preconditioner, and rebalances it.

Decided on the host from counters kept in the group (``step``, the steps the group has taken,
and ``decision_total``, the decision rule's counter) and from the optimizer's seed, so
``step()`` never synchronises with the device and every rank of a distributed run decides
alike. A decision is pure: the group's counters move on only once it has stepped
(:func:`advance_clock`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from kron.core import (
    LayoutOptions,
    StepOptions,
    accumulator_decision,
    bernoulli_decision,
    counter_decision,
    exponential_schedule,
    probability_at,
)
from kron.torch.functional import BALANCE, DECISION, uniform_for

# What a group's preconditioner_update_probability=None means: kron_torch's schedule, 1.0 for
# 500 steps, then decaying to 0.03.
DEFAULT_SCHEDULE = exponential_schedule()


class Decision(NamedTuple):
    """A group's fit decision for one step: whether to fit, the probability it came from, and
    the decision rule's counter after this step."""

    fit: bool
    probability: float
    total: float


def decide(
    gi: int,
    group: dict[str, Any],
    seed: int,
    default_schedule: Callable[[int], float],
    first_step: int,
) -> Decision:
    """Whether group ``gi`` fits its preconditioner on this step. Its schedule (or
    ``default_schedule``, where the group's is None) is called with the group's step count
    plus ``first_step``; ``ValueError`` when it gives a probability outside ``(0, 1]``."""
    step = group["step"]
    schedule = group["preconditioner_update_probability"]
    if schedule is None:
        schedule = default_schedule
    count = step + first_step  # the count the schedule is called with
    p = float(probability_at(schedule, count))
    if not 0 < p <= 1:
        raise ValueError(
            f"preconditioner_update_probability gave {p!r} for step count {count} of group "
            f"{gi}; it must be in (0, 1]."
        )
    rule = "bernoulli" if group["stochastic_schedule"] else group["decision_rule"]
    if rule == "bernoulli":
        draw = uniform_for(seed, step, gi, DECISION)
        return Decision(bool(bernoulli_decision(draw, p)), p, group["decision_total"])
    decide_with = counter_decision if rule == "counter" else accumulator_decision
    do_fit, total = decide_with(group["decision_total"], p, np)
    return Decision(bool(do_fit), p, float(total))


def group_context(
    gi: int,
    group: dict[str, Any],
    decision: Decision,
    seed: int,
    layout: LayoutOptions,
    options: StepOptions,
) -> tuple[LayoutOptions, StepOptions, bool, bool]:
    """``(layout, options, do_fit, do_balance)`` for this step of group ``gi``, from its core
    records ``layout`` and ``options``: the cache is on where the group asks for it (``cached``
    None: while the update probability is below 0.5), and a fit rebalances the factor norms
    with the group's ``balance_probability``."""
    use_cache = group["cached"] if group["cached"] is not None else decision.probability < 0.5
    if use_cache:
        options = dataclasses.replace(options, cache=True)
    balance_draw = uniform_for(seed, group["step"], gi, BALANCE)
    do_balance = decision.fit and balance_draw < group["balance_probability"]
    return layout, options, decision.fit, do_balance


def advance_clock(group: dict[str, Any], decision: Decision) -> None:
    """Commit ``decision``'s counter to ``group`` and count the step."""
    group["decision_total"] = decision.total
    group["step"] = group["step"] + 1
