"""The ``kron`` command: ``kron bench`` runs the benchmark suite (see ``kron bench --help``)."""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path

from . import plots, records, summary
from .optimizers import OPTIMIZERS, for_framework, get_optimizer
from .suite import Entry, execute, learning_rates
from .tasks import TASKS, get_task
from .tiers import TIERS, Tier


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kron", description="PSGD-Kron tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench",
        help="run the benchmark suite",
        description="Run tasks × optimizers × seeds; write one JSON record per run, "
        "summary.md and PNG plots to --out. Finished runs found in --out are reused.",
    )
    tier = bench.add_mutually_exclusive_group()
    for name, t in TIERS.items():
        tier.add_argument(
            f"--{name}", dest="tier", action="store_const", const=name, help=t.description
        )
    bench.add_argument("--list", action="store_true", help="list tasks, optimizers and tiers")
    bench.add_argument("--task", nargs="+", metavar="NAME", help="only these tasks")
    bench.add_argument(
        "--optimizer",
        nargs="+",
        metavar="NAME",
        help="these optimizers on every task of the plan, in place of its own",
    )
    bench.add_argument(
        "--seeds",
        type=seed_list,
        help="a count N (seeds 0…N−1) or a comma list, e.g. 0,3 (seed 0 alone: 0,)",
    )
    bench.add_argument(
        "--lr",
        type=positive_float,
        nargs="+",
        metavar="LR",
        help="run exactly these learning rates, each on every seed, instead of each "
        "optimizer's grid or default (no sweep)",
    )
    bench.add_argument("--steps", type=int, help="step budget for every task (overrides tier)")
    bench.add_argument("--out", type=Path, default=Path("out/bench"), help="output folder")
    bench.add_argument(
        "--framework",
        default="torch",
        choices=("torch", "jax", "keras"),
        help="front end to benchmark: torch (every task); jax (kron.optax, optax.adamw) or "
        "keras (kron.keras.Kron, Keras AdamW, on Keras's JAX backend) on the five cheap tasks, "
        "the others being skipped",
    )
    bench.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run (default 1: deterministic and fair on a shared CPU)",
    )
    bench.add_argument(
        "--report",
        action="store_true",
        help="run nothing: rebuild summary.md and the plots from the plan's records in --out",
    )
    bench.add_argument(
        "--no-sweep",
        action="store_true",
        help="run only the middle lr of each grid (the best measured for AdamW)",
    )
    return parser


def positive_float(text: str) -> float:
    """``--lr``: a learning rate > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a learning rate > 0")
    return value


def seed_list(text: str) -> tuple[int, ...]:
    """``--seeds``: a count ``N`` (seeds 0…N−1, N ≥ 1) or a comma list such as ``0,3``."""
    try:
        if "," in text:
            seeds = tuple(int(s) for s in text.split(",") if s)
        else:
            seeds = tuple(range(int(text)))
    except ValueError:
        seeds = ()
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a seed count N >= 1 (seeds 0…N−1) nor a comma list of "
            "seeds >= 0 (for seed 0 alone: 0,)"
        )
    return seeds


def _require(modules: tuple[str, ...], framework: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(
            f"--framework {framework} needs {', '.join(missing)}, which is not installed; "
            "install kron's extras with: bash scripts/setup-venv.sh "
            + ("bench,torch,jax" if framework == "jax" else "bench,torch,jax,keras")
        )


def plan(args: argparse.Namespace, tier: Tier) -> list[Entry]:
    """The entries to run, from the tier narrowed or overridden by the command-line options."""
    tasks = dict(tier.tasks)
    if args.task:
        tasks = {name: tier.tasks.get(name) for name in args.task}
    if args.framework in ("jax", "keras"):
        _require(("jax", "optax") if args.framework == "jax" else ("jax", "keras"), args.framework)
        from .jax_problems import PORTS

        tasks = {name: budget for name, budget in tasks.items() if name in PORTS}
    seeds_override = args.seeds
    entries = []
    for name, budget in tasks.items():
        task = get_task(name)
        names = args.optimizer or tier.optimizers_by_task.get(name, tier.optimizers)
        for n in names:
            get_optimizer(n)  # an unknown name raises, whatever the framework
        found = (for_framework(n, args.framework) for n in names)
        specs = tuple(
            dict.fromkeys(
                s
                for s in found
                if s is not None and s.available() and (s.float64 or not task.float64)
            )
        )
        if args.lr:
            fixed = [s.name for s in specs if s.grid(task) == (None,)]
            if fixed:
                raise SystemExit(
                    f"--lr: {', '.join(fixed)} run at their defaults only; for other learning "
                    "rates use the lr-swept twin (kron_lr, kron_lr_jax, kron_lr_keras)"
                )
        seeds = seeds_override or tuple(range(tier.seeds_by_task.get(name, tier.seeds)))
        steps = args.steps or budget or task.steps
        sweep = tier.sweep and not args.no_sweep and name not in tier.unswept_tasks
        lrs = tuple(args.lr) if args.lr else None
        entries.append(Entry(task, steps, specs, seeds, sweep and not lrs, lrs))
    return entries


def planned_records(entries: list[Entry], out: Path) -> list[dict]:
    """The records under ``out`` that belong to the plan (task, optimizer and step budget match
    one of its entries), whatever their learning rate and seed."""
    wanted = {(e.task.name, s.name, e.steps) for e in entries for s in e.optimizers}
    return [
        r
        for r in records.load_all(out)
        if (r["config"]["task"], r["config"]["optimizer"], r["config"]["steps"]) in wanted
    ]


def list_everything() -> str:
    lines = ["Tasks (name, steps, success criterion):"]
    lines += [f"  {t.name:22s} {t.steps:6d}  {t.criterion}" for t in TASKS.values()]
    lines.append("Optimizers (name, lr grid, available):")
    example = TASKS["deep_linear"]
    for spec in OPTIMIZERS.values():
        grid = ", ".join("default" if lr is None else f"{lr:g}" for lr in spec.grid(example))
        lines.append(
            f"  {spec.name:12s} [{grid}] (deep_linear's grid) "
            f"{'yes' if spec.available() else 'not installed'}"
        )
    lines.append("Tiers:")
    lines += [f"  --{t.name:9s} {t.description}" for t in TIERS.values()]
    return "\n".join(lines)


def bench(args: argparse.Namespace) -> int:
    if args.list:
        print(list_everything())
        return 0
    tier = TIERS[args.tier or ("quick" if not args.task else "standard")]
    entries = plan(args, tier)
    started = time.perf_counter()
    # Exactly this plan's records (run now or resumed), so other tiers' records in the same
    # folder never mix in; a plan can be assembled from several interrupted invocations.
    if args.report:
        all_records = planned_records(entries, args.out)
    else:
        all_records = execute(entries, args.out, args.threads)
    header = f"Command: `kron bench {' '.join(sys.argv[2:])}` (tier {tier.name})."
    text = summary.markdown(all_records, header)
    (args.out / "summary.md").write_text(text)
    written = plots.plot_all(all_records, args.out / "plots")
    print(summary.table(all_records))
    print()
    print(summary.verdict_sections(all_records))
    print(
        f"\n{len(all_records)} runs, {time.perf_counter() - started:.0f} s; wrote "
        f"{args.out / 'summary.md'}, {len(written)} plots in {args.out / 'plots'}, "
        f"records in {args.out / 'runs'}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        return bench(args)
    return 2


__all__ = ["learning_rates", "main"]
