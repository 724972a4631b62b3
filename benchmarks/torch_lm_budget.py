"""Where the transformer LM's ``optimizer.step()`` time goes at a low update probability.

``torch_step.py`` reports one median per optimizer; this splits the default ``Kron``'s steps
into those that fit the preconditioner and those that only apply it, so that #4's target
(within 1.5× AdamW at p = 0.03) can be set against what the products alone cost:

    .venv/bin/python benchmarks/torch_lm_budget.py [--steps 400] [--probability 0.03]

It trains the LM of ``torch_step.py`` (forward and backward between steps, as there) with
AdamW and with ``Kron``, each in turn for the same steps, and prints per optimizer the median
ms of a step that fits, of one that does not, their mix at the schedule's rate, and the share
of a non-fitting step spent in matrix products (``torch.profiler`` over 20 such steps).
``--compile-nonfit`` also compiles the steps that do not fit (on the CPU ``compile=True``
compiles only those that do): the measurement behind leaving them eager.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import profile
from torch_step import _Run

import kron.torch.optimizer as kron_optimizer
from kron.torch import Kron

PRODUCTS = ("aten::mm", "aten::bmm", "aten::addmm")


def compile_every_step() -> None:
    """Make ``compile=True`` compile the steps that do not fit too (one fresh copy of the step
    per key, as ``Kron._compiled_step`` compiles the ones that fit); others as before."""

    eager_on_cpu = kron_optimizer.Kron._compiled_step

    def compiled_step(self, plan, options, do_fit, size, dtype, device):
        if not self.compile:
            return eager_on_cpu(self, plan, options, do_fit, size, dtype, device)
        key = (plan, options, do_fit, size, dtype, device)
        if key not in self._compiled:
            self._compiled[key] = torch.compile(kron_optimizer.fresh_kron_step(), dynamic=False)
        return self._compiled[key]

    kron_optimizer.Kron._compiled_step = compiled_step


def fits_next(opt: torch.optim.Optimizer) -> bool:
    """Whether the next ``step()`` of a one-group ``Kron`` fits (its decision is pure)."""
    return isinstance(opt, Kron) and opt._decide(0, opt.param_groups[0]).fit


def timed_step(run: _Run) -> tuple[float, bool]:
    """One training step of ``run``; the ms of its ``optimizer.step()`` and whether it fit."""
    run.opt.zero_grad()
    run.loss_fn(run.model, run.step).backward()
    fit = fits_next(run.opt)
    started = time.perf_counter()
    run.opt.step()
    run.step += 1
    return 1000 * (time.perf_counter() - started), fit


def product_share(run: _Run, steps: int = 20) -> float:
    """The fraction of ``steps`` non-fitting ``optimizer.step()`` calls spent in products."""
    total = products = 0.0
    done = 0
    while done < steps:
        run.opt.zero_grad()
        run.loss_fn(run.model, run.step).backward()
        if fits_next(run.opt):
            run.opt.step()
            run.step += 1
            continue
        with profile() as prof:
            run.opt.step()
        run.step += 1
        done += 1
        events = prof.key_averages()
        total += sum(e.self_cpu_time_total for e in events)
        products += sum(e.self_cpu_time_total for e in events if e.key in PRODUCTS)
    return products / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--probability", type=float, default=0.03)
    parser.add_argument("--compile-nonfit", action="store_true")
    args = parser.parse_args()
    p = args.probability
    makers = {
        "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        "Kron (default)": lambda ps: Kron(ps, preconditioner_update_probability=p),
    }
    if args.compile_nonfit:
        compile_every_step()
        makers["Kron (compile=True, every step compiled)"] = lambda ps: Kron(
            ps, preconditioner_update_probability=p, compile=True
        )
    runs = {name: _Run("lm", make, torch.device("cpu")) for name, make in makers.items()}
    times: dict[str, dict[bool, list[float]]] = {name: {True: [], False: []} for name in runs}
    for step in range(args.warmup + args.steps):
        for name, run in runs.items():  # in turn, so load changes reach every optimizer
            ms, fit = timed_step(run)
            if step >= args.warmup:
                times[name][fit].append(ms)
    adamw = statistics.median(times["AdamW"][False])
    print(f"LM, p = {p:g}, {args.steps} steps after {args.warmup}; medians in ms")
    for name, run in runs.items():
        plain = statistics.median(times[name][False])
        fitting = times[name][True]
        if not fitting:
            print(f"{name}: {plain:.2f} per step")
            continue
        fit = statistics.median(fitting)
        mixed = (1 - p) * plain + p * fit
        print(
            f"{name}: {plain:.2f} without a fit ({100 * product_share(run):.0f} % in products), "
            f"{fit:.1f} with one ({len(fitting)} fits); mixed at p {mixed:.2f} "
            f"= {mixed / adamw:.2f}× AdamW, of which the fits {p * fit:.2f}"
        )


if __name__ == "__main__":
    main()
