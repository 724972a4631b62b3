"""What stacking same-shape leaves into one fit costs and saves in ``kron.optax``, against psgdax.

``kron.optax`` fits the leaves that share a plan as one stack (one batched fit per distinct
shape), so the traced fit, and the compile time, grow with the number of shapes rather than
leaves. This script measures the other side of that choice: on a machine with few cores, one
batched fit leaves XLA fewer independent operations to run side by side than a fit per leaf.
For each stack size limit it cuts every stack into pieces of at most that many leaves (by
replacing ``kron.optax.stacks.stacks_of`` in this process only: the library has no such option)
and reports the jitted train step's compile time and its time per step, with psgdax, which fits
leaf by leaf, in the same process.

It also compiles the step once with ``preconditioner_init_scale=1.0``: the automatic scale
(psgdax's and our default) adds a branch to the first update, which is part of the compile time.

    python benchmarks/optax_stacking.py --json benchmarks/results/optax_stacking_cpu_xeon.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from collections.abc import Callable

import jax
import optax
from optax_step import compiled_run, mlp_loss, mlp_params, time_in_turn

import kron.optax
import kron.optax.checks
import kron.optax.stacks

BATCH = 128
_STACKS_OF = kron.optax.stacks.stacks_of


def limited_stacks(limit: int | None) -> Callable:
    """``stacks_of`` with every stack cut into consecutive pieces of at most ``limit`` leaves."""

    def stacks_of(layouts, multiple=1):
        pieces = []
        for stack in _STACKS_OF(layouts, multiple):
            size = limit or len(stack.members)
            for start in range(0, len(stack.members), size):
                members = stack.members[start : start + size]
                layers = stack.layers[start : start + size]
                real = sum(layers) * stack.plan.num_blocks
                rows = -(-real // multiple) * multiple
                pieces.append(kron.optax.stacks.Stack(stack.plan, members, layers, rows))
        return pieces

    return stacks_of


def variants(probability: float, limits: list[int]) -> dict[str, Callable]:
    """Row name -> (make the transformation, the stack size limit it runs under)."""
    import psgdax

    def ours(**extra):
        return lambda: kron.optax.kron(
            learning_rate=1e-3, preconditioner_update_probability=probability, **extra
        )

    made = {f"kron.optax, stacks of <= {n}": (ours(), n) for n in limits}
    made["kron.optax, no limit"] = (ours(), None)
    made["kron.optax, no limit, init scale 1.0"] = (ours(preconditioner_init_scale=1.0), None)
    made["psgdax"] = (
        lambda: psgdax.kron(
            learning_rate=1e-3,
            preconditioner_update_probability=probability,
            key=jax.random.PRNGKey(42),
        ),
        None,
    )
    return made


def measure(args: argparse.Namespace) -> list[dict]:
    params0 = mlp_params(jax.random.PRNGKey(0), [256] * (args.depth + 1) + [10])
    x = jax.random.normal(jax.random.PRNGKey(1), (BATCH, 256))
    y = jax.random.randint(jax.random.PRNGKey(2), (BATCH,), 0, 10)
    rows = []
    for probability in args.probabilities:
        runs: dict[str, dict] = {}
        for _ in range(args.compiles):  # the shortest of a few fresh compiles, in turn
            for name, (make, limit) in variants(probability, args.limits).items():
                kron.optax.checks.stacks_of = limited_stacks(limit)
                try:
                    runs[name] = compiled_run(make, params0, mlp_loss, x, y, runs.get(name))
                finally:
                    kron.optax.checks.stacks_of = _STACKS_OF
        time_in_turn(runs, x, y, args)
        peer = statistics.median(runs["psgdax"]["windows"])
        for name, run in runs.items():
            ms = statistics.median(run["windows"])
            rows.append(
                {
                    "p": probability,
                    "variant": name,
                    "ms_per_step": ms,
                    "vs_psgdax": ms / peer,
                    "compile_s": run["compile_s"],
                    "gflop": run["gflop"],
                }
            )
            print(
                f"p={probability} {name}: {ms:.2f} ms ({ms / peer:.2f}x psgdax), "
                f"compile {run['compile_s']:.1f} s",
                flush=True,
            )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| p | variant | ms/step | × psgdax | compile s | GFLOP/step |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['p']} | {r['variant']} | {r['ms_per_step']:.2f} | "
            f"{r['vs_psgdax']:.2f} | {r['compile_s']:.1f} | {r['gflop']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=12, help="hidden 256x256 layers (12)")
    parser.add_argument("--limits", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--probabilities", nargs="+", type=float, default=[1.0, 0.03])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compiles", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = measure(args)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": platform.processor() or platform.machine(),
                    "versions": {"jax": jax.__version__, "optax": optax.__version__},
                    "args": vars(args),
                    "rows": rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
