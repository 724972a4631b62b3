"""Option validation and degenerate inputs: zero, NaN and infinite statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kron.core import (
    DAMPING_RULES,
    GEOMETRIES,
    MEMORY_SAVE_MODES,
    MOMENTUM_RULES,
    NORM_BOUNDS,
    FitOptions,
    LayoutOptions,
    StepOptions,
    balance,
    canonical_geometry,
    finite_rows,
    fit,
    fourth_moment,
    get_ops,
    init_factors,
    init_lipschitz,
    make_plan,
    norm_lower_bound,
    scale_from_moments,
    shared_scale,
)
from kron.core.fitting import GEOMETRY_ALIASES

from ._core_helpers import ALL_GEOMETRIES


# --------------------------------------------------------------------------------------------
# Unknown names: ValueError listing every accepted value.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "field", "accepted"),
    [
        (lambda: FitOptions(geometry="QQ"), "geometry", GEOMETRIES + tuple(GEOMETRY_ALIASES)),
        (lambda: canonical_geometry("eq"), "geometry", GEOMETRIES),
        (lambda: FitOptions(damping_rule="relative"), "damping_rule", DAMPING_RULES),
        (lambda: FitOptions(norm_bound="frobenius"), "norm_bound", NORM_BOUNDS),
        (
            lambda: LayoutOptions(memory_save_mode="two_diag"),
            "memory_save_mode",
            [repr(m) for m in MEMORY_SAVE_MODES],
        ),
        (lambda: StepOptions(momentum_rule="nesterov"), "momentum_rule", MOMENTUM_RULES),
        (lambda: StepOptions(fit=FitOptions(geometry="Kron")), "geometry", GEOMETRIES),
        (
            lambda: norm_lower_bound(np.eye(3)[None], "frobenius", get_ops("numpy")),
            "norm bound",
            NORM_BOUNDS,
        ),
        (lambda: get_ops("mlx"), "backend", ("numpy", "torch", "jax")),
    ],
    ids=[
        "geometry",
        "canonical",
        "damping_rule",
        "norm_bound",
        "memory_save_mode",
        "momentum_rule",
        "nested_fit",
        "norm_lower_bound",
        "get_ops",
    ],
)
def test_unknown_names_list_accepted_values(make, field, accepted):
    with pytest.raises(ValueError) as info:
        make()
    message = str(info.value)
    assert field in message
    assert "accepted" in message
    for name in accepted:
        assert str(name) in message


def test_geometry_aliases():
    assert FitOptions(geometry="Q0p5EQ1p5").geometry == "Q0.5EQ1.5"
    assert FitOptions(geometry="QE").geometry == "QEQ"
    for name in GEOMETRIES:
        assert FitOptions(geometry=name).geometry == name


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: FitOptions(beta_lipschitz=1.0), "beta_lipschitz"),
        (lambda: FitOptions(beta_lipschitz=-0.1), "beta_lipschitz"),
        (lambda: FitOptions(damping=-1e-9), "damping"),
        (lambda: FitOptions(damping=float("nan")), "damping"),
        (lambda: FitOptions(normalizer_floor=-1.0), "normalizer_floor"),
        (lambda: StepOptions(beta=1.0, momentum_rule="debiased_ema"), "beta"),
        (lambda: StepOptions(beta=1.5), "beta"),
        (lambda: StepOptions(beta=-0.5), "beta"),
        (lambda: StepOptions(clip_rms=0.0), "clip_rms"),
        (lambda: StepOptions(clip_max=-1.0), "clip_max"),
        (lambda: LayoutOptions(max_size=-0.5), "max_size"),
        (lambda: LayoutOptions(block_size=0), "block_size"),
    ],
)
def test_out_of_range_values(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_subspace_bound_needs_probes():
    with pytest.raises(ValueError, match="probes"):
        norm_lower_bound(np.eye(3)[None], "subspace", get_ops("numpy"))


# --------------------------------------------------------------------------------------------
# The automatic init scale.
# --------------------------------------------------------------------------------------------
def test_scale_from_moments_falls_back_to_one(backend):
    fourth = backend.array(np.array([0.0, np.nan, np.inf, -np.inf, -3.0, 16.0, 1e-12]))
    scale = backend.numpy(scale_from_moments(fourth, backend.ops))
    np.testing.assert_array_equal(scale[:5], 1.0)
    np.testing.assert_allclose(scale[5], 16.0 ** (-1 / 8), rtol=1e-14)
    np.testing.assert_allclose(scale[6], (1e-12 + 1e-36) ** (-1 / 8), rtol=1e-14)
    assert np.all(np.isfinite(scale))


def test_scale_from_moments_newton(backend):
    fourth = backend.array(np.array([0.0, np.nan, 81.0]))
    second = backend.array(np.array([4.0, 4.0, 4.0]))
    scale = backend.numpy(scale_from_moments(fourth, backend.ops, probe_second=second))
    np.testing.assert_array_equal(scale[:2], 1.0)
    np.testing.assert_allclose(scale[2], 81.0 ** (-1 / 8) * 4.0**0.25, rtol=1e-14)


def test_scale_from_a_zero_gradient(backend):
    fourth = fourth_moment(backend.array(np.zeros((3, 4))), backend.ops)
    assert float(backend.numpy(scale_from_moments(fourth, backend.ops))) == 1.0
    fourth = fourth_moment(backend.array(np.full((3, 4), 2.0)), backend.ops)
    assert float(backend.numpy(fourth)) == 16.0


# --------------------------------------------------------------------------------------------
# Degenerate inputs to fit.
# --------------------------------------------------------------------------------------------
CASES = {
    "matrix(4,6)": ((4, 6), LayoutOptions()),
    "blocked(20,6)": ((20, 6), LayoutOptions(block_size=8)),
}


def _zero_fit(
    backend,
    geometry,
    case,
    *,
    damping_rule="elementwise",
    damping=1e-9,
    newton=False,
    zero_probe=False,
    steps=5,
):
    shape, layout = CASES[case]
    plan = make_plan(shape, layout)
    options = FitOptions(geometry=geometry, damping_rule=damping_rule, damping=damping)
    ops = backend.ops
    like = backend.array(np.zeros(1))
    factors = init_factors(plan, 1.0, like, ops, options.state_is_p)
    lips = init_lipschitz(plan, like, ops)
    mask = None if plan.mask() is None else backend.array(plan.mask())
    rng = np.random.default_rng(30)
    batch = (plan.num_blocks, *plan.block_shape)
    zero = backend.array(np.zeros(batch))
    for _ in range(steps):
        noise = backend.array(rng.standard_normal(batch))
        probe = None
        if newton:
            probe = zero if zero_probe else backend.array(rng.standard_normal(batch))
        factors, lips = fit(
            factors, lips, zero, noise, lr=0.1, options=options, ops=ops, probe=probe, mask=mask
        )
    return [backend.numpy(f) for f in factors], [backend.numpy(lip) for lip in lips]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(
    ("damping_rule", "damping"),
    [("elementwise", 1e-9), ("elementwise", 0.0), ("mean_abs", 0.0), ("absolute", 1e-9)],
)
@pytest.mark.parametrize("geometry", ALL_GEOMETRIES)
def test_whitening_on_zero_gradient_is_finite(backend, geometry, damping_rule, damping, case):
    factors, lips = _zero_fit(backend, geometry, case, damping_rule=damping_rule, damping=damping)
    for f in factors:
        assert np.all(np.isfinite(f))
        assert np.abs(f).max() > 0
    for lip in lips:
        assert np.all(np.isfinite(lip)) and np.all(lip > 0)


@pytest.mark.parametrize("geometry", ALL_GEOMETRIES)
def test_newton_on_zero_hvp_is_finite(backend, geometry):
    """h = 0 with a random probe: T1 = 0, T2 = Γ(v, v) > 0."""
    factors, _ = _zero_fit(backend, geometry, "matrix(4,6)", newton=True)
    for f in factors:
        assert np.all(np.isfinite(f)) and np.abs(f).max() > 0


@pytest.mark.parametrize("geometry", ["EQ", "Q0.5EQ1.5"])
def test_newton_on_all_zero_pair_is_finite(backend, geometry):
    """h = 0 and v = 0: T1 = T2 = 0, so L = 0 and the step is
    μ / max(L, tiny). The floor ``tiny`` must keep the step finite so that 0·step = 0. On torch,
    ``TorchOps.maximum`` turns the Python float tiny(float64) = 2.2e-308 into a float32 tensor
    first, which flushes it to 0: the step is μ/0 = inf and inf·0 = NaN."""
    factors, lips = _zero_fit(
        backend, geometry, "matrix(4,6)", newton=True, zero_probe=True, damping=0.0, steps=1
    )
    for lip in lips:
        np.testing.assert_array_equal(lip, 0.0)
    for f in factors:  # finite, and exactly where they started (Q = I): the step was 0
        start = np.broadcast_to(np.eye(f.shape[-1]), f.shape) if f.ndim == 3 else np.ones(f.shape)
        np.testing.assert_array_equal(f, start)


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid:RuntimeWarning")
@pytest.mark.parametrize("geometry", ALL_GEOMETRIES)
def test_an_overflowing_fit_keeps_the_factors_and_estimates(backend, geometry):
    """A finite float32 gradient of 1e25 squares past the float32 range inside the fit. The
    block keeps its factors (QEP: as balanced at the start of the call, the same P) and
    Lipschitz estimates exactly, and a normal fit afterwards still updates them (so the fallback
    is per call, not a latch)."""
    plan = make_plan((4, 6))
    options = FitOptions(geometry=geometry)
    ops = backend.ops
    like = backend.array(np.zeros(1, np.float32))
    rng = np.random.default_rng(31)
    factors = init_factors(plan, 1.0, like, ops, options.state_is_p)
    lips = init_lipschitz(plan, like, ops)
    shape = (1, *plan.block_shape)

    def step(factors, lips, scale):
        x = backend.array((rng.standard_normal(shape) * scale).astype(np.float32))
        noise = backend.array(rng.standard_normal(shape).astype(np.float32))
        return fit(factors, lips, x, noise, lr=0.1, options=options, ops=ops)

    factors, lips = step(factors, lips, 1.0)
    kept_factors, kept_lips = step(factors, lips, 1e25)
    expected = balance(factors, ops) if geometry == "QEP" else factors
    for new, old in zip(kept_factors + kept_lips, expected + lips):
        np.testing.assert_array_equal(backend.numpy(new), backend.numpy(old))
    after_factors, _ = step(kept_factors, kept_lips, 1.0)
    assert any(
        not np.array_equal(backend.numpy(new), backend.numpy(old))
        for new, old in zip(after_factors, kept_factors)
    )


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid:RuntimeWarning")
@pytest.mark.parametrize("geometry", ALL_GEOMETRIES)
def test_a_gram_near_the_float32_limit_does_not_blow_up_the_factors(backend, geometry):
    """A gradient of ±5e18 gives a finite float32 T1 of entries ±1e38. The norm bound must not
    collapse there (XLA:CPU divides by ``max|T1|`` through its reciprocal, a subnormal that it
    flushes to zero, which made the bound 0 and the step μ/L huge): the factors stay finite and
    near where they were."""
    plan = make_plan((4, 3), LayoutOptions(max_skew=math.inf))
    options = FitOptions(geometry=geometry)
    ops = backend.ops
    like = backend.array(np.zeros(1, np.float32))
    factors = init_factors(plan, 1.0, like, ops, options.state_is_p)
    lips = init_lipschitz(plan, like, ops)
    signs = np.where(np.arange(12).reshape(1, 4, 3) % 2 == 0, 1.0, -1.0).astype(np.float32)
    noise = backend.array(np.zeros((1, 4, 3), np.float32))
    new, _ = fit(
        factors, lips, backend.array(signs * 5e18), noise, lr=0.1, options=options, ops=ops
    )
    for f in new:
        f = backend.numpy(f)
        assert np.all(np.isfinite(f)) and np.abs(f).max() < 10.0, f


def test_fit_ignores_padding(backend):
    """Garbage in the padded entries never reaches the factors (mask zeroes it)."""
    plan = make_plan((20, 6), LayoutOptions(block_size=8))
    mask = plan.mask()
    ops = backend.ops
    rng = np.random.default_rng(31)
    x = rng.standard_normal(mask.shape) * mask
    noise = rng.standard_normal(mask.shape)
    outs = []
    for garbage in (0.0, 1e6):
        polluted = x + garbage * (1 - mask)
        like = backend.array(np.zeros(1))
        factors, _ = fit(
            init_factors(plan, 1.0, like, ops),
            init_lipschitz(plan, like, ops),
            backend.array(polluted),
            backend.array(noise),
            lr=0.1,
            options=FitOptions(),
            ops=ops,
            mask=backend.array(mask),
        )
        outs.append([backend.numpy(f) for f in factors])
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


def test_shared_scale_uses_the_largest_finite_moment(backend):
    ops = backend.ops
    small, large = backend.array(np.float64(1e-4)), backend.array(np.float64(16.0))
    broken = backend.array(np.float64(np.nan))
    shared = backend.numpy(shared_scale([small, large, broken], ops, damping=0.0))
    assert shared == pytest.approx(16.0 ** (-1 / 8))
    per_tensor = backend.numpy(scale_from_moments(small, ops, damping=0.0))
    assert per_tensor > shared  # the shared rule is the conservative one
    assert backend.numpy(shared_scale([broken], ops)) == 1.0


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_finite_rows_equals_all_isfinite_even_where_a_sum_would_overflow(backend, dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((12, 4, 5)).astype(dtype)
    x[1] = np.finfo(dtype).max  # finite, though its plain sum overflows
    x[2, 0, 0] = np.nan
    x[3, 1, 1], x[3, 2, 2] = np.inf, -np.inf
    x[4, 3, 4] = -np.inf
    expected = np.isfinite(x).all(axis=(1, 2))
    flags = backend.numpy(finite_rows(backend.array(x), backend.ops))
    np.testing.assert_array_equal(flags, expected)
    assert expected[1] and not expected[2:5].any() and expected[5:].all()
    flat = backend.numpy(finite_rows(backend.array(x[:, 0, 0]), backend.ops))
    np.testing.assert_array_equal(flat, np.isfinite(x[:, 0, 0]))
