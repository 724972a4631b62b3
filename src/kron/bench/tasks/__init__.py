"""The benchmark tasks (benchmarks.md §3–4). ``TASKS`` maps each name to its :class:`Task`."""

from __future__ import annotations

from . import charlm, digits, recurrent, synthetic
from .base import Problem, Task

TASKS: dict[str, Task] = {
    t.name: t for module in (synthetic, digits, recurrent, charlm) for t in module.TASKS
}


def get_task(name: str) -> Task:
    """The task called ``name``; ``KeyError`` lists the known names."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


__all__ = ["TASKS", "Problem", "Task", "get_task"]
