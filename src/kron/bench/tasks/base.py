"""What a benchmark task is: a seeded problem builder plus the metric and success criterion.

A task builds a :class:`Problem` from a seed. The runner only ever calls ``problem.loss(step)``
(the training loss of step ``step``, differentiable w.r.t. ``problem.parameters``) and
``problem.evaluate()`` (a dict of named float metrics, computed without gradients).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch


class Problem(Protocol):
    """One instance of a task for one seed."""

    parameters: list[torch.Tensor]

    def loss(self, step: int) -> torch.Tensor:
        """Scalar training loss of step ``step`` (1-based); batches are a function of the step."""

    def evaluate(self) -> dict[str, float]:
        """Metrics on fixed data (no gradients); must contain the task's ``metric``."""


@dataclass(frozen=True)
class Task:
    """A benchmark task.

    Attributes:
        name: identifier used on the command line and in file names.
        title: one-line description for tables and plots.
        criterion: the success criterion in words.
        build: ``seed -> Problem``; everything random (data, initial weights, batches) is derived
            from the seed, so a run is a pure function of (task, optimizer config, seed).
        steps: default step budget.
        metric: the key of ``evaluate()`` that the criterion and the plots use.
        target: success threshold on ``metric`` (lower is better).
        rule: ``"reach"``: success when a logged value of ``metric`` is ≤ ``target`` (steps- and
            seconds-to-target are the first such point); ``"final"``: success when the final value
            (mean over the last ``final_window`` fraction of evaluations) is ≤ ``target``.
        eval_every: evaluate every this many steps (also at the last step).
        stop_at_target: end the run once the target is reached (long-memory tasks, where a run
            that has solved the problem has nothing more to show and a failing one costs the
            whole budget).
        final_window: fraction of evaluations averaged into the final metric (0: the last one).
        adam_lrs, sgd_lrs: learning-rate grids of the AdamW and SGD-momentum sweeps.
        schedule: ``"constant"`` or ``"warmup_cosine"`` (applied to every optimizer alike).
        grad_clip: global gradient-norm clip applied to every optimizer, or ``None``.
        note: anything a reader of the table needs (what Adam does here, caveats).
        float64: the parameters are float64 (the target lies below float32 rounding). Optimizers
            that cannot step float64 parameters are left out of such tasks.
    """

    name: str
    title: str
    criterion: str
    build: Callable[[int], Problem]
    steps: int
    metric: str
    target: float
    rule: str = "reach"
    eval_every: int = 50
    stop_at_target: bool = False
    final_window: float = 0.0
    adam_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    sgd_lrs: tuple[float, ...] = (1e-2, 3e-2, 1e-1)
    schedule: str = "constant"
    grad_clip: float | None = None
    note: str = ""
    float64: bool = False
    tags: tuple[str, ...] = field(default_factory=tuple)


def generator(seed: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for ``(seed, stream)``; streams keep data, init and batches independent."""
    return torch.Generator().manual_seed(1_000_003 * stream + seed)


def random_orthogonal(n: int, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """A Haar-distributed ``(n, n)`` orthogonal matrix (QR of a Gaussian, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)
