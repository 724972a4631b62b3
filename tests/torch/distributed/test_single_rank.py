"""DistributedKron and the checkpoint helpers in a process group of one (in this process): bad
input, non-finite gradients, and state dicts moving between Kron and DistributedKron."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, distribute_tensor

from kron.torch import Kron
from kron.torch.distributed import DistributedKron, load_template

from ._common import fp64_options, global_batch, loss, mlp, params_of, reference


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def test_unsupported_options_and_parameters_are_rejected(world_of_one):
    params = [torch.nn.Parameter(torch.zeros(3, 3))]
    with pytest.raises(ValueError, match="does not support preconditioner_type='newton'"):
        DistributedKron(params, preconditioner_type="newton")
    with pytest.raises(ValueError, match="reduce_grads must be True or False; got 'yes'"):
        DistributedKron(params, reduce_grads="yes")
    complex_params = [torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.complex64))]
    with pytest.raises(ValueError, match=r"complex parameters \(parameter 0 of group 0, torch"):
        DistributedKron(complex_params)
    opt = DistributedKron(params)
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        opt.owner(torch.zeros(1))
    replicated = torch.nn.Parameter(
        distribute_tensor(torch.zeros(4, 4), init_device_mesh("cpu", (1,)), [Replicate()])
    )
    with pytest.raises(ValueError, match=r"one Shard\(dim\) placement .* \(Replicate\(\),\)"):
        DistributedKron([replicated])
    with pytest.raises(ValueError, match="newton"):  # a rejected group leaves nothing behind
        opt.add_param_group(
            {"params": [torch.nn.Parameter(torch.ones(2))], "preconditioner_type": "newton"}
        )
    assert len(opt.param_groups) == 1 and len(opt.owners) == 1


def test_nonfinite_gradients_are_skipped_or_raise(world_of_one):
    model = mlp()
    opt = DistributedKron(model.parameters(), **fp64_options())
    loss(model, *global_batch(0)).backward()
    opt.step()
    before = params_of(model)
    first = next(model.parameters())
    first.grad[0, 0] = float("nan")
    opt.step()
    after = params_of(model)
    assert torch.equal(before[0], after[0]) and not torch.equal(before[1], after[1])
    assert int(opt.state[first]["skipped"]) == 1
    strict = DistributedKron(model.parameters(), nonfinite="raise")
    with pytest.raises(FloatingPointError, match="parameter 0 of group 0"):
        strict.step()


def test_kron_state_moves_to_distributed_kron_and_through_dcp(world_of_one, tmp_path):
    """The seed travels with the state (the optimizers loading it are made with the default
    seed): ``load_template`` used to leave it out, and the resumed run drew other noise."""
    uninterrupted, _ = reference(8, fp64_options(seed=7))
    # Kron for 4 steps, its state_dict into DistributedKron, 2 steps, DCP save ...
    model, kron = reference(4, fp64_options(seed=7))
    opt = DistributedKron(model.parameters(), **fp64_options())
    opt.load_state_dict(kron.state_dict())
    reference(2, fp64_options(), first=4, model=model, opt=opt)
    path = str(tmp_path / "checkpoint")
    dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=path)
    # ... loaded by a plain Kron, which takes the whole state, and 2 more steps.
    fresh = mlp()
    kron = Kron(fresh.parameters(), **fp64_options())
    state = {"model": fresh.state_dict(), "optim": load_template(kron, path)}
    dcp.load(state, checkpoint_id=path)
    fresh.load_state_dict(state["model"])
    kron.load_state_dict(state["optim"])
    reference(2, fp64_options(), first=6, model=fresh, opt=kron)
    assert all(torch.equal(a, b) for a, b in zip(params_of(fresh), params_of(uninterrupted)))

    with pytest.raises(
        ValueError, match=r"no optimizer state under key 'opt'.*\['model', 'optim'\]"
    ):
        load_template(kron, path, key="opt")
    with pytest.raises(ValueError, match="needs a checkpoint_id or a storage_reader"):
        load_template(kron)


def test_empty_parameters_are_skipped_as_kron_skips_them(world_of_one):
    """A (0, 4) parameter gets no owner's work, no state and no step, and a group holding only
    empty parameters keeps its clock, as in Kron (it used to raise while assigning owners)."""
    weight, empty = torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.zeros(0, 4))
    opt = DistributedKron([{"params": [weight, empty]}, {"params": [torch.nn.Parameter(empty)]}])
    # A group with no parameters at all (a decay / no-decay split of a model without biases),
    # as Kron and torch.optim take it: it used to fail assigning owners, and stayed added.
    opt.add_param_group({"params": [], "weight_decay": 0.0})
    assert len(opt.param_groups) == 3
    single = Kron([torch.nn.Parameter(weight.detach().clone())])
    for p in (weight, empty, opt.param_groups[1]["params"][0]):
        p.grad = torch.ones_like(p)
    single.param_groups[0]["params"][0].grad = torch.ones(3, 3)
    opt.step()
    single.step()
    assert empty not in opt.state and empty.shape == (0, 4)
    assert [g["step"] for g in opt.param_groups] == [1, 0, 0]
    assert torch.equal(weight, single.param_groups[0]["params"][0])


def test_loading_a_state_dict_that_lacks_an_owned_parameter_warns(world_of_one):
    """One rank's state_dict() holds only that rank's parameters; loaded everywhere, the other
    ranks' parameters would start fresh without a word. A frozen parameter has no state either,
    and is not warned about."""
    import warnings

    model, kron = reference(2, fp64_options())
    saved = kron.state_dict()
    opt = DistributedKron(model.parameters(), **fp64_options())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.load_state_dict(saved)  # complete: silent
    partial = {**saved, "state": {k: v for k, v in saved["state"].items() if k != 1}}
    with pytest.warns(UserWarning, match="Rank 0 owns parameter 1 of group 0, for which"):
        opt.load_state_dict(partial)
    next(p for i, p in enumerate(model.parameters()) if i == 1).requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.load_state_dict(partial)


def test_a_copy_is_refused_with_the_way_to_carry_the_state(world_of_one):
    """A deep copy (or pickle) lost the ownership tables and failed on its first step with an
    AttributeError."""
    import copy
    import pickle

    opt = DistributedKron([torch.nn.Parameter(torch.randn(3, 3))])
    for duplicate in (copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match=r"cannot be copied or pickled.*state_dict"):
            duplicate(opt)
