"""The Markdown summary, computed from records alone: one row per (task, optimizer) with the
optimizer's best learning rate, and the verdict on each of the issue's targets."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from .records import Record

OURS = "kron"
BASELINE = "adamw"


@dataclass
class Row:
    """One optimizer on one task: its chosen config and the outcomes over its seeds."""

    task: str
    optimizer: str
    label: str
    lr: float | None
    runs: list[Record]

    @property
    def outcomes(self) -> list[dict[str, Any]]:
        return [r["outcome"] for r in self.runs]

    @property
    def successes(self) -> int:
        return sum(o["success"] for o in self.outcomes)

    def median(self, key: str) -> float | None:
        """Median of ``key`` over the successful seeds (``final``: over all seeds)."""
        pool = self.outcomes if key == "final" else [o for o in self.outcomes if o["success"]]
        values = [o[key] for o in pool if o[key] is not None]
        return statistics.median(values) if values else None


def _sweep_key(record: Record) -> tuple[float, float]:
    result = record["outcome"]
    steps = result["steps_to_target"] if result["success"] else math.inf
    final = result["final"] if math.isfinite(result["final"]) else math.inf
    return (steps, final)


def best_rows(records: list[Record]) -> dict[str, list[Row]]:
    """Per task, one :class:`Row` per optimizer, at the learning rate that did best on the
    lowest seed present (the sweep seed), with all seeds run at that learning rate."""
    grouped: dict[tuple[str, str], dict[Any, list[Record]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        c = r["config"]
        grouped[(c["task"], c["optimizer"])][c["lr"]].append(r)
    rows: dict[str, list[Row]] = defaultdict(list)
    for (task, optimizer), by_lr in grouped.items():
        sweep_seed = min(r["config"]["seed"] for runs in by_lr.values() for r in runs)
        candidates = [
            (_sweep_key(r), lr)
            for lr, runs in by_lr.items()
            for r in runs
            if r["config"]["seed"] == sweep_seed
        ]
        _, lr = min(candidates, key=lambda c: (c[0], str(c[1])))
        runs = sorted(by_lr[lr], key=lambda r: r["config"]["seed"])
        rows[task].append(Row(task, optimizer, runs[0]["config"]["optimizer_label"], lr, runs))
    order = {
        name: i
        for i, name in enumerate(
            ("kron", "kron_lr", "kron_momentum", "kron_skew", "kron_f32", "adamw", "sgd")
        )
    }

    def position(row: Row) -> tuple[int, str]:
        # A JAX or Keras twin sorts with its torch role (kron_jax next to kron).
        role = row.optimizer.removesuffix("_jax").removesuffix("_keras")
        return order.get(role, 9), row.optimizer

    for task_rows in rows.values():
        task_rows.sort(key=position)
    return dict(rows)


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    if not math.isfinite(value):
        return "diverged" if value > 0 else str(value)
    return f"{value:.{digits}g}"


def _seconds(value: float | None) -> str:
    """Seconds with two significant digits below 100, whole seconds above."""
    if value is None:
        return "–"
    return f"{value:.0f}" if value >= 100 else f"{value:.2g}"


def _steps(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def table(records: list[Record]) -> str:
    """The Markdown table: per task its criterion, then one line per optimizer."""
    rows = best_rows(records)
    lines = [
        "| task | target | optimizer | lr | success | steps to target | s to target | final |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task in _task_order(records):
        for row in rows[task]:
            cfg = row.runs[0]["config"]
            target = f"{cfg['metric']} ≤ {cfg['target']:g}" + (
                " (final)" if cfg["rule"] == "final" else ""
            )
            lines.append(
                f"| {task} | {target} | {row.label} | {_lr(row.lr)} "
                f"| {row.successes}/{len(row.runs)} | {_steps(row.median('steps_to_target'))} "
                f"| {_seconds(row.median('seconds_to_target'))} | {_num(row.median('final'))} |"
            )
    return "\n".join(lines)


def _lr(lr: float | None) -> str:
    return "default" if lr is None else f"{lr:g}"


def _task_order(records: list[Record]) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        seen.setdefault(r["config"]["task"], None)
    from .tasks import TASKS

    known = [t for t in TASKS if t in seen]
    return known + [t for t in seen if t not in known]


@dataclass
class Verdict:
    """One of the issue's targets: what it asks, what was measured, and whether it holds."""

    target: str
    measured: str
    status: str  # "met", "missed" or "not run"


def _row(rows: dict[str, list[Row]], task: str, optimizer: str) -> Row | None:
    return next((r for r in rows.get(task, []) if r.optimizer == optimizer), None)


# (ours, baseline) pairs the targets are judged for, when ``ours`` was run: kron at its
# defaults (the wording), kron with its lr swept like AdamW's, kron with P fitted on the
# momentum, kron with the skew rule, kron with float32 factors, and the JAX and Keras twins.
TARGET_PAIRS = (
    ("kron", "adamw"),
    ("kron_lr", "adamw"),
    ("kron_momentum", "adamw"),
    ("kron_skew", "adamw"),
    ("kron_f32", "adamw"),
    ("kron_jax", "adamw_jax"),
    ("kron_lr_jax", "adamw_jax"),
    ("kron_keras", "adamw_keras"),
    ("kron_lr_keras", "adamw_keras"),
)


