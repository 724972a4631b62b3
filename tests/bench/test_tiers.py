"""Tier plans name real tasks and optimizers, and the command-line options narrow them."""

from __future__ import annotations

import pytest

from kron.bench.cli import build_parser, plan
from kron.bench.optimizers import OPTIMIZERS
from kron.bench.tasks import TASKS
from kron.bench.tiers import TIERS


@pytest.mark.parametrize("tier", list(TIERS.values()), ids=list(TIERS))
def test_tier_names_are_known(tier):
    assert set(tier.tasks) <= set(TASKS)
    names = set(tier.optimizers).union(*tier.optimizers_by_task.values())
    assert names <= set(OPTIMIZERS)
    assert set(tier.seeds_by_task) <= set(tier.tasks)
    assert tier.unswept_tasks <= set(tier.tasks)


def test_standard_covers_every_task_with_enough_xor_seeds():
    standard = TIERS["standard"]
    assert set(standard.tasks) == set(TASKS)
    assert standard.seeds_by_task["xor32"] == 5 and standard.seeds_by_task["xor64"] == 5


def test_command_line_narrows_the_tier():
    args = build_parser().parse_args(
        ["bench", "--standard", "--task", "xor64", "--seeds", "0,7", "--steps", "12"]
    )
    (entry,) = plan(args, TIERS["standard"])
    assert entry.task.name == "xor64" and entry.seeds == (0, 7) and entry.steps == 12
    assert not entry.sweep  # xor64 is unswept in the standard tier
    assert [s.name for s in entry.optimizers] == ["kron", "adamw"]


def test_quick_tier_shortens_costly_tasks_and_skips_the_lm():
    args = build_parser().parse_args(["bench", "--quick"])
    entries = {e.task.name: e for e in plan(args, TIERS["quick"])}
    assert "char_lm" not in entries
    assert entries["cnn"].steps < TASKS["cnn"].steps
    assert all(not e.sweep and e.seeds == (0,) for e in entries.values())


def test_optimizers_that_cannot_step_float64_are_left_out_of_float64_tasks():
    args = build_parser().parse_args(["bench", "--standard", "--task", "logistic", "deep_linear"])
    by_task = {e.task.name: [s.name for s in e.optimizers] for e in plan(args, TIERS["standard"])}
    assert "heavyball" in by_task["deep_linear"] and "heavyball" not in by_task["logistic"]
    assert not OPTIMIZERS["heavyball"].float64 and TASKS["logistic"].float64
