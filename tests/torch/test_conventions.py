"""Kron behaves as a torch.optim.Optimizer: groups, schedulers, checkpoints, dtypes, bad input."""

from __future__ import annotations

import copy
import inspect
import io
import math

import pytest
import torch
from torch import nn

import kron.torch.bucket_step as bucket_step
from kron.torch import Kron

from ._compiled_step import run_training_step
from ._device_path import EVERY_STEP_BRANCH


def make_model(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    ).to(dtype)


TEACHER = torch.randn(8, 3, generator=torch.Generator().manual_seed(42))


def batch(step: int, dtype=torch.float32):
    """Inputs and the labels a fixed linear teacher gives them, so there is something to learn."""
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(step))
    return x.to(dtype), (x @ TEACHER).argmax(1)


def train(model, opt, steps, start=0, scheduler=None):
    losses = []
    for step in range(start, start + steps):
        x, y = batch(step, next(model.parameters()).dtype)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def test_resume_is_bit_for_bit_through_weights_only_load():
    options = dict(
        lr=1e-2,
        preconditioner_update_probability=0.3,
        stochastic_schedule=True,
        precond_init_scale=None,
        mars=True,
        caution=True,
    )
    straight = make_model()
    opt = Kron(straight.parameters(), **options)
    train(straight, opt, 12)

    first = make_model()
    opt1 = Kron(first.parameters(), **options)
    train(first, opt1, 5)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make_model(seed=123)
    resumed.load_state_dict(saved["model"])
    opt2 = Kron(resumed.parameters(), **options)
    opt2.load_state_dict(saved["optim"])
    train(resumed, opt2, 7, start=5)
    for a, b in zip(snapshot(resumed), snapshot(straight)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_resumed_run_keeps_its_seed_whatever_the_new_optimizer_was_given():
    """The noise of a fit is drawn from (seed, step, ...), so the seed travels with the state:
    resuming into an optimizer made with another seed continues the saved run exactly."""
    options = dict(lr=1e-2, preconditioner_update_probability=0.5, seed=5)
    straight = make_model()
    train(straight, Kron(straight.parameters(), **options), 8)
    first = make_model()
    opt1 = Kron(first.parameters(), **options)
    train(first, opt1, 4)
    buffer = io.BytesIO()
    torch.save(opt1.state_dict(), buffer)
    buffer.seek(0)
    resumed = copy.deepcopy(first)
    opt2 = Kron(resumed.parameters(), **{**options, "seed": 0})
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    assert opt2.seed == 5
    train(resumed, opt2, 4, start=4)
    for a, b in zip(snapshot(resumed), snapshot(straight)):
        assert torch.equal(a, b)


def test_numpy_numbers_as_options_keep_the_checkpoint_readable_with_weights_only():
    """Values from a NumPy sweep are stored as Python numbers (``torch.load(weights_only=True)``
    refuses NumPy scalars), with the same run as the Python numbers give."""
    import numpy as np

    runs = []
    for number in (np.float32, float):
        model = make_model()
        opt = Kron(model.parameters(), lr=number(1e-2), b1=number(0.5))
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "weight_decay": number(0.1)})
        train(model, opt, 3)
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        assert type(saved["param_groups"][0]["lr"]) is float
        runs.append(snapshot(model))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_another_optimizers_state_dict_is_refused_by_name():
    """Adam's state (or kron_torch's) would load and fail on the first step with a KeyError;
    it is refused at once, naming the parameter and pointing to the kron_torch converter."""
    model = make_model()
    adam = torch.optim.Adam(model.parameters())
    train(model, adam, 1)
    opt = Kron(model.parameters())
    with pytest.raises(
        ValueError, match=r"parameter 0 of group 0 has keys .*exp_avg.*load_kron_torch_state"
    ):
        opt.load_state_dict(adam.state_dict())
    assert opt.state_dict()["state"] == {}


def test_a_state_dict_with_more_param_groups_is_refused():
    """The saved groups were zipped with the current ones, so a third saved group was dropped
    without a word and its state left behind under integer keys (torch's Adam raises)."""
    weights = [torch.nn.Parameter(torch.randn(3, 3)) for _ in range(3)]
    saved = Kron([{"params": [w]} for w in weights])
    for w in weights:
        w.grad = torch.randn(3, 3)
    saved.step()
    opt = Kron([{"params": [w]} for w in weights[:2]])
    with pytest.raises(ValueError, match="has 3 parameter groups; this optimizer has 2"):
        opt.load_state_dict(saved.state_dict())
    assert opt.state_dict()["state"] == {}


def _edited(edit):
    """A state dict after two steps of ``make_model``'s parameters, edited by ``edit``."""
    model = make_model()
    opt = Kron(model.parameters(), lr=1e-2)
    train(model, opt, 2)
    saved = copy.deepcopy(opt.state_dict())
    edit(saved)
    return saved


