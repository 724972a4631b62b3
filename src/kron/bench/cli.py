"""The ``kron`` command: ``kron bench`` runs the benchmark suite (see ``kron bench --help``)."""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path

from . import plots, summary
from .optimizers import (
    OPTIMIZERS,
    RUNNER_PACKAGES,
    OptimizerSpec,
    for_framework,
    get_optimizer,
)
from .suite import Entry, execute, learning_rates
from .tasks import TASKS, get_task
from .tiers import TIERS, Tier

# Every runner takes the same seeds; Keras's seed (and so kron.keras.Kron's) is a 31-bit int.
MAX_SEED = 2**31 - 1


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
    bench.add_argument(
        "--task",
        nargs="+",
        metavar="NAME",
        help="only these tasks (without a tier option, at the --standard tier's seeds, sweeps "
        "and optimizers)",
    )
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
    bench.add_argument(
        "--steps", type=positive_int, help="step budget for every task (overrides tier)"
    )
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
        type=positive_int,
        default=1,
        help="torch threads per run (default 1: deterministic and fair on a shared CPU)",
    )
    bench.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        help="runs at a time, each in its own process (default 1); give at most the CPU "
        "cores divided by --threads, or the runs slow each other down",
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
    """``--lr``: a finite learning rate > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a learning rate > 0")
    return value


def positive_int(text: str) -> int:
    """``--steps``, ``--threads``, ``--jobs``: a whole number ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def seed_list(text: str) -> tuple[int, ...]:
    """``--seeds``: a count ``N`` (seeds 0…N−1, N ≥ 1) or a comma list such as ``0,3``; a seed
    listed twice is run once (counting it twice would inflate a success rate)."""
    try:
        if "," in text:
            seeds = tuple(dict.fromkeys(int(s) for s in text.split(",") if s))
        else:
            seeds = tuple(range(int(text)))
    except ValueError:
        seeds = ()
    if not seeds or min(seeds) < 0 or max(seeds) > MAX_SEED:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a seed count N >= 1 (seeds 0…N−1) nor a comma list of "
            f"seeds in [0, {MAX_SEED}] (for seed 0 alone: 0,)"
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


def _tasks(args: argparse.Namespace, tier: Tier) -> dict[str, int | None]:
    """Task name → the tier's budget for it (``None``: the task's own). Tasks named on the
    command line must exist and, off PyTorch, have a runner; the tier's are narrowed quietly."""
    if not args.task:
        tasks = dict(tier.tasks)
    else:
        unknown = [name for name in args.task if name not in TASKS]
        if unknown:
            raise SystemExit(
                f"--task: unknown {', '.join(map(repr, unknown))}; known: {', '.join(TASKS)}"
            )
        tasks = {name: tier.tasks.get(name) for name in dict.fromkeys(args.task)}
    if args.framework in ("jax", "keras"):
        _require(RUNNER_PACKAGES[args.framework], args.framework)
        from .jax_problems import PORTS

        absent = [name for name in (args.task or ()) if name not in PORTS]
        if absent:
            raise SystemExit(
                f"--task: {', '.join(absent)} has no --framework {args.framework} runner; "
                f"tasks that have one: {', '.join(PORTS)}"
            )
        tasks = {name: budget for name, budget in tasks.items() if name in PORTS}
    return tasks


def _named_optimizers(names: list[str], framework: str) -> list[OptimizerSpec]:
    """The specs of the optimizers named on the command line, each checked to exist, to have a
    ``framework`` version and to be installed."""
    specs = []
    for name in dict.fromkeys(names):
        try:
            get_optimizer(name)
        except KeyError as error:
            raise SystemExit(f"--optimizer: {error.args[0]}") from None
        spec = for_framework(name, framework)
        if spec is None:
            offered = ", ".join(s.name for s in OPTIMIZERS.values() if s.framework == framework)
            raise SystemExit(
                f"--optimizer: {name!r} has no --framework {framework} version; "
                f"the {framework} optimizers: {offered}"
            )
        if not spec.available():
            raise SystemExit(
                f"--optimizer: {spec.name} needs the package {spec.package}, which is not installed"
            )
        specs.append(spec)
    return specs


def plan(args: argparse.Namespace, tier: Tier) -> list[Entry]:
    """The entries to run, from the tier narrowed or overridden by the command-line options.
    Optimizers that cannot train float64 parameters are left out of the float64 tasks (with a
    note on stderr when they were named on the command line)."""
    named = _named_optimizers(args.optimizer, args.framework) if args.optimizer else None
    entries, left_out = [], {}
    for name, budget in _tasks(args, tier).items():
        task = get_task(name)
        if named is not None:
            candidates = named
        else:
            found = (
                for_framework(n, args.framework)
                for n in tier.optimizers_by_task.get(name, tier.optimizers)
            )
            candidates = [s for s in found if s is not None and s.available()]
        specs = tuple(dict.fromkeys(s for s in candidates if s.float64 or not task.float64))
        for spec in candidates:
            if spec not in specs:
                left_out.setdefault(spec.name, []).append(name)
        if args.lr:
            fixed = [s.name for s in specs if s.grid(task) == (None,)]
            if fixed:
                raise SystemExit(
                    f"--lr: {', '.join(fixed)} run at their defaults only; for other learning "
                    "rates use the lr-swept twin (kron_lr, kron_lr_jax, kron_lr_keras)"
                )
        seeds = args.seeds or tuple(range(tier.seeds_by_task.get(name, tier.seeds)))
        steps = args.steps if args.steps is not None else budget or task.steps
        sweep = tier.sweep and not args.no_sweep and name not in tier.unswept_tasks
        lrs = tuple(dict.fromkeys(args.lr)) if args.lr else None
        entries.append(Entry(task, steps, specs, seeds, sweep and not lrs, lrs))
    if named is not None:
        for spec_name, tasks in left_out.items():
            print(
                f"kron bench: {spec_name} cannot train float64 parameters; left out of "
                f"{', '.join(tasks)}",
                file=sys.stderr,
            )
    if not any(entry.optimizers for entry in entries):
        raise SystemExit(
            "kron bench: nothing to run: no task of the plan has an optimizer that can run it "
            f"(--framework {args.framework})"
        )
    return entries


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
    if args.out.exists() and not args.out.is_dir():
        raise SystemExit(f"--out: {args.out} is a file; give a folder (made if missing)")
    entries = plan(args, tier)
    try:  # made before any run trains, so that a folder that cannot be made costs no run
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"--out: cannot make the folder {args.out} ({error.strerror})") from None
    started = time.perf_counter()
    # Exactly this plan's records (run now or resumed), so other tiers' records in the same
    # folder never mix in; a plan can be assembled from several interrupted invocations.
    all_records = execute(entries, args.out, args.threads, report_only=args.report, jobs=args.jobs)
    if not all_records:
        # An empty summary would overwrite the folder's last one and sit beside its old plots.
        raise SystemExit(
            f"--report: {args.out / 'runs'} holds no record of this command's runs; "
            "run it without --report first"
        )
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
