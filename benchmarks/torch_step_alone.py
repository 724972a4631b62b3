"""Step time and page faults of the default ``Kron`` alone in a process.

``torch_step.py`` times every optimizer in one process, where they share the heap; this times
one, so that two versions of the code can be compared in alternating processes, each importing
its own tree:

    git worktree add /tmp/base <commit>
    for i in 1 2 3 4 5 6; do for tree in /tmp/base .; do
        PYTHONPATH=$tree/src:$tree/benchmarks .venv/bin/python benchmarks/torch_step_alone.py mlp 1
    done; done

Prints the tree, the median ms per ``optimizer.step()`` over 5 windows of 20 steps after 10
warm-up steps, and the median minor page faults per step (``resource.getrusage``; forward and
backward included, the same for both trees).
"""

from __future__ import annotations

import argparse
import resource
import statistics

import torch
from torch_step import MODELS, _Run

import kron
from kron.torch import Kron


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=list(MODELS))
    parser.add_argument("probability", type=float)
    args = parser.parse_args()
    torch.manual_seed(0)
    run = _Run(
        args.model,
        lambda ps: Kron(ps, preconditioner_update_probability=args.probability),
        torch.device("cpu"),
    )
    run.steps(10)
    times, faults = [], []
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        times.append(run.steps(20))
        faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
    tree = kron.__file__.split("/src/")[0]
    print(
        f"{tree} {args.model} p={args.probability}: {statistics.median(times):.2f} ms, "
        f"{statistics.median(faults):.0f} page faults per step"
    )


if __name__ == "__main__":
    main()