def _set(entry, key, value):
    return lambda saved: saved["state"][entry].update({key: value})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda saved: saved["param_groups"][0].update(lr="x"),
            r"loaded state dict, param group 0: lr must be a number; got 'x'",
        ),
        (
            lambda saved: saved["param_groups"][0].update(b1=1.5),
            r"param group 0: Invalid b1: 1.5",
        ),
        (
            lambda saved: saved["param_groups"][0].update(merge_dims=2),
            r"param group 0: Unknown merge_dims 2",
        ),
        (
            lambda saved: saved["param_groups"][0].update(step=2.5),
            r"param group 0: step must be an int >= 0; got 2.5",
        ),
        (
            lambda saved: saved["param_groups"][0].update(params=[0, 1]),
            r"has 2 parameters in group 0; this optimizer has 6",
        ),
        (
            lambda saved: saved["state"][1].pop("lipschitz"),
            r"parameter 1 of group 0 lacks lipschitz; a kron.torch state holds factors, "
            r"lipschitz, cache, momentum, count, skipped",
        ),
        (
            _set(0, "momentum", torch.zeros(8, 16)),
            r"parameter 0 of group 0 has momentum of shape \(8, 16\), but the parameter has "
            r"shape \(16, 8\): the state was saved for another parameter",
        ),
        (
            _set(0, "factors", [torch.ones(1, 8, 8), torch.ones(1, 16, 16)]),
            r"parameter 0 of group 0 has factors of shapes \[\(1, 8, 8\), \(1, 16, 16\)\], not "
            r"the layout .* shape \(16, 8\): \[\(1, 16, 16\) or \(1, 136\), \(1, 8, 8\) or "
            r"\(1, 36\)\]",
        ),
        (
            _set(1, "lipschitz", [torch.zeros(1), torch.zeros(1)]),
            r"parameter 1 of group 0 has lipschitz of shapes \[\(1,\), \(1,\)\]",
        ),
        (_set(2, "cache", [torch.ones(1, 3, 3)] * 2), r"parameter 2 of group 0 has cache"),
        (
            _set(2, "factors", torch.ones(1, 16, 16)),
            r"has factors of Tensor; accepted: a list of tensors",
        ),
        (_set(3, "count", torch.ones(1)), r"parameter 3 of group 0 has count of shape \(1,\)"),
        (
            _set(3, "count", torch.tensor(2)),
            r"has count of torch.int64; accepted: a floating-point tensor",
        ),
        (_set(3, "skipped", 0), r"has skipped of int; accepted: a real tensor"),
        (lambda saved: saved.update(seed="x"), r"loaded state dict has seed 'x'; accepted: an int"),
        (lambda saved: saved.update(seed=1.5), r"loaded state dict has seed 1.5; accepted: an int"),
    ],
    ids=[
        "lr",
        "b1",
        "merge_dims",
        "step",
        "group-size",
        "missing-key",
        "momentum-shape",
        "factor-shapes",
        "lipschitz-count",
        "cache-shapes",
        "factors-not-a-list",
        "count-shape",
        "count-dtype",
        "skipped-not-a-tensor",
        "seed-string",
        "seed-fraction",
    ],
)
def test_a_state_dict_the_step_could_not_take_is_refused_before_anything_loads(edit, message):
    """Saved groups and state used to load unchecked and fail at the next step (a TypeError
    for lr='x', a KeyError for a missing entry, a broadcast error for a momentum of another
    shape), or a seed of 1.5 was cut to 1; each is refused by name, and the optimizer keeps
    what it had."""
    model = make_model()
    opt = Kron(model.parameters(), lr=1e-2, seed=3)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(_edited(edit))
    assert opt.state_dict()["state"] == {} and opt.seed == 3
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[0]["step"] == 0


def test_the_state_of_another_shape_of_parameter_is_named_by_its_shape():
    """Loading into a model whose parameter has another shape blamed changed layout options,
    at the first step; the load now names the parameter and both shapes."""
    saved = _edited(lambda saved: None)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)
    )
    opt = Kron(model.parameters(), lr=1e-2)
    with pytest.raises(
        ValueError,
        match=r"parameter 2 of group 0 has momentum of shape \(16, 16\), but the parameter has "
        r"shape \(12, 16\)",
    ):
        opt.load_state_dict(saved)
    assert opt.state_dict()["state"] == {}


def test_newton_groups_of_different_hvp_methods_are_refused_at_load():
    a, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2, 2))
    saved = Kron([{"params": [a]}, {"params": [b]}], preconditioner_type="newton").state_dict()
    saved["param_groups"][1]["hvp_method"] = "finite_difference"
    opt = Kron([{"params": [a]}, {"params": [b]}], preconditioner_type="newton")
    with pytest.raises(ValueError, match=r"loaded state dict: .*one hvp_method"):
        opt.load_state_dict(saved)
    assert opt.param_groups[1]["hvp_method"] == "double_backward"


def test_a_seed_saved_outside_64_bits_resumes_as_the_seed_it_drew_with():
    """Seeds were not range-checked before, and the draws mask them to 64 bits: a checkpoint
    saved with seed -1 loads as 2**64 - 1, which draws the same numbers."""
    from kron.torch.functional import seed_for

    opt = Kron(make_model().parameters())
    opt.load_state_dict(_edited(lambda saved: saved.update(seed=-1)))
    assert opt.seed == 2**64 - 1 and seed_for(-1, 5, 0) == seed_for(opt.seed, 5, 0)
    opt.load_state_dict(_edited(lambda saved: saved.update(seed=2**64 + 7)))
    assert opt.seed == 7


