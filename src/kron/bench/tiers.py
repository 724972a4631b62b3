"""The three plans ``--quick``, ``--standard`` and ``--full``: which tasks (with which step
budgets), which optimizers, how many seeds, and whether learning rates are swept.

Without a sweep, an optimizer runs only the middle value of its grid, which for AdamW is the
best learning rate measured in benchmarks.md for that task.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Tier:
    """A plan.

    Attributes:
        name: ``quick``, ``standard`` or ``full``.
        description: what it runs and how long it takes on the development machine.
        tasks: task name → step budget (``None``: the task's own budget).
        optimizers: optimizer names (those not importable are skipped).
        seeds: seeds per configuration (0 … seeds − 1).
        seeds_by_task: per-task overrides of ``seeds``.
        sweep: run each optimizer's whole learning-rate grid on seed 0 (else the middle value).
        optimizers_by_task: per-task overrides of ``optimizers``.
    """

    name: str
    description: str
    tasks: dict[str, int | None]
    optimizers: tuple[str, ...]
    seeds: int
    sweep: bool
    seeds_by_task: dict[str, int] = field(default_factory=dict)
    optimizers_by_task: dict[str, tuple[str, ...]] = field(default_factory=dict)


QUICK = Tier(
    name="quick",
    description=(
        "1 seed; kron (defaults) and AdamW at its best measured lr; every task but the LM, "
        "shortened where costly (autoencoder 600 steps, CNN 150, add T=50 2000); "
        "about 3–4 minutes on 2 shared CPU cores"
    ),
    tasks={
        "kron_quadratic": None,
        "kron_quadratic_noisy": None,
        "rosenbrock": None,
        "deep_linear": None,
        "logistic": None,
        "autoencoder": 600,
        "xor16": None,
        "add50": 2000,
        "cnn": 150,
    },
    optimizers=("kron", "adamw"),
    seeds=1,
    sweep=False,
)

STANDARD = Tier(
    name="standard",
    description=(
        "all 13 tasks at full budgets; kron (defaults), AdamW and SGD swept over 3 lrs on seed 0, "
        "best lr on the other seeds; kron with lr swept on the five cheap tasks; 3 seeds "
        "(5 for XOR L=32 and L=64, where the targets count seeds; 1 for the LM); "
        "about 45 minutes of CPU time when two runs go in parallel on 2 cores"
    ),
    tasks={
        "kron_quadratic": None,
        "kron_quadratic_noisy": None,
        "rosenbrock": None,
        "deep_linear": None,
        "logistic": None,
        "autoencoder": None,
        "xor16": None,
        "xor32": None,
        "xor64": None,
        "add50": None,
        "add100": None,
        "cnn": None,
        "char_lm": None,
    },
    optimizers=("kron", "adamw", "sgd"),
    seeds=3,
    sweep=True,
    seeds_by_task={"xor32": 5, "xor64": 5, "char_lm": 1},
    optimizers_by_task={
        name: ("kron", "kron_lr", "adamw", "sgd")
        for name in (
            "kron_quadratic",
            "kron_quadratic_noisy",
            "rosenbrock",
            "deep_linear",
            "logistic",
        )
    },
)

FULL = Tier(
    name="full",
    description=(
        "every task at full budget, every optimizer (peers included when installed) swept over "
        "its grid, 5 seeds (3 for the LM); several hours on 2 CPU cores"
    ),
    tasks=dict.fromkeys(STANDARD.tasks),
    optimizers=("kron", "kron_lr", "adamw", "sgd", "kron_torch", "heavyball"),
    seeds=5,
    sweep=True,
    seeds_by_task={"char_lm": 3},
)

TIERS = {t.name: t for t in (QUICK, STANDARD, FULL)}
