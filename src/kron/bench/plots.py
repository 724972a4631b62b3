"""PNG figures from records alone: one figure per task, the task's metric against steps and
against training seconds, for every optimizer at its chosen learning rate (one line per seed)."""

from __future__ import annotations

from pathlib import Path

from .records import Record
from .summary import best_rows

COLORS = {
    "kron": "#d62728",
    "kron_lr": "#ff9896",
    "kron_momentum": "#ff7f0e",
    "kron_skew": "#e377c2",
    "kron_f32": "#bcbd22",
    "adamw": "#1f77b4",
    "sgd": "#7f7f7f",
    "kron_torch": "#2ca02c",
    "heavyball": "#9467bd",
    "psgdax": "#98df8a",
    "kron_jax": "#8c564b",
    "kron_lr_jax": "#c49c94",
    "adamw_jax": "#17becf",
    "kron_keras": "#e7ba52",
    "kron_lr_keras": "#dbdb8d",
    "adamw_keras": "#9edae5",
}


def plot_task(task: str, rows, path: Path) -> Path:
    """Draw one task's figure to ``path`` (PNG, 10×4 in at 80 dpi, a few tens of kB)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = rows[0].runs[0]["config"]
    metric = cfg["metric"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=80)
    positive = True
    for row in rows:
        color = COLORS.get(row.optimizer, None)
        lr = "default" if row.lr is None else f"{row.lr:g}"
        for i, run in enumerate(row.runs):
            hist = run["history"]
            column = hist.get(metric, ())  # absent when the run diverged before evaluating
            points = [(s, t, v) for s, t, v in zip(hist["step"], hist["seconds"], column)]
            points = [p for p in points if p[2] is not None]
            if not points:
                continue
            steps, seconds, values = zip(*points)
            positive = positive and min(values) > 0
            seeds = f"{len(row.runs)} seed" + ("s" if len(row.runs) > 1 else "")
            label = f"{row.label} (lr {lr}, {seeds})" if i == 0 else None
            axes[0].plot(steps, values, color=color, alpha=0.8, lw=1, label=label)
            axes[1].plot(seconds, values, color=color, alpha=0.8, lw=1)
    for ax, xlabel in zip(axes, ("step", "training seconds")):
        ax.axhline(cfg["target"], color="black", ls="--", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        if positive:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:  # no line when every run diverged at once
        axes[0].legend(fontsize=7)
    fig.suptitle(f"{task}: {cfg['title']} (dashed: target)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_all(records: list[Record], folder: Path) -> list[Path]:
    """One PNG per task in ``folder`` (``<task>.png``); returns the paths written."""
    return [
        plot_task(task, rows, Path(folder) / f"{task}.png")
        for task, rows in best_rows(records).items()
    ]
