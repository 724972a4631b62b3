"""A plan's runs on worker processes (``kron bench --jobs N``).

The parent keeps the queue: at most ``jobs`` runs are in the pool at a time, and a sweep's later
seeds go to the front as soon as its first round is in, so an interrupted plan leaves whole
sweeps behind it. Workers are spawned, not forked (a fork would copy this process's torch and
OpenMP thread state, which is not safe to inherit), ignore Ctrl-C and exit when the parent
dies; on any error, Ctrl-C or SIGTERM the parent terminates them at once: records are written
atomically, so a run cut short leaves nothing behind.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from queue import Empty
from typing import TYPE_CHECKING

from .optimizers import get_optimizer
from .records import Record
from .runner import RunConfig, run_or_load
from .tasks import get_task

if TYPE_CHECKING:
    from .suite import Sweep, _Shown

_steps_done = None  # in a worker: the queue that carries (bar, step) to the parent


def run_in_workers(
    sweeps: Sequence[Sweep], out: Path, threads: int, jobs: int, shown: _Shown
) -> None:
    """Run (or reuse) every run of ``sweeps`` on ``jobs`` worker processes."""
    first_records: list[list[Record | None]] = []
    waiting: deque[tuple[int, int | None, RunConfig]] = deque()  # (sweep, position, config)
    for index, sweep in enumerate(sweeps):
        configs = sweep.first_runs()
        first_records.append([None] * len(configs))
        waiting.extend((index, position, config) for position, config in enumerate(configs))
    for _, _, config in waiting:
        _check_registered(config)
    context = multiprocessing.get_context("spawn")
    steps_done = context.Queue()
    running: dict = {}  # AsyncResult -> (sweep, position, config, bar)
    pool = None
    restore = _terminate_on_sigterm()  # before the first worker exists
    try:
        pool = context.Pool(jobs, initializer=_start_worker, initargs=(steps_done,))
        while waiting or running:
            while waiting and len(running) < jobs:
                index, position, config = waiting.popleft()
                bar = shown.start(config)
                result = pool.apply_async(_run_in_worker, (_by_name(config), out, threads, bar))
                running[result] = (index, position, config, bar)
            _show_steps(steps_done, shown)
            for result in [r for r in running if r.ready()]:
                index, position, config, bar = running.pop(result)
                record, reused, moved = result.get()  # a worker's exception is raised here
                shown.finish(bar, config, record, reused, moved)
                if position is None:
                    continue
                first_records[index][position] = record
                if all(r is not None for r in first_records[index]):
                    later = sweeps[index].later_runs(first_records[index])
                    waiting.extendleft((index, None, config) for config in reversed(later))
        pool.close()
    except BaseException:
        # (If Pool() itself failed, the workers it had started exit when this process does.)
        if pool is not None:
            pool.terminate()
        raise
    finally:
        restore()
        if pool is not None:
            pool.join()


def _check_registered(config: RunConfig) -> None:
    """Workers rebuild each run from its task's and optimizer's names (their functions do not
    pickle), so only the registered definitions can run there."""
    if get_task(config.task.name) is not config.task:
        raise ValueError(
            f"jobs > 1 runs the registered tasks only; task {config.task.name!r} was changed "
            "(run it with jobs=1)"
        )
    if get_optimizer(config.optimizer.name) is not config.optimizer:
        raise ValueError(
            f"jobs > 1 runs the registered optimizers only; optimizer {config.optimizer.name!r} "
            "was changed (run it with jobs=1)"
        )


def _terminate_on_sigterm():
    """Make SIGTERM raise ``SystemExit`` here, so that the workers are terminated with the
    parent; returns the function that puts the previous handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # only the main thread may set handlers; the default then stands

    def leave(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, leave)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _show_steps(steps_done, shown: _Shown) -> None:
    """Progress messages from the workers, waiting up to 0.2 s for the first."""
    timeout: float | None = 0.2
    while True:
        try:
            bar, step = steps_done.get(timeout=timeout) if timeout else steps_done.get_nowait()
        except Empty:
            return
        timeout = None
        if bar in shown.progress.task_ids:  # not a late message from a finished run
            shown.step(bar, step)


def _by_name(config: RunConfig) -> tuple:
    return (config.task.name, config.optimizer.name, config.lr, config.seed, config.steps)


def _start_worker(steps_done) -> None:
    global _steps_done
    _steps_done = steps_done
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to act on
    parent = multiprocessing.parent_process()
    threading.Thread(target=_exit_after, args=(parent,), daemon=True).start()
    # The peers print their state sizes, which would cut into the parent's progress bars.
    sys.stdout = open(os.devnull, "w")


def _exit_after(parent) -> None:
    parent.join()
    os._exit(1)


def _run_in_worker(
    by_name: tuple, out: Path, threads: int, bar: int
) -> tuple[Record, bool, Path | None]:
    """``run_or_load`` in a worker: ``(record, was_reused, set-aside path or None)``."""
    task, optimizer, lr, seed, steps = by_name
    config = RunConfig(get_task(task), get_optimizer(optimizer), lr, seed, steps)
    moved: list[Path] = []
    record, reused = run_or_load(
        config, out, threads, lambda step: _steps_done.put((bar, step)), moved.append
    )
    return record, reused, moved[0] if moved else None
