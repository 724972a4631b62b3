"""``Kron.apply`` equals a NumPy loop over ``kron.core`` fed the same random draws (float32)."""

from __future__ import annotations

import contextlib
import math

import keras
import numpy as np
import pytest

from kron.core import FitOptions, LayoutOptions, StepOptions
from kron.keras import Kron

from ._helpers import reference_trajectory, to_numpy

SHAPES = [(6, 5), (5,), (3, 4, 2), ()]

CASES = {
    # name: Kron options; every case fits on some steps and not on others or balances.
    "Q0.5EQ1.5": dict(preconditioner_mode="Q0.5EQ1.5"),
    "EQ-uncached-decay": dict(preconditioner_mode="EQ", cached=False, weight_decay=0.1),
    "QUAD-blocks-autoscale-grad": dict(
        preconditioner_mode="QUAD",
        block_size=4,
        precond_init_scale=None,
        momentum_into_precond_update=False,
    ),
    "QEP-meanabs-rowcol-value": dict(
        preconditioner_mode="QEP",
        damping_rule="mean_abs",
        norm_bound="rowcol",
        update_clipping="value",
        update_clip_value=0.5,
        max_skew_triangular=1.0,
    ),
}


def _expected_step_options(options: dict) -> StepOptions:
    """The core options of ``options`` built by hand from docs/keras.md's option table (not read
    from the optimizer under test, whose mapping this checks)."""
    clipping = options.get("update_clipping", "rms")
    clip_value = options.get("update_clip_value", 1.1)
    return StepOptions(
        layout=LayoutOptions(
            max_size=8192,
            max_skew=options.get("max_skew_triangular", math.inf),
            min_ndim_dense=2,
            block_size=options.get("block_size"),
        ),
        fit=FitOptions(
            geometry=options.get("preconditioner_mode", "Q0.5EQ1.5"),
            beta_lipschitz=0.9,
            damping=1e-9,
            damping_rule=options.get("damping_rule", "elementwise"),
            norm_bound=options.get("norm_bound", "power"),
        ),
        beta=0.9,
        momentum_rule="debiased_ema",
        whiten_momentum=options.get("momentum_into_precond_update", True),
        cache=options.get("cached", True),
        clip_rms=clip_value if clipping == "rms" else None,
        clip_max=clip_value if clipping == "value" else None,
    )


def _run_kron(
    options: dict, params: list, grads: list, compiled: bool = False, dtype: str = "float32"
) -> list:
    """Parameters after applying ``grads``, eagerly or in one compiled step."""
    variables = [keras.Variable(p, dtype=dtype) for p in params]
    optimizer = Kron(**options)
    optimizer.build(variables)
    if compiled and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        step = tf.function(lambda gs: optimizer.apply(gs, variables), jit_compile=True)
        for gs in grads:
            step([tf.constant(g) for g in gs])
        assert step.experimental_get_tracing_count() == 1
    elif compiled and keras.backend.backend() == "jax":
        import jax

        @jax.jit
        def step(opt_values, values, gs):
            return optimizer.stateless_apply(opt_values, gs, values)

        values, opt_values = [v.value for v in variables], [v.value for v in optimizer.variables]
        for gs in grads:
            values, opt_values = step(opt_values, values, gs)
        assert step._cache_size() == 1
        return [np.asarray(v) for v in values]
    elif compiled and keras.backend.backend() == "torch":
        import torch

        step = torch.compile(lambda gs: optimizer.apply(gs, variables), backend="aot_eager")
        for gs in grads:
            step([keras.ops.convert_to_tensor(g) for g in gs])
    else:
        for gs in grads:
            optimizer.apply([keras.ops.convert_to_tensor(g, dtype) for g in gs], variables)
    return [to_numpy(v) for v in variables]


