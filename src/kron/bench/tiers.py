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
        unswept_tasks: tasks run at the middle of each grid even when ``sweep`` is on.
    """

    name: str
    description: str
    tasks: dict[str, int | None]
    optimizers: tuple[str, ...]
    seeds: int
    sweep: bool
    seeds_by_task: dict[str, int] = field(default_factory=dict)
    optimizers_by_task: dict[str, tuple[str, ...]] = field(default_factory=dict)
    unswept_tasks: frozenset[str] = frozenset()


QUICK = Tier(
    name="quick",
    description=(
        "1 seed; kron (defaults) and AdamW at its best measured lr, no sweep; the five cheap "
        "tasks, XOR L=16, and the autoencoder (300 steps) and CNN (100 steps) shortened; "
        "under a minute on 2 idle CPU cores, several when they are shared"
    ),
    tasks={
        "kron_quadratic": None,
        "kron_quadratic_noisy": None,
        "rosenbrock": None,
        "deep_linear": None,
        "logistic": None,
        "xor16": None,
        "autoencoder": 300,
        "cnn": 100,
    },
    optimizers=("kron", "adamw"),
    seeds=1,
    sweep=False,
)

PEERS = ("kron_torch", "heavyball", "psgdax")
"""The other PSGD-Kron implementations; each runs on the framework it is written for."""

CHEAP = ("kron_quadratic", "kron_quadratic_noisy", "rosenbrock", "deep_linear", "logistic")

STANDARD = Tier(
    name="standard",
    description=(
        "all 13 tasks at full budgets, 3 seeds (5 for XOR L=32/64, 2 for the CNN, 1 for the LM); "
        "kron at its defaults; AdamW swept over 3 lrs on seed 0, best lr on the other seeds "
        "(not swept on XOR L=64 and the LM: lr 1e-3 and 3e-3, the best measured); SGD swept on "
        "the cheap tasks, the autoencoder and add T=50; kron with lr swept and the peers "
        "(kron_torch, heavyball, psgdax, when installed) swept on the five cheap tasks. "
        "45 CPU-minutes: 23 minutes with --jobs 2 on 2 idle cores (Intel Xeon, peers "
        "included); longer on a shared machine"
    ),
    tasks=dict.fromkeys(
        (*CHEAP, "autoencoder", "cnn", "xor16", "xor32", "xor64", "add50", "add100", "char_lm")
    ),
    optimizers=("kron", "adamw"),
    seeds=3,
    sweep=True,
    seeds_by_task={"xor32": 5, "xor64": 5, "cnn": 2, "char_lm": 1},
    optimizers_by_task={
        **{name: ("kron", "kron_lr", "adamw", "sgd", *PEERS) for name in CHEAP},
        "autoencoder": ("kron", "adamw", "sgd"),
        "add50": ("kron", "adamw", "sgd"),
    },
    unswept_tasks=frozenset({"xor64", "char_lm"}),
)

FULL = Tier(
    name="full",
    description=(
        "every task at full budget, every optimizer (peers included when installed) swept over "
        "its grid, 5 seeds (3 for the LM); several hours on 2 CPU cores"
    ),
    tasks=dict.fromkeys(STANDARD.tasks),
    optimizers=(
        "kron",
        "kron_lr",
        "kron_momentum",
        "kron_skew",
        "kron_f32",
        "adamw",
        "sgd",
        *PEERS,
    ),
    seeds=5,
    sweep=True,
    seeds_by_task={"char_lm": 3},
)

TIERS = {t.name: t for t in (QUICK, STANDARD, FULL)}
