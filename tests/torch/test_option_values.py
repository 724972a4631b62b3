"""Option values at the edges of what ``Kron`` accepts: unhashable callables, values of the
wrong type, and options derived from others."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from kron.torch import Kron


@dataclasses.dataclass
class HalvingSchedule:
    """A schedule as a (mutable, so unhashable) dataclass: ``p = start / 2^(step // every)``."""

    start: float = 1.0
    every: int = 2

    def __call__(self, step: int) -> float:
        return self.start / 2 ** (step // self.every)


@dataclasses.dataclass
class ValueClip:
    limit: float = 0.5

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-self.limit, self.limit)


def test_unhashable_callables_are_accepted_and_used():
    p = nn.Parameter(torch.ones(3, 3))
    opt = Kron(
        [p], preconditioner_update_probability=HalvingSchedule(), update_clipping=ValueClip()
    )
    for _ in range(4):
        p.grad = torch.randn(3, 3)
        opt.step()
    assert opt.state[p]["count"].item() == 4
    # lr 3e-3 and every update entry clamped to 0.5: no entry moved more than 1.5e-3 a step.
    assert (p.detach() - 1).abs().max().item() <= 4 * 3e-3 * 0.5 + 1e-7


@pytest.mark.parametrize(
    "name, value",
    [
        ("memory_save_mode", ["one_diag"]),
        ("preconditioner_mode", ["EQ"]),
        ("preconditioner_update_probability", "0.5"),
        ("preconditioner_update_probability", [0.5]),
        ("preconditioner_update_probability", True),
    ],
)
def test_a_value_of_the_wrong_type_is_named(name, value):
    p = nn.Parameter(torch.ones(2, 2))
    with pytest.raises(ValueError, match=name.split("_")[0]):
        Kron([p], **{name: value})
    opt = Kron([p])
    with pytest.raises(ValueError, match=name.split("_")[0]):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(3))], name: value})
    assert len(opt.param_groups) == 1


def test_a_one_element_tensor_probability_is_a_number():
    p = nn.Parameter(torch.ones(2, 2))
    opt = Kron([p], preconditioner_update_probability=torch.tensor(0.5))
    p.grad = torch.ones(2, 2)
    opt.step()
    assert opt.state[p]["count"].item() == 1


@pytest.mark.parametrize(
    ("options", "factor_shapes"),
    [
        # split: an axis past the limit is cut into dense tiles (heavyball's split).
        (dict(split=True, max_size_triangular=4), [(3, 4, 4), (3, 3, 3)]),
        # block_size alone: an axis past max_size_triangular is diagonal and stays whole.
        (dict(block_size=4, max_size_triangular=8), [(1, 10), (1, 3, 3)]),
        (dict(block_size=4), [(3, 4, 4), (3, 3, 3)]),
    ],
)
def test_split_tiles_long_axes_and_block_size_leaves_them_diagonal(options, factor_shapes):
    p = nn.Parameter(torch.ones(10, 3))
    opt = Kron([p], min_ndim_triangular=0, **options)
    p.grad = torch.ones(10, 3)
    opt.step()
    assert [tuple(f.shape) for f in opt.state[p]["factors"]] == factor_shapes


def test_split_tiles_by_a_whole_float_max_size_and_names_a_fractional_one():
    """With ``split=True`` and no ``block_size`` the tiles are ``max_size_triangular`` wide, so
    a float that is a whole number (1e4 spelled as a float) serves, and another is named."""
    p = nn.Parameter(torch.ones(6, 4))
    as_float = Kron([p], split=True, max_size_triangular=4.0)
    as_int = Kron([nn.Parameter(torch.ones(6, 4))], split=True, max_size_triangular=4)
    assert as_float._options(as_float.param_groups[0]) == as_int._options(as_int.param_groups[0])
    with pytest.raises(ValueError, match="max_size_triangular, which must then be a whole number"):
        Kron([p], split=True, max_size_triangular=4.5)