@pytest.mark.parametrize("name", list(CASES))
def test_apply_matches_core(name: str) -> None:
    rng = np.random.default_rng(1)
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(6)]
    options = dict(
        learning_rate=0.05,
        preconditioner_update_probability=0.5,  # counter rule: fits on steps 2, 4, 6
        balance_probability=1.0,
        seed=7,
        **CASES[name],
    )
    got = _run_kron(options, params, grads, compiled=keras.backend.backend() == "jax")
    want = reference_trajectory(
        params,
        grads,
        options=_expected_step_options(options),
        learning_rate=0.05,
        weight_decay=options.get("weight_decay", 0.0),
        probability=0.5,
        precond_lr=0.1,
        precond_init_scale=options.get("precond_init_scale", 1.0),
        balance_probability=1.0,
        seed=7,
    )
    for g, w, p in zip(got, want, params):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
        assert not np.allclose(g, p)  # the parameters did move


@pytest.mark.parametrize("name", ["Q0.5EQ1.5", "EQ-uncached-decay"])
def test_apply_matches_core_in_float64(name: str) -> None:
    """With float64 variables and factors every backend computes the fit in float64 (on PyTorch
    Keras's own matmul, maximum and minimum would compute in float32, and Q0.5EQ1.5 never
    fitted) and follows the core. Keras keeps the learning rate and the step count in float32
    scalars, which is what the tolerance allows for (measured: 1e-12 on JAX, 2e-9 on
    TensorFlow, 6e-8 on PyTorch). JAX needs x64, switched on here for the run."""
    rng = np.random.default_rng(2)
    params = [rng.standard_normal(s) for s in SHAPES]
    grads = [[rng.standard_normal(s) for s in SHAPES] for _ in range(6)]
    options = dict(
        learning_rate=0.05,
        preconditioner_update_probability=0.5,
        balance_probability=1.0,
        seed=7,
        precond_dtype="float64",
        **CASES[name],
    )
    with _float64_enabled():
        got = _run_kron(options, params, grads, dtype="float64")
        want = reference_trajectory(
            params,
            grads,
            options=_expected_step_options(options),
            # Keras keeps the learning rate (and so lr·wd) in a float32 variable.
            learning_rate=float(np.float32(0.05)),
            weight_decay=options.get("weight_decay", 0.0),
            probability=0.5,
            precond_lr=0.1,
            precond_init_scale=1.0,
            balance_probability=1.0,
            seed=7,
            dtype="float64",
        )
    # Each backend's measured error, times a few: a float32 product anywhere (1e-7) fails on
    # JAX and TensorFlow.
    rtol = {"jax": 1e-10, "tensorflow": 1e-8, "torch": 3e-7}[keras.backend.backend()]
    for g, w in zip(got, want):
        assert g.dtype == np.float64
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * 1e-3)


def _float64_enabled():
    if keras.backend.backend() != "jax":
        return contextlib.nullcontext()
    import jax

    return jax.enable_x64(True)


def test_compiled_apply_matches_eager_without_retracing() -> None:
    """Under ``tf.function(jit_compile=True)`` / ``jax.jit`` the step is traced once although
    the fit decision changes from step to step, and gives the eager result; so does
    ``torch.compile`` (Keras's ``jit_compile=True`` on PyTorch), whose host-decided fit breaks
    the graph instead."""
    rng = np.random.default_rng(2)
    shapes = [(6, 5), (5,)]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(4)]
    options = dict(learning_rate=0.05, preconditioner_update_probability=0.5, seed=3)
    eager = _run_kron(options, params, grads, compiled=False)
    compiled = _run_kron(options, params, grads, compiled=True)
    for a, b in zip(eager, compiled):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_steps_draw_what_eager_steps_draw() -> None:
    """Every random choice (the Bernoulli fit decision, the balancing draw, the subspace norm
    probes, the damping noise) is the same compiled and eager, so a run trained under XLA and
    resumed eagerly (or debugged with ``run_eagerly``) follows one trajectory. TensorFlow's own
    stateless generators switch algorithm under XLA; eager and compiled then parted by 5e-3."""
    rng = np.random.default_rng(4)
    shapes = [(6, 5), (5,)]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(6)]
    options = dict(
        learning_rate=0.05,
        preconditioner_update_probability=0.5,
        decision_rule="bernoulli",
        balance_probability=0.5,
        norm_bound="subspace",
        seed=5,
    )
    eager = _run_kron(options, params, grads, compiled=False)
    compiled = _run_kron(options, params, grads, compiled=True)
    for a, b in zip(eager, compiled):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