def test_group_values_earlier_versions_saved_load_in_their_current_form():
    """merge_dims 0 or 1 (taken, and run as False and True, before bools were required) and a
    NumPy integer step count (which the draws' seeding cannot take) load as a bool and an int."""
    import numpy as np

    def edit(saved):
        saved["param_groups"][0].update(merge_dims=1, step=np.int64(3))

    model = make_model()
    opt = Kron(model.parameters())
    opt.load_state_dict(_edited(edit))
    group = opt.param_groups[0]
    assert group["merge_dims"] is True and type(group["step"]) is int and group["step"] == 3
    train(model, opt, 1, start=3)
    assert group["step"] == 4


def test_a_bucket_of_loaded_lines_and_new_squares_steps():
    """A checkpoint's triangles as lines, loaded into a group whose store_triu_as_line is now
    off (the saved group edited), next to a same-shape parameter with no state yet (square
    factors): the bucket stacks both forms, and the loaded parameter steps as where the lines
    are kept."""

    def run(store_triu_as_line):
        torch.manual_seed(0)
        a, b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4, 4))
        saver = Kron([a, b], preconditioner_mode="EQ", store_triu_as_line=True)
        a.grad = torch.randn(4, 4)
        saver.step()  # b has no gradient: no state
        saved = saver.state_dict()
        saved["param_groups"][0]["store_triu_as_line"] = store_triu_as_line
        opt = Kron([a, b], preconditioner_mode="EQ")
        opt.load_state_dict(saved)
        a.grad, b.grad = torch.ones(4, 4), torch.ones(4, 4)
        opt.step()
        return a.detach().clone()

    torch.testing.assert_close(run(False), run(True), rtol=0, atol=0)


def test_a_heavyball_class_pickled_before_it_kept_split_adds_groups():
    """Instances pickled before the classes kept the constructor's split (their defaults hold
    it) still take a new group that sets split or merge_dims."""
    from kron.torch import ForeachPSGDKron

    opt = ForeachPSGDKron([nn.Parameter(torch.ones(3, 3))], split=True, merge_dims=True)
    del opt._split
    opt.add_param_group({"params": [nn.Parameter(torch.ones(2, 2))], "merge_dims": True})
    assert opt.param_groups[1]["split"] is True


def test_a_state_dict_with_the_empty_entry_of_a_read_state_loads():
    """Reading ``opt.state[p]`` (monitoring code, a frozen parameter) leaves ``{}``, which
    ``state_dict()`` saves; loading it was refused as "not a kron.torch state"."""
    model = make_model()
    opt = Kron(model.parameters(), lr=1e-2)
    frozen = next(model.parameters()).requires_grad_(False)
    train(model, opt, 2)
    assert opt.state[frozen].get("skipped", 0) == 0 and opt.state[frozen] == {}
    saved = opt.state_dict()
    resumed_model = make_model()
    resumed_model.load_state_dict(model.state_dict())
    next(resumed_model.parameters()).requires_grad_(False)
    resumed = Kron(resumed_model.parameters(), lr=1e-2)
    resumed.load_state_dict(saved)
    train(model, opt, 2, start=2)
    train(resumed_model, resumed, 2, start=2)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model), snapshot(resumed_model)))


def test_checkpoint_hooks_run_as_torch_runs_them():
    """A load pre-hook's dict is the one loaded, a load post-hook's edits of the state stay,
    and a state-dict post-hook sees the finished dict (seed included); the state used to be
    rebuilt from the caller's dict after the hooks had run."""
    model = make_model()
    opt = Kron(model.parameters(), lr=1e-2)
    train(model, opt, 2)
    saved = opt.state_dict()

    def zero_momenta(optimizer, state_dict):
        state = {
            k: {**v, "momentum": torch.zeros_like(v["momentum"])}
            for k, v in state_dict["state"].items()
        }
        return {**state_dict, "state": state}

    def halve_factors(optimizer):
        for state in optimizer.state.values():
            state["factors"] = [f / 2 for f in state["factors"]]

    fresh = Kron(make_model().parameters(), lr=1e-2)
    fresh.register_load_state_dict_pre_hook(zero_momenta)
    fresh.register_load_state_dict_post_hook(halve_factors)
    fresh.load_state_dict(saved)
    for index, p in enumerate(p for g in fresh.param_groups for p in g["params"]):
        assert not fresh.state[p]["momentum"].any()
        for mine, theirs in zip(fresh.state[p]["factors"], saved["state"][index]["factors"]):
            assert torch.equal(mine, theirs / 2)
    seen = []
    opt.register_state_dict_post_hook(lambda optimizer, state: seen.append(state["seed"]))
    opt.state_dict()
    assert seen == [opt.seed]


