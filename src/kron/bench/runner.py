"""Running one (task, optimizer, lr, seed) to a record, and planning the runs of a sweep."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import records
from .optimizers import OptimizerSpec
from .tasks import Task

WARMUP_STEPS = 50  # of the "warmup_cosine" schedule


@dataclass(frozen=True)
class RunConfig:
    """One run: ``task`` × ``optimizer`` at learning rate ``lr`` (``None``: default) × ``seed``,
    for ``steps`` steps (the task's budget unless overridden)."""

    task: Task
    optimizer: OptimizerSpec
    lr: float | None
    seed: int
    steps: int

    def path(self, out: Path) -> Path:
        return records.run_path(
            out, self.task.name, self.optimizer.name, self.lr, self.seed, self.steps
        )

    def describe(self) -> dict[str, Any]:
        """The JSON-able config stored in (and compared against) the record."""
        task_fields = {k: v for k, v in asdict(self.task).items() if k not in ("build", "tags")}
        described = {
            **task_fields,
            "task": self.task.name,
            "optimizer": self.optimizer.name,
            "optimizer_label": self.optimizer.label,
            "framework": self.optimizer.framework,
            "lr": self.lr,
            "seed": self.seed,
            "steps": self.steps,
            "settings": self.optimizer.settings(self.lr, self.seed),
        }
        # Through JSON once, so that it compares equal to a config read back from a record.
        return json.loads(json.dumps(described))


DESCRIPTIVE = ("title", "criterion", "note", "optimizer_label")


def identity(described: dict[str, Any]) -> dict[str, Any]:
    """The part of a described config that determines the run (wording is left out, so that
    editing a task's title or note does not invalidate finished records)."""
    return {k: v for k, v in described.items() if k not in DESCRIPTIVE}


def _schedule(task: Task, steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier per step (LambdaLR convention: step 0 is the first)."""
    if task.schedule == "constant":
        return lambda s: 1.0
    if task.schedule == "warmup_cosine":
        warm = WARMUP_STEPS
        return lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps))
    raise ValueError(f"unknown schedule {task.schedule!r}")


class TorchSession:
    """A torch run in progress: the task's problem, the optimizer and the lr schedule."""

    packages: tuple[str, ...] = ()

    def __init__(self, config: RunConfig, threads: int) -> None:
        torch.set_num_threads(threads)
        torch.manual_seed(config.seed)
        self.task = config.task
        self.problem = config.task.build(config.seed)
        self.optimizer = config.optimizer.make(self.problem.parameters, config.lr, config.seed)
        multiplier = _schedule(config.task, config.steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, multiplier)

    def train_step(self, step: int) -> float:
        """One optimizer step on batch ``step``; the training loss (a host sync, on purpose:
        the step's time then includes all of its work)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.problem.loss(step)
        loss.backward()
        if self.task.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.problem.parameters, self.task.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return loss.item()

    def evaluate(self) -> dict[str, float]:
        return self.problem.evaluate()


def open_session(config: RunConfig, threads: int):
    """The session that runs ``config`` in its optimizer's framework."""
    if config.optimizer.framework == "jax":
        from .jax_session import JaxSession

        return JaxSession(config)
    if config.optimizer.framework == "keras":
        from .keras_session import KerasSession

        return KerasSession(config)
    return TorchSession(config, threads)


def run(
    config: RunConfig, threads: int = 1, on_progress: Callable[[int], None] | None = None
) -> records.Record:
    """Train once and return the record (see ``records``). Deterministic for a given config and
    thread count: all randomness comes from the seed (``torch.manual_seed`` plus the task's own
    generators). ``on_progress(step)`` is called at every evaluation point."""
    task, steps = config.task, config.steps
    start = time.perf_counter()
    session = open_session(config, threads)
    history: dict[str, list] = {"step": [], "seconds": [], "loss": []}
    train_seconds, loss_sum, loss_count, status = 0.0, 0.0, 0, "finished"
    step = 0
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        loss_value = session.train_step(step)
        train_seconds += time.perf_counter() - t0
        loss_sum, loss_count = loss_sum + loss_value, loss_count + 1
        if not math.isfinite(loss_value):
            status = "diverged"
        if step % task.eval_every and step != steps and status != "diverged":
            continue
        metrics = session.evaluate() if status != "diverged" else {}
        _append(history, step, train_seconds, loss_sum / loss_count, metrics)
        loss_sum, loss_count = 0.0, 0
        if on_progress is not None:
            on_progress(step)
        if status == "diverged" or any(not math.isfinite(v) for v in metrics.values()):
            status = "diverged"
            break
        latest = history[task.metric][-1]
        if task.stop_at_target and latest is not None and latest <= task.target:
            status = "reached_target"
            break
    peers = (config.optimizer.package,) if config.optimizer.package else ()
    record = {
        "schema": records.SCHEMA,
        "config": config.describe(),
        "versions": records.versions((*session.packages, *peers)),
        "machine": records.machine(threads),
        "history": history,
        "status": status,
        "steps_done": step,
        "wall_seconds": time.perf_counter() - start,
    }
    record["outcome"] = records.outcome(record)
    return record


def _append(history: dict[str, list], step: int, seconds: float, loss: float, metrics) -> None:
    """One history row; columns missing from this row are padded with ``None``."""
    row = {"step": step, "seconds": round(seconds, 4), "loss": loss, **metrics}
    length = len(history["step"])
    for key, value in row.items():
        history.setdefault(key, [None] * length).append(value)
    for column in history.values():
        if len(column) == length:
            column.append(None)


def reusable(config: RunConfig, out: Path, threads: int = 1) -> records.Record | None:
    """The finished record of ``config`` under ``out``, or ``None`` when there is none that
    matches: a config identical but for wording, and for a PyTorch run the same thread count
    (it changes both the timings and the rounding)."""
    existing = records.load(config.path(out))
    if existing is None or identity(existing["config"]) != identity(config.describe()):
        return None
    if config.optimizer.framework == "torch":
        if existing["machine"].get("torch_threads") != threads:
            return None
    return existing


def set_aside(path: Path) -> Path:
    """Rename ``path`` to ``<name>.stale-<UTC time>``, out of the records' ``*.json`` pattern,
    and return the new path: a record that cannot be reused is kept, never overwritten."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.stale-{stamp}")
    index = 1
    while target.exists():
        target, index = path.with_name(f"{path.name}.stale-{stamp}-{index}"), index + 1
    path.rename(target)
    return target


def run_or_load(
    config: RunConfig,
    out: Path,
    threads: int = 1,
    on_progress: Callable[[int], None] | None = None,
    on_set_aside: Callable[[Path], None] | None = None,
) -> tuple[records.Record, bool]:
    """The record of ``config`` under ``out``: reused when :func:`reusable` finds it (resume),
    otherwise run and saved. A file at the record's path when the run ends that cannot be
    reused (another config or thread count, or unreadable) is renamed by :func:`set_aside`
    before the new record is written, and ``on_set_aside`` gets its new path. Returns
    ``(record, was_reused)``."""
    existing = reusable(config, out, threads)
    if existing is not None:
        return existing, True
    record = run(config, threads, on_progress)
    path = config.path(out)
    # Another process may have finished the same run meanwhile: its record is this one's twin
    # (runs are deterministic), so it is replaced, not set aside as a mismatch.
    if path.exists() and reusable(config, out, threads) is None:
        moved = set_aside(path)
        if on_set_aside is not None:
            on_set_aside(moved)
    records.save(record, path)
    return record, False


def score(record: records.Record) -> tuple[float, float]:
    """Sort key of a sweep (lower is better): steps to target (inf if missed), then final."""
    result = record["outcome"]
    steps = result["steps_to_target"] if result["success"] else math.inf
    final = result["final"] if math.isfinite(result["final"]) else math.inf
    return (steps, final)
