"""Executing a plan: tasks × optimizers × seeds with the sweep protocol, a rich progress bar per
run, and resume (records already on disk with the same config are reused, not rerun)."""

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


def execute(
    entries: Sequence[Entry],
    out: Path,
    threads: int = 1,
    console: Console | None = None,
    report_only: bool = False,
) -> list[Record]:
    """Run (or reuse) every run of the plan and return all their records.

    Sweep protocol per (task, optimizer): every learning rate on the first seed, then the best
    (``runner.score``) on the remaining seeds; entries with ``sweep`` off use the grid's middle,
    and entries with ``lrs`` run each of them on every seed. With ``report_only`` nothing runs:
    the plan's records are taken from ``out`` where they match (``runner.reusable``), and the
    runs without one are listed on ``console``.
    """
    console = console or Console(stderr=True)
    done: list[Record] = []
    missing: list[str] = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, disable=report_only) as progress:

        def one(config: RunConfig) -> Record | None:
            name = (
                f"{config.task.name} {config.optimizer.name} lr={lr_label(config.lr)} "
                f"seed={config.seed}"
            )
            if report_only:
                record = reusable(config, out, threads)
                if record is None:
                    missing.append(name)
                else:
                    done.append(record)
                return record
            bar = progress.add_task(name, total=config.steps)
            record, reused = run_or_load(
                config,
                out,
                threads,
                lambda step: progress.update(bar, completed=step),
                lambda moved: console.print(
                    f"{name}: the record there did not match this run; kept as {moved}"
                ),
            )
            suffix = " (resumed)" if reused else f" ({record['status']})"
            progress.update(bar, completed=config.steps, description=name + suffix)
            if not console.is_terminal:
                # A live bar is not drawn into a log file; leave one line per finished run.
                result = record["outcome"]
                console.print(
                    f"{name}{suffix}: final {result['final']:.4g}, "
                    f"success {result['success']}, {record['wall_seconds']:.1f} s"
                )
            done.append(record)
            return record

        for entry in entries:
            for spec in entry.optimizers:
                if entry.lrs:
                    for lr in entry.lrs:
                        for seed in entry.seeds:
                            one(RunConfig(entry.task, spec, lr, seed, entry.steps))
                    continue
                first, rest = entry.seeds[0], entry.seeds[1:]
                sweep_runs = [
                    one(RunConfig(entry.task, spec, lr, first, entry.steps))
                    for lr in learning_rates(spec, entry.task, entry.sweep)
                ]
                found = [r for r in sweep_runs if r is not None]
                if not found:  # report only: no first-seed run, so no best lr to look up
                    missing += [f"{entry.task.name} {spec.name} seed={s}" for s in rest]
                    continue
                best = min(found, key=lambda r: (score(r), str(r["config"]["lr"])))
                for seed in rest:
                    one(RunConfig(entry.task, spec, best["config"]["lr"], seed, entry.steps))
    if missing:
        console.print(
            f"{len(missing)} planned run(s) have no matching record in {out} (run the same "
            "command without --report to make them): " + "; ".join(missing)
        )
    return done
