"""Executing a plan: tasks × optimizers × seeds with the sweep protocol, a rich progress bar per
run, and resume (records already on disk with the same config are reused, not rerun); in this
process, or on worker processes (``jobs``, see ``workers``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .optimizers import OptimizerSpec, lr_label
from .records import Record
from .runner import RunConfig, reusable, run_or_load, score
from .tasks import Task
from .workers import run_in_workers


@dataclass(frozen=True)
class Entry:
    """One task of a plan with its step budget, optimizers and seeds. ``lrs``, when given,
    replaces every optimizer's grid, and each of those learning rates runs on every seed."""

    task: Task
    steps: int
    optimizers: tuple[OptimizerSpec, ...]
    seeds: tuple[int, ...]
    sweep: bool = True
    lrs: tuple[float, ...] | None = None


def learning_rates(spec: OptimizerSpec, task: Task, sweep: bool) -> tuple[float | None, ...]:
    """The whole grid when sweeping, else its middle value (for AdamW, the best lr measured in
    benchmarks.md)."""
    grid = spec.grid(task)
    return grid if sweep else (grid[len(grid) // 2],)


@dataclass(frozen=True)
class Sweep:
    """The runs of one optimizer on one entry, in two rounds: :meth:`first_runs`, then, once
    their records are in, :meth:`later_runs` (the best learning rate on the remaining seeds)."""

    entry: Entry
    spec: OptimizerSpec

    def first_runs(self) -> list[RunConfig]:
        """Every learning rate of the sweep on the first seed; with ``lrs``, every run."""
        task, steps, seeds = self.entry.task, self.entry.steps, self.entry.seeds
        if self.entry.lrs:
            return [
                RunConfig(task, self.spec, lr, s, steps) for lr in self.entry.lrs for s in seeds
            ]
        lrs = learning_rates(self.spec, task, self.entry.sweep)
        return [RunConfig(task, self.spec, lr, seeds[0], steps) for lr in lrs]

    def later_runs(self, first: Sequence[Record]) -> list[RunConfig]:
        """The remaining seeds at the learning rate that scored best (``runner.score``) in
        ``first``, the records of :meth:`first_runs`."""
        if self.entry.lrs or not first:
            return []
        best = min(first, key=lambda r: (score(r), str(r["config"]["lr"])))
        lr, task, steps = best["config"]["lr"], self.entry.task, self.entry.steps
        return [RunConfig(task, self.spec, lr, s, steps) for s in self.entry.seeds[1:]]


def _name(config: RunConfig) -> str:
    return f"{config.task.name} {config.optimizer.name} lr={lr_label(config.lr)} seed={config.seed}"


def execute(
    entries: Sequence[Entry],
    out: Path,
    threads: int = 1,
    console: Console | None = None,
    report_only: bool = False,
    jobs: int = 1,
) -> list[Record]:
    """Run (or reuse) every run of the plan and return all their records, in plan order.

    Sweep protocol per (task, optimizer): every learning rate on the first seed, then the best
    (``runner.score``) on the remaining seeds; entries with ``sweep`` off use the grid's middle,
    and entries with ``lrs`` run each of them on every seed. ``jobs`` > 1 runs that many at a
    time, each in its own process (with ``threads`` torch threads), a sweep's later seeds
    starting as soon as its first round is in. With ``report_only`` nothing runs: the plan's
    records are taken from ``out`` where they match (``runner.reusable``), and the runs without
    one are listed on ``console``.
    """
    # soft_wrap: a finished run's line stays one line in a log file
    console = console or Console(stderr=True, soft_wrap=True)
    sweeps = [Sweep(entry, spec) for entry in entries for spec in entry.optimizers]
    if not report_only:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console) as progress:
            shown = _Shown(progress, console)
            if jobs == 1:
                _run_here(sweeps, out, threads, shown)
            else:
                run_in_workers(sweeps, out, threads, jobs, shown)
    return _collect(sweeps, out, threads, console)


class _Shown:
    """A progress bar per run while it runs, then one line saying how it ended."""

    def __init__(self, progress: Progress, console: Console) -> None:
        self.progress, self.console = progress, console

    def start(self, config: RunConfig) -> int:
        return self.progress.add_task(_name(config), total=config.steps)

    def step(self, bar: int, step: int) -> None:
        self.progress.update(bar, completed=step)

    def finish(self, bar: int, config: RunConfig, record: Record, reused: bool, moved) -> None:
        name = _name(config)
        if moved is not None:
            self.console.print(f"{name}: the record there did not match this run; kept as {moved}")
        # Finished runs leave the live display, which would otherwise grow by one bar per run
        # (some 200 in the standard plan), and become one line above it.
        self.progress.remove_task(bar)
        result = record["outcome"]
        status = "resumed" if reused else record["status"]
        self.console.print(
            f"{name} ({status}): final {result['final']:.4g}, "
            f"success {result['success']}, {record['wall_seconds']:.1f} s"
        )


def _run_here(sweeps: Sequence[Sweep], out: Path, threads: int, shown: _Shown) -> None:
    """Every run in this process, one after another, in plan order."""

    def one(config: RunConfig) -> Record:
        bar = shown.start(config)
        moved: list[Path] = []
        record, reused = run_or_load(
            config,
            out,
            threads,
            lambda step: shown.step(bar, step),
            moved.append,
        )
        shown.finish(bar, config, record, reused, moved[0] if moved else None)
        return record

    for sweep in sweeps:
        first = [one(config) for config in sweep.first_runs()]
        for config in sweep.later_runs(first):
            one(config)


def _collect(sweeps: Sequence[Sweep], out: Path, threads: int, console: Console) -> list[Record]:
    """The plan's records found in ``out``, in plan order; the planned runs without one are
    listed on ``console``."""
    found: list[Record] = []
    missing: list[str] = []

    def look_up(config: RunConfig) -> Record | None:
        record = reusable(config, out, threads)
        if record is None:
            missing.append(_name(config))
        else:
            found.append(record)
        return record

    for sweep in sweeps:
        first = [r for r in map(look_up, sweep.first_runs()) if r is not None]
        if first or sweep.entry.lrs:
            for config in sweep.later_runs(first):
                look_up(config)
        else:  # no first-seed run, so no best lr to look up
            entry = sweep.entry
            missing += [f"{entry.task.name} {sweep.spec.name} seed={s}" for s in entry.seeds[1:]]
    if missing:
        console.print(
            f"{len(missing)} planned run(s) have no matching record in {out} (run the same "
            "command without --report to make them): " + "; ".join(missing)
        )
    return found
