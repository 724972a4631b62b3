"""How kron.torch.Kron's default ``max_skew`` was chosen: dense factors everywhere (``inf``,
kron_torch's rule) against a diagonal factor for an axis whose square exceeds 32 times its
tensor's size (``32``), with psgd_torch's ``1`` for reference.

Convergence: full-data cross-entropy on scikit-learn digits of a 64-512-10 tanh MLP, whose
10×512 head is the one weight the rule changes at 32 (512² > 32·5120), after 300 steps of
batch 128 at update probability 1.0 and after 1000 steps at the default schedule (1.0 for 500
steps, then decaying), per learning rate, median over 3 seeds. Speed: ms per
``optimizer.step()`` on the 256-512-512-10 MLP of ``torch_step.py`` (its 10×512 head changes
too; the transformer LM has no axis the rule changes at 32), at update probability 1 and 0.03.

    python benchmarks/torch_skew_default.py --json benchmarks/results/torch_skew_default_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch
from torch_defaults import digits_loss
from torch_step import time_cell

from kron.torch import Kron

SKEWS = (math.inf, 32.0, 1.0)
LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2)
RUNS = {"p = 1, 300 steps": (1.0, 300), "default schedule, 1000 steps": (None, 1000)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    lr_columns = " | ".join(f"lr {lr:g}" for lr in LEARNING_RATES)
    print(f"| max_skew | run | {lr_columns} |")
    print("|---|---|" + "---|" * len(LEARNING_RATES))
    for skew in SKEWS:
        for run, (probability, steps) in RUNS.items():
            by_lr = {
                lr: statistics.median(
                    digits_loss(dict(max_skew=skew), lr, seed, steps, 512, probability)
                    for seed in range(args.seeds)
                )
                for lr in LEARNING_RATES
            }
            rows.append(dict(max_skew=skew, run=run, loss_by_lr=by_lr))
            losses = " | ".join(f"{by_lr[lr]:.2g}" for lr in LEARNING_RATES)
            print(f"| {skew:g} | {run} | {losses} |", flush=True)
    print("\n| p | " + " | ".join(f"max_skew={s:g} ms" for s in SKEWS) + " |")
    print("|---|" + "---|" * len(SKEWS))
    for p in (1.0, 0.03):
        makers = {
            f"{s:g}": lambda ps, s=s, p=p: Kron(ps, preconditioner_update_probability=p, max_skew=s)
            for s in SKEWS
        }
        timed = time_cell("mlp", makers, 10, 34, 3, torch.device("cpu"))
        speed = {name: cell[0] for name, cell in timed.items()}
        rows.append(dict(probability=p, ms_per_step=speed))
        print(f"| {p:g} | " + " | ".join(f"{speed[f'{s:g}']:.2f}" for s in SKEWS) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
