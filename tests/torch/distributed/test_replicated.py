"""Plain Kron under DDP: replicas stay bit-identical without communicating, and ``resync``
restores them from rank 0 when they were made to differ."""

from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from kron.torch import Kron
from kron.torch.distributed import DistributedKron

from . import _launch
from ._common import digest, local_batch, loss, mlp

STEPS = 30
RESYNC = 4


def _digests(model, opt) -> dict[str, str]:
    params = list(model.parameters())
    states = [opt.state[p] for p in params]
    return dict(
        params=digest(params),
        Q=digest([f for s in states for f in s["factors"]]),
        L=digest([f for s in states for f in s["lipschitz"]]),
        cache=digest([f for s in states for f in s["cache"]]),
        momentum=digest([s["momentum"] for s in states]),
    )


def _replicated_worker(rank: int, world: int) -> dict:
    dtype = torch.float32
    model = mlp(dtype)
    torch.manual_seed(100 + rank)  # the global RNG differs per rank; Kron must not read it
    ddp = DDP(model)
    # Every random decision in play: drawn fit decisions, balancing, bf16 stochastic rounding,
    # the init scale from the (averaged) first gradient, the cache switch at p < 0.5.
    opt = Kron(
        model.parameters(),
        lr=0.01,
        preconditioner_update_probability=lambda step: 1.0 if step < 10 else 0.4,
        stochastic_schedule=True,
        balance_probability=0.5,
        mu_dtype=torch.bfloat16,
        precond_init_scale=None,
    )
    fits = []
    for step in range(STEPS):
        torch.rand(rank + 1)  # and is consumed differently per rank
        opt.zero_grad()
        loss(ddp, *local_batch(step, rank, world, dtype)).backward()
        before = [s["factors"][0].clone() for s in opt.state.values()]
        opt.step()
        fits.append(
            any(not torch.equal(b, s["factors"][0]) for b, s in zip(before, opt.state.values()))
        )
    out = {"ddp": _digests(model, opt), "fits": fits}

    model = mlp(dtype)
    ddp = DDP(model)
    opt = Kron(model.parameters(), lr=0.01, resync=RESYNC)
    trace = []
    for step in range(2 * RESYNC):
        if rank == 1 and step in (2, RESYNC + 1):  # rank 1 drifts (here: a lot) after a step
            for state in opt.state.values():
                state["factors"][0].mul_(1.01)
                state["momentum"].add_(1e-3)
        opt.zero_grad()
        loss(ddp, *local_batch(step, rank, world, dtype)).backward()
        opt.step()
        trace.append(_digests(model, opt))
    out["resync"] = trace
    return out


@pytest.fixture(scope="module")
def replicated():
    return _launch.run(_replicated_worker, 2)


def test_ddp_replicas_stay_bit_identical_for_30_steps(replicated):
    first, second = (r["ddp"] for r in replicated)
    assert first == second  # params, Q, L, cache and momentum
    fits = replicated[0]["fits"]
    assert any(fits) and not all(fits)  # the drawn schedule both fitted and skipped


def test_resync_restores_rank_0_state_at_the_resync_step(replicated):
    first, second = (r["resync"] for r in replicated)
    # Steps are counted from 1: the state after step k is trace[k - 1].
    assert first[1] == second[1]  # before the drift
    # Rank 1's Q and momentum were changed after step 2 and after step RESYNC + 1: the
    # replicas differ until the next multiple of RESYNC, where rank 0's state is restored.
    for step, (a, b) in enumerate(zip(first, second), start=1):
        drifted = 3 <= step < RESYNC or RESYNC + 2 <= step < 2 * RESYNC
        for key in ("params", "Q", "momentum"):
            assert (a[key] != b[key]) == drifted, (step, key)
    assert first[RESYNC - 1] == second[RESYNC - 1]
    assert first[2 * RESYNC - 1] == second[2 * RESYNC - 1]


def test_resync_and_distributed_kron_need_a_process_group():
    params = [torch.nn.Parameter(torch.zeros(3, 3))]
    with pytest.raises(ValueError, match="init_process_group"):
        Kron(params, resync=10)
    with pytest.raises(ValueError, match="init_process_group"):
        DistributedKron(params)
    Kron(params, resync=0)  # 0 and None mean never: no process group needed
    for bad in (-1, 2.5, True, "10"):
        with pytest.raises(ValueError, match="resync must be a non-negative int"):
            Kron(params, resync=bad)
