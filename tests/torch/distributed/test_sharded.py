"""DistributedKron on replicated parameters: the same result as single-process Kron, with each
rank holding only the state of the parameters it owns."""

from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from kron.torch.distributed import DistributedKron
from kron.torch.functional import state_bytes

from . import _launch
from ._common import (
    fp64_options,
    global_batch,
    local_batch,
    loss,
    max_difference,
    mlp,
    params_of,
    reference,
)

STEPS = 20


def _sharded_worker(rank: int, world: int) -> dict:
    """Three runs: DDP + DistributedKron (different data per rank); every rank on the same global
    batch (no averaging, so the result must equal single-process Kron bit for bit); and (at
    world size 2) without DDP, with reduce_grads=True."""
    out = {}
    model = mlp()
    ddp = DDP(model)
    opt = DistributedKron(model.parameters(), **fp64_options())
    for step in range(STEPS):
        opt.zero_grad()
        loss(ddp, *local_batch(step, rank, world)).backward()
        opt.step()
    owned = sorted(int(k) for k in opt.state_dict()["state"])
    out["ddp"] = dict(
        params=params_of(model),
        state_bytes=state_bytes(opt),
        owners=opt.owners,
        owned_positions=owned,
        state_keys=sorted(len(s) for s in opt.state.values()),
    )

    model = mlp()
    opt = DistributedKron(model.parameters(), **fp64_options())
    for step in range(STEPS):
        opt.zero_grad()
        loss(model, *global_batch(step)).backward()
        opt.step()
    out["same_grads"] = params_of(model)

    if world == 2:  # the gradient reduction does not depend on the world size; save time
        model = mlp()
        opt = DistributedKron(model.parameters(), reduce_grads=True, **fp64_options())
        for step in range(STEPS):
            opt.zero_grad()
            loss(model, *local_batch(step, rank, world)).backward()
            opt.step()
        out["reduce_grads"] = params_of(model)
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_mode_matches_single_process_kron_and_splits_the_state(world):
    results = _launch.run(_sharded_worker, world)
    model, single = reference(STEPS, fp64_options())
    expected = params_of(model)

    for r in results:
        # Different data per rank, gradients averaged by DDP: equal up to summation order.
        assert max_difference(r["ddp"]["params"], expected) < 1e-6
        if world == 2:
            assert max_difference(r["reduce_grads"], expected) < 1e-6
        # Identical gradients on every rank: each owner reproduces single-process Kron exactly
        # (same noise words: seed, step, group, index of the parameter in its group).
        assert all(torch.equal(a, b) for a, b in zip(r["same_grads"], expected))
    # Every rank ends with the same parameters, bit for bit.
    for r in results[1:]:
        assert all(
            torch.equal(a, b) for a, b in zip(r["ddp"]["params"], results[0]["ddp"]["params"])
        )

    owners = results[0]["ddp"]["owners"]
    assert all(r["ddp"]["owners"] == owners for r in results)
    assert len(set(owners)) == world  # every rank owns something on this model
    for rank, r in enumerate(results):
        # A rank holds state for exactly the parameters it owns; nothing for the others.
        assert r["ddp"]["owned_positions"] == [i for i, o in enumerate(owners) if o == rank]
    per_rank = [r["ddp"]["state_bytes"] for r in results]
    single_bytes = state_bytes(single)
    assert sum(per_rank) == single_bytes
    assert max(per_rank) < single_bytes


def _layout_edit_worker(rank: int, world: int) -> dict:
    """Two steps, then a layout option edited into the group: the next step must be refused on
    every rank before anything moves, and, once the edit is undone, run on every rank."""
    model = mlp()
    opt = DistributedKron(model.parameters(), **fp64_options())
    for step in range(2):
        opt.zero_grad()
        loss(model, *global_batch(step)).backward()
        opt.step()
    before = params_of(model)
    opt.zero_grad()
    loss(model, *global_batch(2)).backward()
    opt.param_groups[0]["max_size_triangular"] = 10  # the 24-wide axes would turn diagonal
    try:
        opt.step()
        refused = None
    except ValueError as error:
        refused = str(error)
    unchanged = max_difference(params_of(model), before) == 0.0
    opt.param_groups[0]["max_size_triangular"] = 8192
    opt.step()
    return dict(refused=refused, unchanged=unchanged, after=params_of(model))


def test_a_layout_edit_is_refused_on_every_rank_before_anything_moves():
    """Only a parameter's owner holds its factors, so only the owner can see that they no
    longer fit the layout; the ranks agree before the step's collectives start, so none is
    left waiting for a rank that raised, and the retried step stays in step across ranks."""
    results = _launch.run(_layout_edit_worker, 2)
    assert all(r["refused"] is not None for r in results)
    assert any("parameter" in r["refused"] and "of group 0" in r["refused"] for r in results)
    assert all(r["unchanged"] for r in results)
    assert max_difference(results[0]["after"], results[1]["after"]) == 0.0
