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