def test_split_with_a_block_size_keeps_a_long_axis_diagonal():
    """split tiles by max_size_triangular only when no block_size is given: with one, an axis
    past max_size_triangular stays diagonal and whole, as without split."""
    p = nn.Parameter(torch.ones(10, 3))
    opt = Kron([p], split=True, block_size=4, max_size_triangular=8, min_ndim_triangular=0)
    p.grad = torch.ones(10, 3)
    opt.step()
    assert [tuple(f.shape) for f in opt.state[p]["factors"]] == [(1, 10), (1, 3, 3)]


def test_a_one_element_tensor_lr_steps_as_the_number():
    """torch.optim accepts a one-element tensor lr; so does Kron, with or without warm-up."""
    results = []
    for lr in (0.01, torch.tensor([0.01]), torch.tensor(0.01)):
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(4, 3))
        opt = Kron([p], lr=lr, weight_decay=0.1, warmup_steps=3)
        for step in range(3):
            p.grad = torch.cos(torch.arange(12.0).reshape(4, 3) + step)
            opt.step()
        results.append(p.detach().clone())
    torch.testing.assert_close(results[1], results[0])
    torch.testing.assert_close(results[2], results[0])


def test_an_unknown_preconditioner_mode_is_named_in_the_constructor_and_in_a_group():
    p, q = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2, 2))
    with pytest.raises(
        ValueError, match=r"Unknown preconditioner_mode \(geometry\) 'XX'; accepted: .*EQ"
    ):
        Kron([p], preconditioner_mode="XX")
    opt = Kron([p])
    with pytest.raises(ValueError, match=r"Unknown preconditioner_mode \(geometry\) 'XX'"):
        opt.add_param_group({"params": [q], "preconditioner_mode": "XX"})


def test_caution_comes_after_the_update_clip():
    """As in heavyball, where the update clip is the last link of the chain and caution part of
    the parameter update: the clip sees the whole update, and caution's rescale by the inverse
    kept fraction applies to the clipped one."""
    from kron.core import cautious
    from kron.torch.functional import OPS

    seen = []

    def clip(x):
        seen.append(x.clone())
        return x.clamp(-0.01, 0.01)

    p = nn.Parameter(torch.zeros(6, 5))
    opt = Kron([p], lr=1.0, caution=True, update_clipping=clip)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        grad = torch.randn(6, 5, generator=gen)
        before = p.detach().clone()
        p.grad = grad.clone()
        opt.step()
    clipped = seen[-1].clamp(-0.01, 0.01)
    assert (clipped * grad <= 0).any()  # caution drops something, so the order shows
    expected = before - cautious(clipped[None], grad[None], OPS)[0]
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)


def test_warmup_is_heavyballs():
    """heavyball's warm-up, ``lr·t/max(t, warmup_steps + 1)`` with ``t`` counted from 1: with
    3 warm-up steps the first four steps take 1/4, 2/4, 3/4 and 4/4 of the learning rate."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 3, generator=gen) for _ in range(5)]
    warm, plain = nn.Parameter(torch.zeros(4, 3)), nn.Parameter(torch.zeros(4, 3))
    with_warmup = Kron([warm], lr=0.1, warmup_steps=3)
    by_hand = Kron([plain], lr=0.1)
    for step, (grad, fraction) in enumerate(zip(grads, [0.25, 0.5, 0.75, 1.0, 1.0])):
        by_hand.param_groups[0]["lr"] = 0.1 * fraction
        warm.grad, plain.grad = grad.clone(), grad.clone()
        with_warmup.step()
        by_hand.step()
        torch.testing.assert_close(warm.detach(), plain.detach(), rtol=1e-6, atol=0, msg=step)


@pytest.mark.parametrize(
    ("heavyball_name", "ours", "value"),
    [
        ("l2_clip_", "l2_norm", 1.0),
        ("rmsnorm_clip_", "rms", 1.0),
        ("trust_region_clip_", "soft", 1.5),
    ],
)
@pytest.mark.parametrize("kind", ["gradient", "update"])
def test_heavyballs_clipping_names_are_our_clips_at_its_thresholds(
    heavyball_name, ours, value, kind
):
    """heavyball.utils's function names (heavyball 3 resolves them) are accepted as the named
    clip they compute, at heavyball's default threshold whatever ``*_clip_value`` says."""

    def run(**clipping):
        p = nn.Parameter(torch.zeros(4, 3))
        opt = Kron([p], lr=0.1, **clipping)
        for step in range(3):
            p.grad = 3.0 * torch.cos(torch.arange(12.0).reshape(4, 3) + step)
            opt.step()
        return p.detach()

    named = run(**{f"{kind}_clipping": heavyball_name, f"{kind}_clip_value": 0.2})
    torch.testing.assert_close(
        named, run(**{f"{kind}_clipping": ours, f"{kind}_clip_value": value}), rtol=0, atol=0
    )


