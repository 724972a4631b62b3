"""Run records: one JSON file per (task, optimizer, lr, seed), and the outcome computed from it.

Layout: ``<out>/runs/<task>/<optimizer>__lr-<lr>__seed-<seed>__steps-<steps>.json``. A record holds

* ``config``: everything that determines the run (task definition fields, optimizer, lr, seed,
  step budget, the optimizer's resolved settings); ``kron bench`` reuses a record only if its
  config is identical and, for a PyTorch run, its thread count is the one asked for;
* ``versions`` and ``machine``: interpreter, library and peer versions, platform, CPU count,
  torch threads;
* ``history``: columns at every evaluation point: ``step``, ``seconds`` (cumulative training
  time, evaluation excluded), ``loss`` (mean training loss since the previous point) and the
  task's evaluation metrics;
* ``status`` (``"finished"``, ``"reached_target"`` or ``"diverged"``), ``steps_done``,
  ``wall_seconds`` (whole run, evaluation included), and ``outcome`` (see :func:`outcome`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

Record = dict[str, Any]
SCHEMA = 1


def run_path(out: Path, task: str, optimizer: str, lr: float | None, seed: int, steps: int) -> Path:
    """Where the record of one run lives under the output folder ``out``."""
    # repr: the shortest text that reads back as the same float, so two learning rates never
    # share a file (``:g`` keeps six digits: 1e-3 and 1.0000001e-3 would).
    lr_part = "default" if lr is None else repr(float(lr))
    name = f"{optimizer}__lr-{lr_part}__seed-{seed}__steps-{steps}.json"
    return Path(out) / "runs" / task / name


def save(record: Record, path: Path) -> None:
    """Write ``record`` atomically (temporary file, then rename), so an interrupted run never
    leaves a half-written record that resume would trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, allow_nan=True))
    os.replace(tmp, path)


REQUIRED_CONFIG = ("task", "optimizer", "lr", "seed", "steps", "metric", "target", "rule")


def load(path: Path) -> Record | None:
    """The record at ``path``, or ``None`` when it is missing, unreadable, from another schema
    or not a complete record (any JSON file can land in the folder)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    complete = (
        isinstance(record, dict)
        and record.get("schema") == SCHEMA
        and isinstance(record.get("config"), dict)
        and all(key in record["config"] for key in REQUIRED_CONFIG)
        and isinstance(record.get("history"), dict)
        and all(key in record for key in ("status", "outcome", "machine"))
    )
    return record if complete else None


def load_all(out: Path) -> list[Record]:
    """Every readable record under ``out/runs``, in a stable (path) order."""
    paths = sorted((Path(out) / "runs").glob("*/*.json"))
    return [r for r in (load(p) for p in paths) if r is not None]


def versions(extra_packages: tuple[str, ...] = ()) -> dict[str, str]:
    """Versions of Python and of every package that can change a result."""
    found = {"python": sys.version.split()[0]}
    for name in ("kron", "torch", "numpy", "scikit-learn", *extra_packages):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine(threads: int) -> dict[str, Any]:
    """Platform, CPU model and count, and the torch thread count used for the run."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
    }


def final_value(values: list[float], window: float) -> float:
    """The last value, or the mean of the last ``window`` fraction (at least one) of values."""
    if not values:
        return math.nan
    count = max(1, round(len(values) * window)) if window > 0 else 1
    return sum(values[-count:]) / count


def outcome(record: Record) -> dict[str, Any]:
    """Final metric, success and steps/seconds to target, from ``record`` alone.

    With rule ``"reach"`` the target counts as reached at the first history point whose metric
    is ≤ target; with ``"final"`` success means the final value (the mean over the last
    ``final_window`` of the points) is ≤ target and the time to target is the first point from
    which the metric stays ≤ target, or the last point when the mean meets the target but the
    last point alone does not (the run has shown success only by its end). A diverged run fails,
    even after reaching the target, and its final value is ``inf``.
    """
    cfg, hist = record["config"], record["history"]
    metric, target = cfg["metric"], cfg["target"]
    column = hist.get(metric, [None] * len(hist["step"]))  # absent if it diverged at once
    points = [(s, t, v) for s, t, v in zip(hist["step"], hist["seconds"], column) if v is not None]
    values = [v for _, _, v in points]
    diverged = record["status"] == "diverged"
    final = math.inf if diverged else final_value(values, cfg["final_window"])
    hit = None
    if cfg["rule"] == "reach":
        hit = next((p for p in points if p[2] <= target), None)
        success = hit is not None and not diverged
    else:
        success = final <= target
        if success:
            index = len(points)
            while index > 0 and points[index - 1][2] <= target:
                index -= 1
            hit = points[index] if index < len(points) else points[-1]
    return {
        "final": final,
        "success": bool(success),
        "steps_to_target": hit[0] if success and hit else None,
        "seconds_to_target": hit[1] if success and hit else None,
    }