def verdicts(records: list[Record], ours: str = OURS, baseline: str = BASELINE) -> list[Verdict]:
    """The issue's targets for optimizer ``ours`` against ``baseline``, evaluated on
    ``records`` (by default kron at its defaults against AdamW)."""
    rows = best_rows(records)
    out: list[Verdict] = []
    for task, needed in (("xor32", 4), ("xor64", 3)):
        row = _row(rows, task, ours)
        text = f"{task}: kron succeeds on ≥ {needed} of 5 seeds"
        if row is None:
            out.append(Verdict(text, "not run", "not run"))
            continue
        n, k = len(row.runs), row.successes
        status = "met" if k >= needed and n >= 5 else ("missed" if k + 5 - n < needed else "open")
        if n < 5 and status == "open":
            status = "not run"
        out.append(Verdict(text, f"{k}/{n} seeds", status))
    for task in ("kron_quadratic", "logistic"):
        mine, adam = _row(rows, task, ours), _row(rows, task, baseline)
        text = f"{task}: kron's final metric ≥ 10× below AdamW's best"
        if mine is None or adam is None:
            out.append(Verdict(text, "not run", "not run"))
            continue
        a, b = mine.median("final"), adam.median("final")
        ratio = b / a if a and a > 0 and b is not None else math.inf
        out.append(
            Verdict(
                text,
                f"kron {_num(a)} vs AdamW {_num(b)} ({ratio:.3g}×)",
                "met" if ratio >= 10 else "missed",
            )
        )
    out.append(_lm_verdict(rows, ours, baseline))
    out.append(_wallclock_verdict(rows, ours, baseline))
    return out


def _lm_verdict(rows: dict[str, list[Row]], mine: str, baseline: str) -> Verdict:
    """Kron reaches AdamW's end-of-budget val loss in ≤ 80% of AdamW's steps (seed medians)."""
    text = "char_lm: kron reaches AdamW's final val loss in ≥ 20% fewer steps"
    ours, adam = _row(rows, "char_lm", mine), _row(rows, "char_lm", baseline)
    if ours is None or adam is None:
        return Verdict(text, "not run", "not run")
    reference = adam.median("final")
    budget = adam.runs[0]["config"]["steps"]
    reached = []
    for run in ours.runs:
        hist = run["history"]
        hit = next(
            (
                s
                for s, v in zip(hist["step"], hist.get("val_loss", ()))
                if v is not None and v <= reference
            ),
            None,
        )
        reached.append(hit)
    if any(h is None for h in reached):
        return Verdict(
            text,
            f"AdamW {_num(reference)} at {budget}; kron never reached it "
            f"(final {_num(ours.median('final'))})",
            "missed",
        )
    steps = statistics.median(reached)
    return Verdict(
        text,
        f"AdamW {_num(reference)} at {budget}; kron at step {steps:.0f}",
        "met" if steps <= 0.8 * budget else "missed",
    )


def _wallclock_verdict(rows: dict[str, list[Row]], mine: str, baseline: str) -> Verdict:
    """Count tasks where kron reaches the target on most seeds and in less median training time
    than AdamW (or AdamW does not reach it on most seeds), among the tasks where at least one of
    the two reaches it (elsewhere there is no time-to-target to compare)."""
    wins, counted = 0, 0
    for task in rows:
        ours, adam = _row(rows, task, mine), _row(rows, task, baseline)
        if ours is None or adam is None:
            continue
        ours_ok = ours.successes * 2 > len(ours.runs)
        adam_ok = adam.successes * 2 > len(adam.runs)
        if not (ours_ok or adam_ok):
            continue
        counted += 1
        a, b = ours.median("seconds_to_target"), adam.median("seconds_to_target")
        if ours_ok and (not adam_ok or (a is not None and b is not None and a < b)):
            wins += 1
    text = "wall-clock to target: kron beats AdamW on ≥ half the tasks either solves"
    if counted == 0:
        return Verdict(text, "no task solved by either", "not run")
    return Verdict(text, f"{wins} of {counted} tasks", "met" if 2 * wins >= counted else "missed")


def verdict_table(records: list[Record], ours: str = OURS, baseline: str = BASELINE) -> str:
    lines = ["| target | measured | status |", "|---|---|---|"]
    found = verdicts(records, ours, baseline)
    lines += [f"| {v.target} | {v.measured} | {v.status} |" for v in found]
    return "\n".join(lines)


def verdict_sections(records: list[Record]) -> str:
    """One targets table per pair of :data:`TARGET_PAIRS` whose ``ours`` was run; when none was,
    the first pair's, so a plan without kron still says "not run"."""
    names = {r["config"]["optimizer"]: r["config"]["optimizer_label"] for r in records}
    labels = {OURS: "kron (defaults)", BASELINE: "AdamW", **names}
    pairs = [pair for pair in TARGET_PAIRS if pair[0] in names] or TARGET_PAIRS[:1]
    sections = []
    for ours, baseline in pairs:
        pair = f"{labels.get(ours, ours)} against {labels.get(baseline, baseline)}"
        title = f"## Issue #7 targets: {pair}"
        sections.append(title + "\n\n" + verdict_table(records, ours, baseline))
    return "\n\n".join(sections)


def markdown(records: list[Record], header: str = "") -> str:
    """The whole summary file: header, results table, targets table, versions."""
    versions = records[0]["versions"] if records else {}
    machine = records[0]["machine"] if records else {}
    parts = [
        "# kron bench summary",
        header,
        "Per task and optimizer: the learning rate that did best on the sweep seed, then all seeds "
        "at that rate. `success` counts seeds meeting the target; steps and seconds to target are "
        "medians over the successful seeds (seconds: training time only); `final` is the median "
        "final metric over all seeds.",
        table(records),
        verdict_sections(records),
        "Versions: "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f". Machine: {machine.get('platform', '?')}, {machine.get('cpu_count', '?')} CPUs, "
        f"{machine.get('torch_threads', '?')} torch thread(s) per run.",
    ]
    return "\n\n".join(p for p in parts if p) + "\n"
