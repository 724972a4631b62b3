"""Kron (PyTorch) reproduces kron.core step for step, given the same noise, in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kron.core import (
    GEOMETRIES,
    FitOptions,
    LayoutOptions,
    StepOptions,
    TensorState,
    balance,
    clip_rms,
    counter_decision,
    get_ops,
    init_factors,
    init_lipschitz,
    kron_step,
    make_plan,
)
from kron.torch import Kron
from kron.torch.functional import Streams, uniform_for

OPS = get_ops("torch")
SHAPES = [(4, 3), (4, 3), (3,), (2, 2, 3), ()]
STEPS = 50
LR, PRECOND_LR, PROBABILITY = 0.02, 0.2, 0.5


def make_params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in SHAPES]


def loss_fn(params: list[torch.Tensor]) -> torch.Tensor:
    """A smooth non-quadratic loss, so that gradients and Hessians change along the run."""
    total = 0.0
    for i, p in enumerate(params):
        weights = torch.linspace(0.5, 2.0, p.numel(), dtype=p.dtype).reshape(p.shape)
        total = (
            total + (weights * p * p).sum() * (i + 1) / 2 + torch.sin(p).sum() + 0.1 * (p**4).sum()
        )
    return total


def reference_run(
    geometry, newton, cached, delayed, block_size, on_momentum=True, balance_probability=0.01
):
    """The loop Kron promises, written directly against kron.core: the final parameters and
    states, and how many steps balanced the factors."""
    params = [p.detach().clone() for p in make_params()]
    layout = LayoutOptions(
        max_size=8192, max_skew=float("inf"), min_ndim_dense=2, block_size=block_size
    )
    options = StepOptions(
        layout=layout,
        fit=FitOptions(geometry=geometry),
        beta=0.9,
        momentum_rule="debiased_ema",
        whiten_momentum=on_momentum,
        cache=cached,
        fit_before_apply=not delayed,
        clip_rms=None,
        clip_max=None,
    )
    streams = Streams()
    like = torch.zeros((), dtype=torch.float64)
    plans = [make_plan(p.shape, layout) for p in params]
    states = [
        TensorState(
            tuple(init_factors(pl, 1.0, like, OPS, options.fit.state_is_p)),
            tuple(init_lipschitz(pl, like, OPS)),
            torch.zeros((1, *p.shape), dtype=torch.float64),
        )
        for pl, p in zip(plans, params)
    ]
    total, balanced = 0.0, 0
    for step in range(STEPS):
        do_fit, total = counter_decision(total, PROBABILITY, np)
        do_fit = bool(do_fit)
        do_balance = do_fit and uniform_for(0, step, 0, 4) < balance_probability
        balanced += do_balance
        leaves = [p.clone().requires_grad_(True) for p in params]
        probes = [
            streams.normal(p.shape, torch.float64, p.device, (0, step, 0, i, 1))
            for i, p in enumerate(params)
        ]
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_fn(leaves), leaves, create_graph=newton)
            hvps = torch.autograd.grad(grads, leaves, probes) if newton and do_fit else None
        for i, (plan, p) in enumerate(zip(plans, params)):
            noise = streams.normal(
                (plan.num_blocks, *plan.block_shape), torch.float64, p.device, (0, step, 0, i, 0)
            )
            mask = plan.mask()
            y, new = kron_step(
                states[i],
                grads[i].detach()[None],
                float(step),  # as Kron passes it on an eager CPU step
                noise,
                plan=plan,
                options=options,
                precond_lr=PRECOND_LR,
                do_fit=do_fit,
                ops=OPS,
                mask=None if mask is None else torch.as_tensor(mask),
                probe=plan.to_blocks(probes[i][None], OPS, stacked=True) if hvps else None,
                hvp=plan.to_blocks(hvps[i][None], OPS, stacked=True) if hvps else None,
            )
            if do_balance:
                new = new._replace(factors=tuple(balance(new.factors, OPS)))
            y = clip_rms(y, 1.1, OPS)
            states[i] = new
            params[i] = p - LR * y[0]
    return params, states, balanced


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("newton", [False, True], ids=["whitening", "newton"])
def test_every_geometry_matches_the_core(geometry, newton):
    _check(geometry, newton, cached=False, delayed=False, block_size=None, stack=True)


@pytest.mark.parametrize(
    ("cached", "delayed", "block_size", "stack"),
    [
        (True, False, None, True),
        (False, True, None, True),
        (True, True, 2, True),
        (False, False, 2, False),
    ],
    ids=["cached", "delayed", "cached-delayed-blocked", "unstacked-blocked"],
)
@pytest.mark.parametrize("geometry", ["EQ", "Q0.5EQ1.5"])
def test_cached_delayed_blocked_and_unstacked_match_the_core(
    geometry, cached, delayed, block_size, stack
):
    _check(geometry, False, cached, delayed, block_size, stack)


@pytest.mark.parametrize("geometry", ["EQ", "Q0.5EQ1.5"])
def test_fitting_on_the_gradient_matches_the_core(geometry):
    _check(geometry, False, False, False, None, True, on_momentum=False)


@pytest.mark.parametrize("geometry", ["EQ", "Q0.5EQ1.5", "PRO4P"])
def test_balancing_matches_the_core(geometry):
    """At the default balance probability (0.01) the 50 steps never balance; at 0.5 they do."""
    assert _check(geometry, False, False, False, None, True, balance_probability=0.5) >= 5


def _check(
    geometry,
    newton,
    cached,
    delayed,
    block_size,
    stack,
    on_momentum=True,
    balance_probability=0.01,
):
    """Kron against :func:`reference_run`; returns how many steps balanced."""
    expected_params, expected_states, balanced = reference_run(
        geometry, newton, cached, delayed, block_size, on_momentum, balance_probability
    )
    params = make_params()
    opt = Kron(
        params,
        lr=LR,
        precond_lr=PRECOND_LR,
        preconditioner_update_probability=PROBABILITY,
        preconditioner_mode=geometry,
        precond_dtype=torch.float64,
        cached=cached,
        delayed=delayed,
        block_size=block_size,
        stack_params=stack,
        preconditioner_type="newton" if newton else "whitening",
        momentum_into_precond_update=on_momentum,
        balance_probability=balance_probability,
    )
    for _ in range(STEPS):
        if newton:
            opt.step(lambda: loss_fn(params))
        else:
            opt.zero_grad()
            loss_fn(params).backward()
            opt.step()
    for p, q in zip(params, expected_params):
        torch.testing.assert_close(p.detach(), q, rtol=1e-10, atol=1e-12)
    for p, state in zip(params, expected_states):
        for f, g in zip(opt.state[p]["factors"], state.factors):
            torch.testing.assert_close(f, g, rtol=1e-10, atol=1e-12)
    return balanced