def test_stepping_after_load_state_dict_leaves_the_loaded_dict_untouched():
    """The optimizer updates its state in place, so ``load_state_dict`` copies what it is given:
    after ``load_state_dict(saved)`` every step leaves ``saved`` as it was (``torch.optim.Adam``
    would update the loaded tensors)."""
    first = make_model()
    opt1 = Kron(first.parameters(), lr=1e-2, preconditioner_update_probability=0.5)
    train(first, opt1, 3)
    saved = opt1.state_dict()
    before = copy.deepcopy(saved)
    second = make_model()
    opt2 = Kron(second.parameters(), lr=1e-2, preconditioner_update_probability=0.5)
    opt2.load_state_dict(saved)
    train(second, opt2, 4, start=3)
    for index, state in before["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(saved["state"][index][key], value), (index, key)
            elif isinstance(value, list):
                for a, b in zip(saved["state"][index][key], value):
                    assert torch.equal(a, b), (index, key)


def test_callable_schedule_survives_state_dict_round_trip():
    model = make_model()
    schedule = lambda step: 0.5  # noqa: E731
    opt = Kron(model.parameters(), preconditioner_update_probability=schedule)
    train(model, opt, 2)
    state = opt.state_dict()
    assert "preconditioner_update_probability" not in state["param_groups"][0]
    opt.load_state_dict(state)
    assert opt.param_groups[0]["preconditioner_update_probability"] is schedule
    assert opt.param_groups[0]["step"] == 2


def test_param_group_overrides():
    model = make_model()
    first, second = (
        list(model[0].parameters()),
        list(model[2].parameters()) + list(model[4].parameters()),
    )
    frozen = [p.detach().clone() for p in second]
    opt = Kron(
        [
            {"params": first, "preconditioner_mode": "EQ"},
            {"params": second, "lr": 0.0, "preconditioner_mode": "QUAD"},
        ],
        lr=1e-2,
    )
    train(model, opt, 3)
    weight = model[0].weight  # (16, 8): the 8-axis is dense
    dense = [f for f in opt.state[weight]["factors"] if f.ndim == 3]
    assert dense and all(torch.equal(f, f.triu()) for f in dense)  # EQ: triangular
    quad = [f for f in opt.state[model[2].weight]["factors"] if f.ndim == 3]
    assert all(torch.equal(f, f.transpose(-1, -2)) for f in quad)  # QUAD: symmetric
    assert not torch.equal(quad[0], torch.eye(16).expand_as(quad[0]))  # it was fitted
    for p, before in zip(second, frozen):
        torch.testing.assert_close(p.detach(), before, rtol=0, atol=0)  # lr 0 in that group


def test_lr_scheduler_scales_the_step():
    def first_step_change(factor):
        model = make_model()
        opt = Kron(model.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: factor)
        before = snapshot(model)
        train(model, opt, 1)
        assert scheduler.get_last_lr() == [1e-2 * factor]
        return [a - b for a, b in zip(snapshot(model), before)]

    full, half = first_step_change(1.0), first_step_change(0.5)
    for a, b in zip(full, half):
        torch.testing.assert_close(b, 0.5 * a)


def test_bf16_params_keep_fp32_preconditioner_through_a_checkpoint():
    model = make_model(dtype=torch.bfloat16)
    options = dict(lr=3e-2, mu_dtype=torch.bfloat16, precond_dtype=torch.float32)
    opt = Kron(model.parameters(), **options)
    losses = train(model, opt, 20)
    weight = model[2].weight
    assert weight.dtype == torch.bfloat16
    assert all(f.dtype == torch.float32 for f in opt.state[weight]["factors"])
    assert opt.state[weight]["momentum"].dtype == torch.bfloat16
    fresh = Kron(model.parameters(), **options)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all(f.dtype == torch.float32 for f in fresh.state[weight]["factors"])
    torch.testing.assert_close(
        fresh.state[weight]["factors"][0], opt.state[weight]["factors"][0], rtol=0, atol=0
    )
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])  # measured: 0.43 of the first five


