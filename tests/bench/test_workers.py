"""``kron bench --jobs``: worker processes stop with the command, whatever stops it."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kron.bench.cli import main
from kron.bench.optimizers import get_optimizer
from kron.bench.runner import RunConfig
from kron.bench.suite import Entry, execute
from kron.bench.tasks import TASKS


def _record_path(out: Path, task: str, steps: int) -> Path:
    return RunConfig(TASKS[task], get_optimizer("kron"), None, 0, steps).path(out)


def test_a_failing_run_stops_the_runs_beside_it(tmp_path):
    """The failure reaches the caller as soon as it happens: the longer run on the other worker
    is terminated rather than waited for, and no worker outlives the command."""
    steps = 1000  # deep linear: about 2 s; autoencoder: about 14 s
    failing = _record_path(tmp_path, "deep_linear", steps)
    failing.with_suffix(".json.tmp").mkdir(parents=True)  # so that saving its record fails
    args = ["bench", "--task", "deep_linear", "autoencoder", "--optimizer", "kron"]
    args += ["--seeds", "0,", "--steps", str(steps), "--out", str(tmp_path), "--jobs", "2"]
    with pytest.raises(IsADirectoryError):
        main(args)
    assert not _record_path(tmp_path, "autoencoder", steps).exists()
    assert multiprocessing.active_children() == []


def _children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(child) for child in path.read_text().split()} if path.exists() else set()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0


def test_sigterm_ends_the_command_and_its_workers(tmp_path):
    """``kill`` (or a supervisor's ``terminate()``) stops the workers with the command; they
    used to run on, orphaned, and write records into --out after it had gone. (Linux: the
    workers are found through /proc.)"""
    command = [sys.executable, "-m", "kron", "bench", "--task", "autoencoder", "--optimizer"]
    command += ["kron", "adamw", "--seeds", "0,", "--no-sweep", "--out", str(tmp_path)]
    process = subprocess.Popen(
        [*command, "--jobs", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        workers: set[int] = set()
        while len(workers) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            # The pool's workers; the resource tracker is a child too, and exits on its own.
            workers = {c for c in _children(process.pid) if "spawn_main" in _cmdline(c)}
        assert len(workers) == 2
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        process.kill()
    deadline = time.monotonic() + 30
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(_alive, workers))
    assert not list(tmp_path.glob("runs/*/*.json"))


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


def test_workers_refuse_a_task_they_cannot_rebuild(tmp_path):
    """Workers rebuild each run by name, so a task changed in the caller's process would run
    as registered; it is refused instead."""
    changed = dataclasses.replace(TASKS["deep_linear"], target=0.5)
    entry = Entry(changed, 10, (get_optimizer("kron"),), (0,))
    with pytest.raises(ValueError, match="registered tasks only; task 'deep_linear'"):
        execute([entry], tmp_path, jobs=2)
    assert execute([entry], tmp_path, jobs=1)[0]["config"]["target"] == 0.5
