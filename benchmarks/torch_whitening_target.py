"""What kron.torch.Kron fits P on, and how far it gets on the Kron-structured quadratic.

``kron bench`` found ``kron.torch.Kron`` stalling at a few 1e-6 on the 32×32 Kron-structured
quadratic (cond 1e6) where ``kron.numpy.KronPsgd`` reaches 1e-8. This script runs 2000 steps at
lr 3e-3 on seeds 0–2 for: KronPsgd (fits on the gradient), Kron fitting on the momentum
(kron_torch's ``momentum_into_precond_update=True``, Kron's default when this was measured), and
Kron fitting on the gradient (its default now), each with the default update schedule and with an
update every step. Every variant names its fitting target, so the table does not move with the
defaults. Prints a Markdown table of
the final relative loss f/f(0).

    .venv/bin/python benchmarks/torch_whitening_target.py
"""

from __future__ import annotations

import statistics

import numpy as np
import torch

from kron.bench.tasks.synthetic import KronQuadratic
from kron.numpy import KronPsgd
from kron.torch import Kron

STEPS, LR, SEEDS = 2000, 3e-3, (0, 1, 2)


def run_torch(seed: int, **options) -> float:
    task = KronQuadratic(seed)
    optimizer = Kron(task.parameters, lr=LR, **options)
    for step in range(STEPS):
        optimizer.zero_grad()
        task.loss(step).backward()
        optimizer.step()
    return task.evaluate()["rel_loss"]


def run_numpy(seed: int) -> float:
    task = KronQuadratic(seed)
    optimizer = KronPsgd(lr=LR)
    w = np.zeros(tuple(task.w.shape), np.float32)
    for step in range(STEPS):
        with torch.no_grad():
            task.w.copy_(torch.from_numpy(w))
        task.w.grad = None
        task.loss(step).backward()
        optimizer.step("w", w, task.w.grad.numpy().copy())
        optimizer.end_iteration()
    with torch.no_grad():
        task.w.copy_(torch.from_numpy(w))
    return task.evaluate()["rel_loss"]


def main() -> None:
    torch.set_num_threads(1)
    variants = {
        "KronPsgd (gradient)": run_numpy,
        "Kron, fit on momentum": lambda s: run_torch(s, momentum_into_precond_update=True),
        "Kron, fit on gradient": lambda s: run_torch(s, momentum_into_precond_update=False),
        "Kron p=1, fit on momentum": lambda s: run_torch(
            s, preconditioner_update_probability=1.0, momentum_into_precond_update=True
        ),
        "Kron p=1, fit on gradient": lambda s: run_torch(
            s, preconditioner_update_probability=1.0, momentum_into_precond_update=False
        ),
    }
    print("| variant | " + " | ".join(f"seed {s}" for s in SEEDS) + " | median |")
    print("|---|" + "---|" * (len(SEEDS) + 1))
    for name, run in variants.items():
        losses = [run(seed) for seed in SEEDS]
        cells = " | ".join(f"{x:.2e}" for x in losses)
        print(f"| {name} | {cells} | {statistics.median(losses):.2e} |", flush=True)


if __name__ == "__main__":
    main()