def test_default_factors_are_bfloat16_and_a_float32_checkpoint_resumes_as_float32():
    """The default ``precond_dtype`` is bfloat16 (docs/torch.md, *Choosing settings*); a
    checkpoint saved with float32 factors (the earlier default) resumes with them, unrounded,
    and continues the saved run's trajectory exactly."""
    model = make_model()
    opt = Kron(model.parameters(), lr=3e-2)
    train(model, opt, 3)
    assert all(f.dtype == torch.bfloat16 for state in opt.state.values() for f in state["factors"])
    saved_model = make_model()
    saved = Kron(saved_model.parameters(), lr=3e-2, precond_dtype=torch.float32)
    train(saved_model, saved, 3)
    checkpoint = copy.deepcopy(saved.state_dict())
    resumed_model = copy.deepcopy(saved_model)
    resumed = Kron(resumed_model.parameters(), lr=3e-2)  # default dtype
    resumed.load_state_dict(checkpoint)
    for p_saved, p_resumed in zip(saved_model.parameters(), resumed_model.parameters()):
        for a, b in zip(saved.state[p_saved]["factors"], resumed.state[p_resumed]["factors"]):
            assert b.dtype == torch.float32
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    train(saved_model, saved, 3, start=3)
    train(resumed_model, resumed, 3, start=3)
    for a, b in zip(saved_model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_bfloat16_factors_average_the_momentum_in_float32():
    """With bfloat16 factors (the default) only the products are bfloat16: a float32 momentum is
    the exact float32 debiased EMA of the gradients, not one rounded to bfloat16 each step."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(8, 8, generator=gen) for _ in range(3)]
    p = nn.Parameter(torch.zeros(8, 8))
    opt = Kron([p], lr=0.0, b1=0.9)
    expected = torch.zeros(8, 8)
    for t, g in enumerate(grads, start=1):
        p.grad = g.clone()
        opt.step()
        expected = expected + (0.1 / (1 - 0.9**t)) * (g - expected)
    momentum = opt.state[p]["momentum"]
    assert opt.state[p]["factors"][0].dtype == torch.bfloat16
    assert momentum.dtype == torch.float32
    torch.testing.assert_close(momentum, expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(momentum, momentum.bfloat16().float())


def test_stochastic_rounding_of_bf16_momentum_is_unbiased():
    from kron.torch.functional import Streams, stochastic_round

    x = torch.full((20000,), 1.0 + 2**-10, dtype=torch.float32)  # between two bf16 neighbours
    rounded = stochastic_round(x, torch.bfloat16, (1, 2, 3), Streams()).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0078125}
    assert rounded.mean().item() == pytest.approx(1.0 + 2**-10, abs=2e-4)


def test_float16_momentum_of_a_huge_finite_gradient_stays_finite():
    """A finite gradient past float16's range must not store an inf momentum (which would turn
    the parameter to NaN on the next step): the momentum keeps float16's largest value."""
    p = torch.nn.Parameter(torch.ones(4, 3))
    opt = Kron([p], lr=0.01, mu_dtype=torch.float16)
    p.grad = torch.full((4, 3), 1e6)
    opt.step()
    momentum = opt.state[p]["momentum"]
    assert momentum.dtype == torch.float16
    assert torch.equal(momentum, torch.full((4, 3), torch.finfo(torch.float16).max).half())
    p.grad = torch.ones(4, 3)
    opt.step()
    assert torch.isfinite(opt.state[p]["momentum"]).all()
    assert torch.isfinite(p).all() and not torch.equal(p.detach(), torch.ones(4, 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_noise_is_the_float32_noise_rounded(dtype):
    """A run's noise does not depend on its factors' dtype beyond rounding."""
    from kron.torch.functional import Streams

    words, cpu = (7, 3, 0, 2, 1), torch.device("cpu")
    wide = Streams().normal((64, 48), torch.float32, cpu, words)
    half = Streams().normal((64, 48), dtype, cpu, words)
    assert half.dtype == dtype
    assert torch.equal(half, wide.to(dtype))
    # Wider draws are made in their own dtype, not widened float32 ones.
    wider = Streams().normal((64, 48), torch.float64, cpu, words)
    assert not torch.equal(wider, wide.double())


def test_params_without_gradients_are_skipped():
    model = make_model()
    model[4].weight.requires_grad_(False)
    opt = Kron(model.parameters(), lr=1e-2)
    frozen = model[4].weight.detach().clone()
    train(model, opt, 2)
    assert not opt.state[model[4].weight]
    torch.testing.assert_close(model[4].weight.detach(), frozen, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_leaves_state_untouched_and_is_counted(bad):
    model = make_model()
    opt = Kron(model.parameters(), lr=1e-2)
    train(model, opt, 2)
    weight = model[2].weight
    before = copy.deepcopy(opt.state[weight])
    param_before = weight.detach().clone()
    other_before = model[0].weight.detach().clone()
    x, y = batch(99)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    weight.grad[3, 4] = bad
    opt.step()
    torch.testing.assert_close(weight.detach(), param_before, rtol=0, atol=0)
    for key in ("factors", "lipschitz"):
        for a, b in zip(opt.state[weight][key], before[key]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(opt.state[weight]["momentum"], before["momentum"], rtol=0, atol=0)
    assert opt.state[weight]["skipped"].item() == 1
    assert not torch.equal(model[0].weight.detach(), other_before)  # the others still step


def test_a_finite_gradient_whose_sum_overflows_is_stepped_not_skipped():
    """The CPU's quick test sums each bucket; a sum of huge finite entries overflows to inf and
    must fall through to the exact per-parameter test rather than skip the step. (Entries this
    large overflow the fit's squares too; only the skip decision is checked here.)"""
    huge = torch.finfo(torch.float32).max / 4
    weights = [nn.Parameter(torch.zeros(3, 3)) for _ in range(2)]
    opt = Kron(weights, lr=1e-2, preconditioner_update_probability=1.0)
    for w in weights:
        w.grad = torch.full((3, 3), huge)
    opt.step()
    for w in weights:
        assert opt.state[w]["skipped"].item() == 0
        assert opt.state[w]["count"].item() == 1


def test_nonfinite_gradient_raises_when_asked():
    model = make_model()
    opt = Kron(model.parameters(), nonfinite="raise")
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    model[0].bias.grad[0] = float("nan")
    with pytest.raises(FloatingPointError, match="group 0"):
        opt.step()


def test_zero_first_gradient_with_automatic_init_stays_finite():
    p = nn.Parameter(torch.ones(4, 4))
    # probability 0.03: the counter rule does not fit on the first step, so Q is its initial value
    opt = Kron([p], precond_init_scale=None, preconditioner_update_probability=0.03)
    p.grad = torch.zeros(4, 4)
    opt.step()
    for factor in opt.state[p]["factors"]:  # scale 1.0 spread over two factors
        torch.testing.assert_close(factor, torch.eye(4, dtype=factor.dtype).expand(1, 4, 4))
    torch.testing.assert_close(p.detach(), torch.ones(4, 4))


def test_sparse_gradient_is_rejected_clearly():
    embedding = nn.Embedding(10, 4, sparse=True)
    opt = Kron(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradients"):
        opt.step()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("preconditioner_mode", "XQX", "Q0.5EQ1.5"),
        ("memory_save_mode", "sometimes", "smart_one_diag"),
        ("merge_dims", "squarest", "first_last"),
        ("preconditioner_type", "fisher", "newton"),
        ("update_clipping", "cubic", r"update_clipping must be None, a callable or one of rms"),
        ("gradient_clipping", "cubic", r"gradient_clipping must be None, a callable or one of"),
        ("update_clip_value", 0.0, r"update_clip_value must be > 0 for update_clipping='rms'"),
        ("decision_rule", "maybe", "accumulator"),
        ("lr", -1.0, "Invalid lr"),
        ("b1", 1.5, r"Invalid b1: 1.5"),
        ("preconditioner_update_probability", 1.5, r"\(0, 1\]"),
        ("precond_dtype", "float99", "precond_dtype"),
        ("nonfinite", "ignore", "skip"),
        ("cached", "no", r"cached must be True, False or None; got 'no'"),
        ("decoupled_weight_decay", "False", r"must be True or False; got 'False'"),
        ("caution", 1, r"caution must be True or False; got 1"),
        ("mu_dtype", torch.int64, r"mu_dtype must be a floating-point torch.dtype"),
        ("precond_init_scale", "1.0", r"precond_init_scale must be a number or None; got '1.0'"),
        ("lr", "0.1", r"lr must be a number; got '0.1'"),
        ("block_size", 2.0j, r"block_size must be a number or None"),
        ("seed", "abc", r"seed must be an int in \[0, 2\*\*64\); got 'abc'"),
        ("seed", -1, r"seed must be an int in \[0, 2\*\*64\); got -1"),
        ("precond_dtype", torch.float8_e5m2, r"precond_dtype must be .*float64\), its name"),
        ("merge_dims", 1, r"Unknown merge_dims 1; accepted: False, True, 'first_last'"),
        ("stack_params", None, r"stack_params must be True or False; got None"),
        ("compile", "yes", r"compile must be True, False or None; got 'yes'"),
        ("lr", math.inf, r"Invalid lr: inf \(must be finite and >= 0\)"),
        ("precond_init_scale", math.inf, r"precond_init_scale must be finite and > 0"),
        ("warmup_steps", 1.5, r"Invalid warmup_steps: 1.5 \(must be a whole number >= 0\)"),
        ("min_ndim_triangular", 1.5, r"Invalid min_ndim_triangular: 1.5"),
    ],
)
def test_invalid_options_raise_value_error(option, value, message):
    with pytest.raises(ValueError, match=message):
        Kron(make_model().parameters(), **{option: value})


# kron_torch 0.3.3's Kron(params, ...) in its order, so that positional calls carry over.
KRON_TORCH_ORDER = [
    "params",
    "lr",
    "b1",
    "weight_decay",
    "preconditioner_update_probability",
    "max_size_triangular",
    "min_ndim_triangular",
    "memory_save_mode",
    "momentum_into_precond_update",
    "precond_lr",
    "precond_init_scale",
    "merge_dims",
    "mu_dtype",
    "precond_dtype",
]


def test_kron_torchs_positional_order_is_kept():
    parameters = list(inspect.signature(Kron).parameters.values())
    assert [p.name for p in parameters[: len(KRON_TORCH_ORDER)]] == KRON_TORCH_ORDER
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in parameters[: len(KRON_TORCH_ORDER)])


@pytest.mark.parametrize(
    ("heavyball", "ours"),
    [
        ({"beta": 0.8}, {"b1": 0.8}),
        ({"foreach": False}, {"stack_params": False}),
        ({"q_dtype": "float64"}, {"precond_dtype": "float64"}),
        ({"storage_dtype": "bfloat16"}, {"mu_dtype": "bfloat16"}),
    ],
)
def test_heavyballs_names_set_the_same_options(heavyball, ours):
    """A heavyball ``PSGDKron`` call runs unchanged: its names set our options, and the trajectory
    equals the one under our names."""

    def run(options):
        model = make_model()
        opt = Kron(model.parameters(), lr=0.05, preconditioner_update_probability=1.0, **options)
        train(model, opt, 5)
        settings = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
        return (settings, opt.stack_params), snapshot(model)

    (settings_a, params_a), (settings_b, params_b) = run(heavyball), run(ours)
    assert settings_a == settings_b
    assert settings_a != run({})[0]  # the name took effect
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "options",
    [
        {"beta": 0.8, "b1": 0.7},
        {"foreach": True, "stack_params": False},
        {"q_dtype": "float64", "precond_dtype": "float32"},
    ],
)
def test_conflicting_heavyball_names_raise(options):
    with pytest.raises(ValueError, match="name the same option"):
        Kron(make_model().parameters(), **options)


def _heavyball_style_value_clip_(x, clip_at=0.02):
    """Like heavyball's clipping functions: takes a tensor or a list, clips in place, returns
    the list."""
    xs = x if isinstance(x, list) else [x]
    for item in xs:
        item.clamp_(-clip_at, clip_at)
    return xs


@pytest.mark.parametrize("option", ["gradient_clipping", "update_clipping"])
@pytest.mark.parametrize(
    "clip",
    [lambda t: t.clamp(-0.02, 0.02), _heavyball_style_value_clip_],
    ids=["per-tensor", "heavyball-style"],
)
def test_a_clipping_callable_acts_as_the_named_clip(option, clip):
    def run(spec):
        model = make_model()
        threshold = option.replace("clipping", "clip_value")
        opt = Kron(model.parameters(), lr=0.05, **{option: spec, threshold: 0.02})
        train(model, opt, 4)
        return snapshot(model)

    for a, b in zip(run(clip), run("value")):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    unclipped = run(None)
    assert any(not torch.equal(a, b) for a, b in zip(run(clip), unclipped))


def test_a_clipping_callable_returning_no_tensor_is_refused():
    model = make_model()
    opt = Kron(model.parameters(), update_clipping=lambda t: t.norm().item())
    with pytest.raises(TypeError, match="must return a tensor"):
        train(model, opt, 1)


def test_invalid_group_override_raises_value_error():
    model = make_model()
    with pytest.raises(ValueError, match="EQ"):
        Kron([{"params": model.parameters(), "preconditioner_mode": "bogus"}])


def test_channels_last_and_non_contiguous_params_match_contiguous():
    torch.manual_seed(0)
    weight = torch.randn(4, 3, 3, 3)
    grads = [torch.randn(4, 3, 3, 3) for _ in range(3)]
    contiguous = nn.Parameter(weight.clone())
    channels_last = nn.Parameter(weight.clone().to(memory_format=torch.channels_last))
    transposed = nn.Parameter(weight.clone().transpose(0, 1).contiguous().transpose(0, 1))
    assert not transposed.is_contiguous()
    results = []
    for p in (contiguous, channels_last, transposed):
        opt = Kron([p], lr=1e-2)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        results.append(p.detach().contiguous())
    torch.testing.assert_close(results[1], results[0])
    torch.testing.assert_close(results[2], results[0])
    assert channels_last.is_contiguous(memory_format=torch.channels_last)


def test_state_size_is_constant_over_many_steps():
    model = make_model()
    opt = Kron(model.parameters(), lr=1e-3, preconditioner_update_probability=0.5)

    def state_bytes():
        total = 0
        for state in opt.state.values():
            for value in state.values():
                values = value if isinstance(value, list) else [value]
                total += sum(
                    v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor)
                )
        return total

    train(model, opt, 5)
    after_five = state_bytes()
    train(model, opt, 200, start=5)
    assert state_bytes() == after_five


