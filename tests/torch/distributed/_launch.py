"""Run a function on N CPU processes joined by a gloo process group, and collect what each
returns.

Workers are started with ``torch.multiprocessing.spawn``; each joins through a ``FileStore``
in a fresh temporary directory (no ports, so parallel test runs cannot clash), uses one
thread, and writes its result to a file that the parent reads back. A failure in any worker
fails the call; a hung collective fails after the group's timeout.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Spawned children unpickle worker functions by module name (tests.torch.distributed.<module>);
# pytest's importlib mode does not put the repository root on sys.path, so add it for them.
_ROOT = str(Path(__file__).resolve().parents[3])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

TIMEOUT = timedelta(seconds=120)


def run(fn, world: int, *args):
    """``[fn(rank, world, *args) for rank in range(world)]``, each in its own process within one
    gloo process group. ``fn`` must be a module-level function; results must be picklable."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(world, tmp, fn, args), nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=False) for r in range(world)]


def _entry(rank: int, world: int, tmp: str, fn, args) -> None:
    # A worker killed by a signal (an abort inside gloo, say) prints its Python stacks first.
    faulthandler.enable(all_threads=True)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(tmp, 'store')}",
        rank=rank,
        world_size=world,
        timeout=TIMEOUT,
    )
    try:
        result = fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(tmp, f"{rank}.pt"))
    # Leave without interpreter finalisation, where about one worker exit in 40 aborted with
    # "terminate called without an active exception" and no Python frame (2 of 80 runs of
    # test_sharded's world-2 worker): gloo's threads releasing tensors while the interpreter is
    # torn down, as pytorch/pytorch#179291 describes. The result is saved; nothing is left to run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
