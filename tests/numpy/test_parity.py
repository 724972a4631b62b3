"""KronPsgd reproduces kron.core's trajectory: the step replayed here with StepOptions built by
hand from docs/numpy.md's option table and the documented noise order, so an option the front
end maps wrongly (a geometry, a damping rule, a norm bound, the fitting target) shows up."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from kron.core import (
    FitOptions,
    LayoutOptions,
    StepOptions,
    TensorState,
    balance,
    fourth_moment,
    get_ops,
    init_factors,
    init_lipschitz,
    kron_step,
    make_plan,
    scale_from_moments,
)
from kron.numpy import KronPsgd

OPS = get_ops("numpy")
SEED, NAME, SHAPE, STEPS = 3, "w", (6, 4), 12


def reference(
    grads,
    *,
    mode,
    damping_rule,
    norm_bound,
    whiten_grad,
    lr=3e-3,
    clip=1.0,
    balance_probability=0.0,
):
    """θ, the factors and how many steps balanced, after ``grads`` with update probability 1,
    from the core alone. A step balances when the first uniform of its stream (the draw KronPsgd
    takes before the noise) is below ``balance_probability``."""
    layout = LayoutOptions(max_size=math.inf, max_skew=1.0, min_ndim_dense=0)
    options = StepOptions(
        layout=layout,
        fit=FitOptions(
            geometry=mode,
            beta_lipschitz=0.9,
            damping=1e-9,
            damping_rule=damping_rule,
            norm_bound=norm_bound,
            normalizer_floor=1e-8,
        ),
        beta=0.9,
        momentum_rule="running_mean",
        whiten_momentum=not whiten_grad,
        fit_before_apply=True,
        clip_rms=None,
        clip_max=clip,
    )
    plan = make_plan(SHAPE, layout)
    theta = np.zeros(SHAPE)
    scale = float(scale_from_moments(fourth_moment(grads[0], OPS), OPS, 1e-9))
    like = np.zeros((), np.float64)
    state = TensorState(
        tuple(init_factors(plan, scale, like, OPS, options.fit.state_is_p)),
        tuple(init_lipschitz(plan, like, OPS)),
        np.zeros((1, *SHAPE)),
    )
    balanced = 0
    for t, g in enumerate(grads):
        rng = np.random.default_rng([SEED, t, zlib.crc32(NAME.encode())])
        do_balance = rng.random() < balance_probability  # the balance draw comes first
        noise = rng.standard_normal((plan.num_blocks, *plan.block_shape))
        probes = None
        if norm_bound == "subspace":
            probes = [rng.standard_normal((plan.num_blocks, 32, n)) for n in plan.block_shape]
        y, state = kron_step(
            state,
            g[None],
            t,
            noise,
            plan=plan,
            options=options,
            precond_lr=0.1,
            do_fit=True,
            ops=OPS,
            norm_probes=probes,
        )
        if do_balance:  # every step fits (update probability 1)
            state = state._replace(factors=tuple(balance(state.factors, OPS)))
            balanced += 1
        theta = theta - lr * y[0]
    return theta, state.factors, balanced


def _optimizer_and_gradients(mode, damping_rule, norm_bound, whiten_grad, balance_probability):
    """A ``KronPsgd`` with these options and the gradients of the parity runs."""
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(SHAPE) * np.linspace(0.1, 3.0, SHAPE[1]) for _ in range(STEPS)]
    opt = KronPsgd(
        preconditioner_mode=mode,
        damping_rule=damping_rule,
        norm_bound=norm_bound,
        whiten_grad=whiten_grad,
        balance_probability=balance_probability,
        seed=SEED,
    )
    return opt, grads


@pytest.mark.parametrize(
    ("mode", "damping_rule", "norm_bound", "whiten_grad"),
    [
        ("Q0.5EQ1.5", "elementwise", "power", True),
        ("EQ", "mean_abs", "rowcol", True),
        ("QUAD", "absolute", "spd", False),
        ("PRO4P", "elementwise", "subspace", True),
        ("QEP", "mean_abs", "power", False),
    ],
)
def test_kron_psgd_follows_the_core(mode, damping_rule, norm_bound, whiten_grad):
    opt, grads = _optimizer_and_gradients(mode, damping_rule, norm_bound, whiten_grad, 0.0)
    theta = np.zeros(SHAPE)
    for g in grads:
        opt.step(NAME, theta, g)
    expected, _, _ = reference(
        grads, mode=mode, damping_rule=damping_rule, norm_bound=norm_bound, whiten_grad=whiten_grad
    )
    np.testing.assert_allclose(theta, expected, rtol=1e-12, atol=1e-15)
    assert np.abs(theta).max() > 1e-3  # it moved: the comparison is not of two zeros


@pytest.mark.parametrize(
    ("mode", "damping_rule", "norm_bound", "whiten_grad"),
    [
        ("Q0.5EQ1.5", "elementwise", "power", True),
        ("EQ", "mean_abs", "rowcol", False),
        ("PRO4P", "elementwise", "subspace", True),
    ],
)
def test_balancing_follows_the_core(mode, damping_rule, norm_bound, whiten_grad):
    """At balance probability 0.5 the (6, 4) parameter's two factors are rebalanced on the steps
    whose balance draw says so (6 of the 12 here), as the core's loop does. Balancing leaves ⊗Q,
    hence θ, unchanged, and a balanced step erases the factors' earlier scale history, so the
    factors are compared after every step: a front end that never balances, or balances on
    other steps (every fit, say), differs in them."""
    opt, grads = _optimizer_and_gradients(mode, damping_rule, norm_bound, whiten_grad, 0.5)
    theta = np.zeros(SHAPE)
    for t, g in enumerate(grads):
        opt.step(NAME, theta, g)
        expected, factors, balanced = reference(
            grads[: t + 1],  # the reference run of the first t + 1 steps
            mode=mode,
            damping_rule=damping_rule,
            norm_bound=norm_bound,
            whiten_grad=whiten_grad,
            balance_probability=0.5,
        )
        assert len(factors) == 2
        np.testing.assert_allclose(theta, expected, rtol=1e-12, atol=1e-15)
        for f, g in zip(opt.preconditioner(NAME), factors, strict=True):
            np.testing.assert_allclose(f, g, rtol=1e-12, atol=1e-15, err_msg=f"step {t}")
    assert balanced >= 3  # the branch really ran
    assert balanced < STEPS  # and not on every step, so the draw decides it
    assert np.abs(theta).max() > 1e-3