def test_closure_is_evaluated_and_its_loss_returned():
    model = make_model()
    opt = Kron(model.parameters(), lr=1e-2)
    x, y = batch(0)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure)
    assert isinstance(first, torch.Tensor) and first.item() > 0
    assert opt.step(closure).item() < first.item()


def test_no_global_torch_setting_changes_at_import():
    import importlib
    import sys

    import torch._dynamo

    before = (
        torch.get_default_dtype(),
        torch._dynamo.config.cache_size_limit,
        torch.are_deterministic_algorithms_enabled(),
        torch.get_num_threads(),
    )
    # A fresh import, after which the original modules go back, so later tests keep one Kron.
    ours = [name for name in sys.modules if name.startswith("kron")]
    originals = {name: sys.modules.pop(name) for name in ours}
    try:
        importlib.import_module("kron.torch")
    finally:
        for name in [m for m in sys.modules if m.startswith("kron")]:
            del sys.modules[name]
        sys.modules.update(originals)
    after = (
        torch.get_default_dtype(),
        torch._dynamo.config.cache_size_limit,
        torch.are_deterministic_algorithms_enabled(),
        torch.get_num_threads(),
    )
    assert before == after


def test_compiled_training_step_equals_eager_and_compiles_once():
    def run(compile_fn):
        return run_training_step(make_model(), batch, compile_fn, steps=6)

    compiled, graphs = run(lambda fn: torch.compile(fn, backend="aot_eager"))
    eager, _ = run(lambda fn: fn)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The graphs are made on the first step (one before optimizer.step() and one after, at
    # most) and none after it: the count of distinct graphs never grows.
    assert 0 < graphs[0] <= 2 and graphs == [graphs[0]] * len(graphs), graphs


def test_device_path_without_host_reads_matches_the_cpu_fast_path(monkeypatch):
    """On accelerators the optimizer never reads the finiteness flags on the host; it selects the
    new state with torch.where instead. Forcing that path on the CPU must not change results."""

    def run():
        model = make_model()
        opt = Kron(model.parameters(), lr=1e-2, preconditioner_update_probability=0.5, mars=True)
        train(model, opt, 6)
        return snapshot(model), opt

    fast, fast_opt = run()
    # The bucket step of the class this module built its optimizers from (imported with it): a
    # test elsewhere may re-import kron.torch.
    original = bucket_step.gather_gradients

    def without_host_read(*args):
        grads, finite, _ = original(*args)
        return grads, finite, False

    monkeypatch.setattr(bucket_step, "gather_gradients", without_host_read)
    slow, slow_opt = run()
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    counts = [opt.state[next(iter(opt.state))]["count"].item() for opt in (fast_opt, slow_opt)]
    assert counts == [6, 6]


@pytest.mark.parametrize(
    ("precond_dtype", "tolerance"),
    # bfloat16 (the default): the compiled kernels round some intermediates differently.
    [(torch.float32, dict(rtol=1e-5, atol=1e-6)), (None, dict(rtol=1e-4, atol=1e-5))],
)
def test_compiled_math_equals_eager_math(precond_dtype, tolerance):
    """``compile=True`` gives the eager trajectory; on the CPU it compiles only the steps that
    fit (a compiled step without a fit was slower there)."""

    def every_other_step(step):
        return 1.0 if step % 2 == 0 else 1e-9

    def run(compile_math):
        model = make_model()
        opt = Kron(
            model.parameters(),
            lr=1e-2,
            preconditioner_update_probability=every_other_step,
            precond_dtype=precond_dtype,
            compile=compile_math,
        )
        train(model, opt, 4)
        return snapshot(model), opt

    eager, _ = run(False)
    compiled, opt = run(True)
    # Keys are (plan, options, do_fit, size, dtype, device): one fit variant per bucket of
    # (16, 8), (16,), (16, 16), (3, 16) and (3,), and no variant without a fit.
    assert [key[2] for key in opt._compiled] == [True] * 5
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, **tolerance)


