"""DistributedKron on FSDP2 (DTensor) parameters: owners precondition full matrices, and a
torch.distributed.checkpoint saved at world size 2 resumes at world sizes 4 and 1."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from kron.torch.distributed import DistributedKron, load_template

from . import _launch
from ._common import fp64_options, local_batch, loss, max_difference, mlp, params_of, reference

SAVE_AT, TOTAL = 6, 12


def _sharded_model(world: int) -> nn.Module:
    mesh = init_device_mesh("cpu", (world,))
    model = mlp()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _train(model, opt, rank, world, steps) -> None:
    for step in steps:
        opt.zero_grad()
        loss(model, *local_batch(step, rank, world)).backward()
        opt.step()


def _full_params(model) -> list[torch.Tensor]:
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def _train_and_save(rank: int, world: int, path: str) -> dict:
    model = _sharded_model(world)
    opt = DistributedKron(model.parameters(), **fp64_options())
    assert all(isinstance(p, DTensor) for p in model.parameters())
    _train(model, opt, rank, world, range(SAVE_AT))
    dcp.save({"model": get_model_state_dict(model), "optim": opt.state_dict()}, checkpoint_id=path)
    _train(model, opt, rank, world, range(SAVE_AT, TOTAL))
    return dict(
        params=_full_params(model),
        local_shapes=[tuple(p.to_local().shape) for p in model.parameters()],
        state_shapes={k: tuple(v["momentum"].shape) for k, v in opt.state_dict()["state"].items()},
        owners=opt.owners,
    )


def _resume(rank: int, world: int, path: str) -> dict:
    model = _sharded_model(world)
    opt = DistributedKron(model.parameters(), **fp64_options())
    state = {"model": get_model_state_dict(model), "optim": load_template(opt, path)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    opt.load_state_dict(state["optim"])
    owned = sorted(int(k) for k in opt.state_dict()["state"])
    _train(model, opt, rank, world, range(SAVE_AT, TOTAL))
    return dict(params=_full_params(model), owned=owned, owners=opt.owners)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dcp") / "checkpoint")
    return path, _launch.run(_train_and_save, 2, path)


def test_fsdp2_training_matches_the_unsharded_run(saved):
    _, results = saved
    model, _ = reference(TOTAL, fp64_options())
    expected = params_of(model)
    for r in results:
        assert max_difference(r["params"], expected) < 1e-12  # float64: rounding only
    # The parameters really were sharded (7 rows of 24 -> 12 + 12; 3 rows -> 2 + 1) ...
    assert results[0]["local_shapes"][0] == (12, 6) and results[1]["local_shapes"][-2] == (1, 24)
    # ... and owners kept full-size state for whole matrices.
    shapes = [tuple(p.shape) for p in mlp().parameters()]
    for rank, r in enumerate(results):
        assert r["state_shapes"] == {
            i: shapes[i] for i, owner in enumerate(r["owners"]) if owner == rank
        }


@pytest.mark.parametrize("world", [4, 1])
def test_checkpoint_from_world_2_resumes_at_another_world_size(saved, world):
    path, uninterrupted = saved
    results = _launch.run(_resume, world, path)
    for rank, r in enumerate(results):
        assert max_difference(r["params"], uninterrupted[0]["params"]) < 1e-12
        # Each rank loaded exactly the state it owns under the new world size.
        assert r["owned"] == [i for i, owner in enumerate(r["owners"]) if owner == rank]
    assert sorted(i for r in results for i in r["owned"]) == list(range(len(results[0]["owners"])))