def test_an_unknown_clipping_name_lists_heavyballs_names_too():
    p = nn.Parameter(torch.ones(2, 2))
    for kind in ("gradient", "update"):
        with pytest.raises(
            ValueError,
            match=f"{kind}_clipping must be None, a callable or one of rms, l2_norm, value, soft, "
            "l2_clip_, rmsnorm_clip_, trust_region_clip_; got 'l2'",
        ):
            Kron([p], **{f"{kind}_clipping": "l2"})


FLOAT8 = [getattr(torch, name) for name in dir(torch) if name.startswith("float8_")]


@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
@pytest.mark.parametrize("name", ["precond_dtype", "mu_dtype", "q_dtype", "storage_dtype"])
def test_a_float8_dtype_is_refused_before_the_first_step(name, dtype):
    """torch promotes no float8 dtype with another, so a float8 factor or momentum dtype used to
    pass construction and fail at the first step ("Promotion for Float8 Types is not
    supported"); the message lists the dtypes accepted."""
    accepted = r"\(torch.float16, torch.bfloat16, torch.float32, torch.float64\)"
    p = nn.Parameter(torch.ones(2, 2))
    with pytest.raises(
        ValueError, match=rf"{name} must be a floating-point torch.dtype {accepted}"
    ):
        Kron([p], **{name: dtype})
    with pytest.raises(ValueError, match=rf"{name} must be .*; got {dtype}"):
        Kron([p], **{name: str(dtype).removeprefix("torch.")})
    opt = Kron([p])
    with pytest.raises(ValueError, match=rf"dtype must be a floating-point torch.dtype {accepted}"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(3))], name: dtype})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("merge", [1, 0, 1.0])
def test_merge_dims_equal_to_one_or_zero_is_refused_not_stored(merge):
    """``1 == True`` took ``merge_dims=1`` through the rules' membership test, and the group
    kept 1; a real bool or a rule's name is required, here and in heavyball's class."""
    from kron.torch import ForeachPSGDKron

    p = nn.Parameter(torch.ones(2, 3, 4))
    message = rf"Unknown merge_dims {merge!r}; accepted: False, True, 'first_last', 'heavyball'"
    with pytest.raises(ValueError, match=message):
        Kron([p], merge_dims=merge)
    with pytest.raises(ValueError, match=message):
        ForeachPSGDKron([p], merge_dims=merge)
    opt = Kron([p])
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(3))], "merge_dims": merge})
    assert len(opt.param_groups) == 1
    assert Kron([p], merge_dims=True).param_groups[0]["merge_dims"] is True


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True, "3", None])
def test_a_seed_outside_64_bits_or_not_an_int_is_refused(seed):
    """The draws mask the seed to 64 bits, so -1 and 2**64 were accepted and drew the numbers
    of 2**64 - 1 and 0; Keras and NumPy refuse them."""
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\); got "):
        Kron([nn.Parameter(torch.ones(2))], seed=seed)


def test_every_seed_in_64_bits_is_accepted_as_an_int():
    import numpy as np

    for seed in (0, 2**64 - 1, np.uint64(2**64 - 1), np.int32(7)):
        opt = Kron([nn.Parameter(torch.ones(2))], seed=seed)
        assert type(opt.seed) is int and opt.seed == int(seed)