def test_state_bytes_counts_every_tensor_of_the_state():
    from kron.torch.functional import state_bytes

    layer = torch.nn.Linear(6, 4)
    opt = Kron(layer.parameters(), precond_dtype=torch.float64)
    assert state_bytes(opt) == 0
    layer(torch.randn(3, 6)).sum().backward()
    opt.step()
    expected = sum(
        t.numel() * t.element_size()
        for s in opt.state.values()
        for v in s.values()
        for t in (v if isinstance(v, list | tuple) else [v])
        if isinstance(t, torch.Tensor)
    )
    # The weight alone has a 4×4 and a 6×6 float64 factor: at least 52·8 bytes.
    assert state_bytes(opt) == expected >= 52 * 8


def take_the_device_path(monkeypatch) -> None:
    """Make CPU steps take the accelerator path: finiteness never read on the host, step counts
    passed as tensors (the CPU shortcuts still run, their results unused). Patches the bucket
    step this module imported with ``Kron``: a test elsewhere may re-import kron.torch, making a
    second class and a second module."""
    gather, counts = bucket_step.gather_gradients, bucket_step.step_counts
    monkeypatch.setattr(bucket_step, "gather_gradients", lambda *args: (*gather(*args)[:2], False))
    monkeypatch.setattr(
        bucket_step,
        "step_counts",
        lambda states, ndim, eager, dtype: counts(states, ndim, False, dtype),
    )


