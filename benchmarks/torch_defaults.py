"""How kron.torch.Kron's default geometry and layout rule were chosen.

For each candidate (geometry × skew rule) this script measures (a) convergence: full-data
cross-entropy of a 64-64-10 tanh MLP on scikit-learn digits after 300 steps of batch 128, per
learning rate in {1e-3, 3e-3, 1e-2, 3e-2}, median over 3 seeds, at update probability 1.0, with P
fitted on ``--fit-on`` (the gradient, the default since the defaults changed, or the momentum,
the default when the geometry was chosen); and (b) speed: median ms per ``optimizer.step()`` on
the 256-512-512-10 MLP of ``torch_step.py`` at update probability 1.0 and 0.03.

    python benchmarks/torch_defaults.py --fit-on momentum \
        --json benchmarks/results/torch_defaults_cpu.json
    python benchmarks/torch_defaults.py --json benchmarks/results/torch_defaults_gradient_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from sklearn.datasets import load_digits
from torch import nn

from kron.torch import Kron

GEOMETRIES = ("EQ", "QEQ", "Q0.5EQ1.5", "QUAD")
SKEWS = (float("inf"), 1.0)
LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2)


def digits_loss(
    options: dict, lr: float, seed: int, steps: int = 300, hidden: int = 64, probability=1.0
) -> float:
    """Full-data cross-entropy of a 64-``hidden``-10 tanh MLP after ``steps`` steps of batch 128
    (inf for NaN); ``probability`` is the preconditioner update probability (None: the default
    schedule)."""
    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))
    opt = Kron(model.parameters(), lr=lr, preconditioner_update_probability=probability, **options)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(x), (128,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[index]), y[index])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        value = nn.functional.cross_entropy(model(x), y).item()
    return value if value == value else float("inf")


def main() -> None:
    from torch_step import time_cell

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--fit-on",
        choices=("gradient", "momentum"),
        default="gradient",
        help="what P is fitted on in the convergence runs (default: gradient, Kron's default)",
    )
    args = parser.parse_args()
    on_momentum = args.fit_on == "momentum"
    rows = []
    lr_columns = " | ".join(f"lr {lr:g}" for lr in LEARNING_RATES)
    print(f"| geometry | max_skew | {lr_columns} | ms/step p=1 | ms/step p=0.03 |")
    print("|---|---|" + "---|" * len(LEARNING_RATES) + "---|---|")
    for geometry in GEOMETRIES:
        for skew in SKEWS:
            options = dict(preconditioner_mode=geometry, max_skew=skew)
            fit_options = dict(options, momentum_into_precond_update=on_momentum)
            by_lr = {
                lr: statistics.median(digits_loss(fit_options, lr, s) for s in range(args.seeds))
                for lr in LEARNING_RATES
            }
            best_lr = min(by_lr, key=by_lr.get)
            speed = {
                p: time_cell(
                    "mlp",
                    {
                        "kron": lambda ps, p=p, options=options: Kron(
                            ps, preconditioner_update_probability=p, **options
                        )
                    },
                    10,
                    34,
                    3,
                    torch.device("cpu"),
                )["kron"][0]
                for p in (1.0, 0.03)
            }
            rows.append(
                dict(
                    geometry=geometry,
                    max_skew=skew,
                    loss_by_lr=by_lr,
                    best_lr=best_lr,
                    ms_p1=speed[1.0],
                    ms_p003=speed[0.03],
                )
            )
            losses = " | ".join(f"{by_lr[lr]:.4f}" for lr in LEARNING_RATES)
            print(
                f"| {geometry} | {skew:g} | {losses} | {speed[1.0]:.1f} | {speed[0.03]:.1f} |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
