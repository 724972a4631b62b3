"""What the in-place momentum and the in-place update clip save on the PyTorch CPU.

For each model this runs three copies of ``Kron(params, preconditioner_update_probability=p)``
in one process, on the same batches: as shipped, with the momentum updated out of place, and with
the update clip applied out of place. Windows of ``optimizer.step()`` are interleaved across the
three, so load changes on a shared machine reach all of them alike; the script prints the median
ms per step of each and whether its parameters are bit-identical to the first variant's.

    python benchmarks/torch_temporaries.py --models mlp lm --probability 1e-4
    python benchmarks/torch_temporaries.py --variants shipped "momentum out of place"
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from torch_step import MODELS, _Run

import kron.torch.bucket_step as bucket_step
from kron.torch import Kron

_shipped_kron_step = bucket_step.kron_step
_shipped_clipper = bucket_step.clipper


def _kron_step_without_donation(*args, donate_momentum=False, **kwargs):
    return _shipped_kron_step(*args, **kwargs)


class MomentumOutOfPlace(Kron):
    """Steps with whatever ``bucket_step.kron_step`` is while it runs: the variant installs
    :func:`_kron_step_without_donation` there, so the bucket step takes it for the eager step
    (the same step counts as a number, the same weights) and only the momentum's donation is
    dropped. A wrapper returned from here alone would also count the steps as a compiled step
    does, in float32 tensors, and so not be bit-identical."""

    def _compiled_step(self, *key):
        return bucket_step.kron_step


def _out_of_place_clipper(spec, threshold, in_place=False, read_norms=False):
    return _shipped_clipper(spec, threshold)


def variants(p: float) -> dict[str, tuple[Callable, Callable, Callable]]:
    """``{name: (optimizer factory, clipper, kron_step to install while it steps)}``."""
    return {
        "shipped": (
            lambda ps: Kron(ps, preconditioner_update_probability=p),
            _shipped_clipper,
            _shipped_kron_step,
        ),
        "momentum out of place": (
            lambda ps: MomentumOutOfPlace(ps, preconditioner_update_probability=p),
            _shipped_clipper,
            _kron_step_without_donation,
        ),
        "clip out of place": (
            lambda ps: Kron(ps, preconditioner_update_probability=p),
            _out_of_place_clipper,
            _shipped_kron_step,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--probability", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--steps", type=int, default=34)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument(
        "--variants", nargs="+", default=None, help="which of the three to run (default: all)"
    )
    args = parser.parse_args()
    for model in args.models:
        runs = {
            name: (_Run(model, make, torch.device("cpu")), clip, step)
            for name, (make, clip, step) in variants(args.probability).items()
            if args.variants is None or name in args.variants
        }
        windows: dict[str, list[float]] = {name: [] for name in runs}
        for repeat in range(args.repeats + 1):
            for name, (run, clip, step) in runs.items():
                bucket_step.clipper, bucket_step.kron_step = clip, step
                ms = run.steps(args.warmup if repeat == 0 else args.steps)
                if repeat:
                    windows[name].append(ms)
        bucket_step.clipper, bucket_step.kron_step = _shipped_clipper, _shipped_kron_step
        reference = list(next(iter(runs.values()))[0].model.parameters())
        for name, (run, _, _) in runs.items():
            same = all(torch.equal(a, b) for a, b in zip(run.model.parameters(), reference))
            print(
                f"{model} p={args.probability:g} {name}: "
                f"{statistics.median(windows[name]):.2f} ms/step, bit-identical: {same}"
            )


if __name__ == "__main__":
    main()