def test_a_changed_precond_lr_takes_effect_on_the_next_step():
    """The preconditioner learning rate lives in a reused 0-d tensor (no recompiles, no host
    copies); a new value in the param group must reach the next step as a fresh optimizer's
    would."""

    def run(change_in_place: bool, new_lr: float):
        model = make_model()
        opt = Kron(model.parameters(), lr=1e-2, precond_lr=0.1)
        train(model, opt, 3)
        if not change_in_place:
            saved = opt.state_dict()
            opt = Kron(model.parameters(), lr=1e-2, precond_lr=0.1)
            opt.load_state_dict(saved)
        opt.param_groups[0]["precond_lr"] = new_lr
        train(model, opt, 3, start=3)
        return snapshot(model)

    changed, fresh, unchanged = run(True, 0.3), run(False, 0.3), run(True, 0.1)
    for a, b in zip(changed, fresh):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(changed, unchanged))


def test_the_device_path_keeps_float64_momentum_weights(monkeypatch):
    """Off the CPU the step counts reach the momentum as tensors, not numbers; for float64
    parameters they must be float64 too, or the debiasing weights round to float32 (a 1e-9
    drift from the CPU trajectory within a dozen steps)."""

    def run():
        model = make_model(dtype=torch.float64)
        opt = Kron(model.parameters(), lr=1e-2, precond_dtype=torch.float64)
        train(model, opt, 12)
        return snapshot(model)

    fast = run()
    take_the_device_path(monkeypatch)
    for a, b in zip(fast, run()):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_the_device_path_reads_nothing_back_to_the_host(monkeypatch):
    """On an accelerator any read of a tensor's value (``item``, ``bool``, ``float``, ``tolist``)
    waits for the device. The device path, emulated here on the CPU, makes none: only the two
    CPU-only shortcuts may read, and they are off that path."""
    import sys

    cpu_only = {"gather_gradients", "step_counts"}
    take_the_device_path(monkeypatch)
    model = make_model()
    opt = Kron(model.parameters(), preconditioner_update_probability=0.5, **EVERY_STEP_BRANCH)
    train(model, opt, 2)
    reads = []
    stepping = [False]
    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def trapped(self, *args, _original=original, _name=name, **kwargs):
            if stepping[0] and sys._getframe(1).f_code.co_name not in cpu_only:
                reads.append((_name, sys._getframe(1).f_code.co_name))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, trapped)
    for step in range(2, 10):
        x, y = batch(step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step == 6:  # a non-finite gradient takes the skip path
            next(model.parameters()).grad[0, 0] = float("nan")
        stepping[0] = True
        opt.step()
        stepping[0] = False
    assert reads == []
    assert int(opt.state[next(model.parameters())]["skipped"]) == 1
