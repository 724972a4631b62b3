"""Sharded (DistributedKron) against replicated (Kron) preconditioner work on CPU processes.

For each world size and update probability, ``world`` processes joined by gloo train the 4-layer
d=128 transformer encoder LM of ``torch_step.py`` (each rank its own 16×64-token batches, DDP
averaging the gradients) with either ``Kron`` (replicated: every rank fits and applies every
preconditioner) or ``DistributedKron`` (each preconditioner on one owner rank). Per rank and step
it records:

* ``precond_cpu_ms``: CPU time of the main thread inside the optimizer's local preconditioner
  compute (``Kron._step_bucket``: gathering gradients, the fit, applying P, writing state and
  parameters). Thread CPU time does not count waiting or the other processes sharing the cores,
  so it measures the work even when processes outnumber cores.
* ``step_cpu_ms``: main-thread CPU time of the whole ``optimizer.step()`` (adds packing and
  unpacking of published parameters and Python overhead; gloo's own threads are not counted).
* ``step_wall_ms``: wall time of ``optimizer.step()``, including waiting for collectives. With
  more processes than cores this is contended and not a speed figure.
* ``state_bytes``: bytes of every tensor in the rank's ``optimizer.state``.
* ``cost_share``: the rank's share of the cost model (``kron.torch.distributed.parameter_cost``)
  for the kind of step the median measures: fitting ones at p ≥ 0.5, applying ones below.

Medians over the measured steps, after warm-up steps. Each cell is measured ``--repeats`` times,
the two modes alternating, and every per-rank figure is the median over the repeats: other jobs
on a shared machine slow whichever run they overlap, which moves a single run's ratio by up to
±0.05. Results go to stdout as a Markdown table and to ``--json``.

    python benchmarks/torch_distributed.py --json benchmarks/results/torch_distributed_cpu.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kron.torch.functional import state_bytes

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_step import TinyLM, lm_loss  # the model and batches of torch_step.py

MODES = ("replicated", "sharded")


def _worker(rank, world, tmp, mode, probability, warmup, steps) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    from torch.nn.parallel import DistributedDataParallel as DDP

    from kron.torch import Kron
    from kron.torch.distributed import DistributedKron, parameter_cost

    torch.manual_seed(0)
    model = TinyLM()
    ddp = DDP(model)
    cls = Kron if mode == "replicated" else DistributedKron
    opt = cls(model.parameters(), preconditioner_update_probability=probability)

    # Time the local preconditioner compute: every bucket goes through _step_bucket.
    inner = opt._step_bucket
    spent = [0.0]

    def timed(*args, **kwargs):
        started = time.thread_time()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[0] += time.thread_time() - started

    opt._step_bucket = timed

    records = []
    for step in range(warmup + steps):
        opt.zero_grad()
        lm_loss(ddp, step * world + rank).backward()
        dist.barrier()  # every rank enters step() together: wall time is the step's own
        spent[0] = 0.0
        wall, cpu = time.perf_counter(), time.thread_time()
        opt.step()
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        if step >= warmup:
            records.append((1000 * spent[0], 1000 * cpu, 1000 * wall))

    group = opt.param_groups[0]
    layout, _ = opt._options(group)
    costs = [parameter_cost(tuple(p.shape), layout) for p in group["params"]]
    owners = opt.owners if mode == "sharded" else [rank] * len(costs)
    kind = "fit" if probability >= 0.5 else "apply"  # the kind of step the median sees
    parts = [getattr(c, kind) for c in costs]
    share = sum(c for c, o in zip(parts, owners) if o == rank) / sum(parts)
    result = dict(
        rank=rank,
        precond_cpu_ms=statistics.median(r[0] for r in records),
        step_cpu_ms=statistics.median(r[1] for r in records),
        step_wall_ms=statistics.median(r[2] for r in records),
        state_bytes=state_bytes(opt),
        cost_share=share,
    )
    torch.save(result, f"{tmp}/{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def measure(world: int, mode: str, probability: float, warmup: int, steps: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(
            _worker, args=(world, tmp, mode, probability, warmup, steps), nprocs=world, join=True
        )
        return [torch.load(f"{tmp}/{r}.pt") for r in range(world)]


def _median_over_repeats(repeats: list[list[dict]]) -> list[dict]:
    """Per rank, the median of each figure over the repeated runs of one mode."""
    return [
        {key: statistics.median(run[rank][key] for run in repeats) for key in repeats[0][rank]}
        for rank in range(len(repeats[0]))
    ]


def summarise(rows: list[dict]) -> list[dict]:
    """Per (world, probability): each mode's per-rank figures and sharded/replicated ratios
    (the sharded figure is the largest over ranks, the replicated one the median)."""
    runs: dict[tuple, dict[str, list[list[dict]]]] = {}
    for row in rows:
        cell = runs.setdefault((row["world"], row["probability"]), {})
        cell.setdefault(row["mode"], []).append(row["ranks"])
    out = []
    for (world, probability), modes in sorted(runs.items()):
        rep, sh = (_median_over_repeats(modes[mode]) for mode in MODES)

        def med(ranks, key):
            return statistics.median(r[key] for r in ranks)

        def top(ranks, key):
            return max(r[key] for r in ranks)

        out.append(
            dict(
                world=world,
                probability=probability,
                replicated={k: med(rep, k) for k in rep[0] if k != "rank"},
                sharded_max={k: top(sh, k) for k in sh[0] if k != "rank"},
                sharded_min={k: min(r[k] for r in sh) for k in sh[0] if k != "rank"},
                work_ratio=top(sh, "precond_cpu_ms") / med(rep, "precond_cpu_ms"),
                step_cpu_ratio=top(sh, "step_cpu_ms") / med(rep, "step_cpu_ms"),
                state_ratio=top(sh, "state_bytes") / med(rep, "state_bytes"),
                wall_ratio=top(sh, "step_wall_ms") / med(rep, "step_wall_ms"),
            )
        )
    return out


def markdown(summary: list[dict]) -> str:
    lines = [
        "| ranks | p | mode | precond CPU ms/step/rank | step() CPU ms | step() wall ms "
        "| state MiB/rank | cost share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cell in summary:
        w, p = cell["world"], cell["probability"]
        rep, hi, lo = cell["replicated"], cell["sharded_max"], cell["sharded_min"]
        lines.append(
            f"| {w} | {p:g} | replicated (Kron + DDP) | {rep['precond_cpu_ms']:.1f} | "
            f"{rep['step_cpu_ms']:.1f} | {rep['step_wall_ms']:.1f} | "
            f"{rep['state_bytes'] / 2**20:.2f} | 1 |"
        )
        lines.append(
            f"| {w} | {p:g} | sharded (DistributedKron + DDP), min–max over ranks | "
            f"{lo['precond_cpu_ms']:.1f}–{hi['precond_cpu_ms']:.1f} | "
            f"{lo['step_cpu_ms']:.1f}–{hi['step_cpu_ms']:.1f} | "
            f"{lo['step_wall_ms']:.1f}–{hi['step_wall_ms']:.1f} | "
            f"{lo['state_bytes'] / 2**20:.2f}–{hi['state_bytes'] / 2**20:.2f} | "
            f"{lo['cost_share']:.3f}–{hi['cost_share']:.3f} |"
        )
        lines.append(
            f"| {w} | {p:g} | **sharded ÷ replicated** (largest rank) | "
            f"**{cell['work_ratio']:.2f}** | {cell['step_cpu_ratio']:.2f} | "
            f"{cell['wall_ratio']:.2f} | **{cell['state_ratio']:.2f}** | |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--probabilities", nargs="+", type=float, default=[1.0, 0.03])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell and mode")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--markdown-from", default=None, help="print the table of an earlier --json file and exit"
    )
    args = parser.parse_args()
    if args.markdown_from:
        with open(args.markdown_from) as f:
            print(markdown(json.load(f)["summary"]))
        return
    rows = []
    for world in args.worlds:
        for probability in args.probabilities:
            for repeat, mode in itertools.product(range(args.repeats), MODES):
                ranks = measure(world, mode, probability, args.warmup, args.steps)
                rows.append(
                    dict(
                        world=world, probability=probability, mode=mode, repeat=repeat, ranks=ranks
                    )
                )
                print(
                    f"world {world} p {probability:g} {mode} (run {repeat + 1}): "
                    + ", ".join(
                        f"rank {r['rank']} precond {r['precond_cpu_ms']:.1f} ms "
                        f"state {r['state_bytes'] / 2**20:.2f} MiB"
                        for r in ranks
                    ),
                    flush=True,
                )
    summary = summarise(rows)
    print(markdown(summary))
    if args.json:
        meta = dict(
            machine=platform.processor() or platform.machine(),
            cores=os.cpu_count(),
            threads_per_process=1,
            torch=torch.__version__,
            backend="gloo",
            args=vars(args),
        )
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows, summary=summary), f, indent=1)


if __name__ == "__main__":
    main()
