"""kron.optax reproduces kron.core step for step (float64, same noise), for every geometry, with
whitening and Newton pairs; scanned leaves equal the same layers given as separate leaves; the
``lax.map`` path equals the batched one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kron.core import (
    GEOMETRIES,
    FitOptions,
    LayoutOptions,
    StepOptions,
    TensorState,
    balance,
    get_ops,
    init_factors,
    init_lipschitz,
    kron_step,
    make_plan,
)
from kron.optax import leaf_key, scale_by_kron
from kron.optax.fitting import BALANCE, NEWTON_PROBE, NOISE

OPS = get_ops("jax")
STEPS = 50
SHAPES = {"w": (5, 3), "v": (4,)}
# A fixed SPD Hessian per leaf for the Newton runs: loss = ½ Σ vec(w)ᵀ H vec(w).
HESSIANS = {
    name: (lambda a: a @ a.T + np.eye(a.shape[0]))(
        np.random.default_rng(i).standard_normal((int(np.prod(s)),) * 2)
    )
    for i, (name, s) in enumerate(SHAPES.items())
}


def loss(params):
    return sum(
        0.5 * jnp.vdot(params[k].ravel(), jnp.asarray(HESSIANS[k]) @ params[k].ravel())
        for k in SHAPES
    )


def grads_at(step: int):
    rng = np.random.default_rng(100 + step)
    return {k: jnp.asarray(rng.standard_normal(s)) for k, s in SHAPES.items()}


def transform(geometry: str, newton: bool, balance_probability: float = 0.0, **kwargs):
    return scale_by_kron(
        preconditioner_mode=geometry,
        preconditioner_update_probability=1.0,
        norm_bound="power",
        balance_probability=balance_probability,
        precond_dtype=jnp.float64,
        max_skew_triangular=float("inf"),
        min_ndim_triangular=2,
        preconditioner_type="newton" if newton else "whitening",
        **kwargs,
    )


@pytest.mark.parametrize("newton", [False, True], ids=["whitening", "newton"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_reproduces_the_core(geometry, newton):
    _check_against_the_core(geometry, newton)


# One geometry: the engine's balancing does not depend on it (the NumPy parity test balances
# PRO4P's P factors too), and each run here is mostly a few seconds of compiling.
@pytest.mark.parametrize("geometry", ["Q0.5EQ1.5"])
def test_balancing_reproduces_the_core(geometry):
    """At balance probability 0.5 the (5, 3) leaf's two factors are rebalanced on the fits whose
    balance draw (one uniform per stack from the state's key) says so (6 of the 12 here), as the
    core's loop does. Balancing leaves the preconditioner, hence the updates, unchanged: the
    factors, compared after every step, are what tell a run that balances on the wrong steps, or
    never, from this one."""
    balanced = _check_against_the_core(geometry, False, balance_probability=0.5, steps=12)
    assert 3 <= balanced < 12  # the branch ran, on the steps the draws chose


def _check_against_the_core(geometry, newton, balance_probability=0.0, steps=STEPS):
    """scale_by_kron against kron.core's loop, step by step; returns how many steps balanced the
    (5, 3) leaf (the (4,) leaf has one factor: nothing to balance)."""
    tx = transform(geometry, newton, balance_probability)
    params = {
        k: jnp.asarray(np.random.default_rng(9).standard_normal(s)) for k, s in SHAPES.items()
    }
    state = tx.init(params)
    layout = LayoutOptions(max_size=8192, max_skew=float("inf"), min_ndim_dense=2)
    options = StepOptions(
        layout=layout,
        fit=FitOptions(geometry=geometry, norm_bound="power"),
        beta=0.9,
        clip_rms=1.0,
        clip_max=None,
    )
    like = jnp.zeros((), jnp.float64)
    # The tree flattens as (v, w); each leaf is its own stack, in that order.
    names = sorted(SHAPES)
    plans = {k: make_plan(SHAPES[k], layout) for k in names}
    reference = {
        k: TensorState(
            tuple(init_factors(plans[k], 1.0, like, OPS, options.fit.state_is_p)),
            tuple(init_lipschitz(plans[k], like, OPS)),
            jnp.zeros((1, *SHAPES[k])),
        )
        for k in names
    }
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=loss))

    def core_step(plan):
        def run(state, grad, count, noise, pair):
            return kron_step(
                state,
                grad,
                count,
                noise,
                plan=plan,
                options=options,
                precond_lr=0.1,
                do_fit=True,
                ops=OPS,
                **pair,
            )

        return jax.jit(run)

    core_steps = {k: core_step(plans[k]) for k in names}
    balanced = 0
    for step in range(steps):
        grads = grads_at(step)
        updates, new_state = update(grads, state, params)
        count = jnp.int32(step)
        # One balance uniform per stack; every step fits (update probability 1).
        draws = jax.random.uniform(leaf_key(state.key, count, 0, BALANCE), (len(names),))
        for index, k in enumerate(names):
            plan = plans[k]
            batch = (1, *plan.block_shape)
            pair = {}
            if newton:
                v = jax.random.normal(leaf_key(state.key, count, index, NEWTON_PROBE), SHAPES[k])
                h = jnp.asarray(HESSIANS[k]) @ v.ravel()
                pair = {
                    "probe": plan.to_blocks(v[None], OPS, stacked=True),
                    "hvp": plan.to_blocks(jnp.reshape(h, (1, *SHAPES[k])), OPS, stacked=True),
                }
            noise = jax.random.normal(leaf_key(state.key, count, index, NOISE), batch, jnp.float64)
            y, reference[k] = core_steps[k](reference[k], grads[k][None], float(step), noise, pair)
            if draws[index] < balance_probability and len(reference[k].factors) > 1:
                reference[k] = reference[k]._replace(
                    factors=tuple(balance(reference[k].factors, OPS))
                )
                balanced += 1
            np.testing.assert_allclose(updates[k], y[0], rtol=1e-9, atol=1e-12)
            for a, b in zip(new_state.factors[k], reference[k].factors, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12, err_msg=f"step {step}")
        state = new_state
    for k in names:
        for a, b in zip(state.factors[k], reference[k].factors, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(state.mu[k], reference[k].momentum[0], rtol=1e-12)
    return balanced


def _run(tx, params, steps=8, key=0):
    state = tx.init(params)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(key)
    outputs = []
    for _ in range(steps):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), params)
        updates, state = update(grads, state, params)
        outputs.append(updates)
    return outputs, state


@pytest.mark.parametrize("geometry", ["Q0.5EQ1.5", "EQ", "QUAD"])
def test_scanned_leaf_equals_separate_layers(geometry):
    """A (3, 6, 4) leaf marked scanned is 3 layers with their own factors and statistics: the
    same numbers as three (6, 4) leaves (the whitening target uses the layer size, not the stack
    size, the error psgdax makes)."""
    layers = 3
    common = dict(preconditioner_mode=geometry, preconditioner_update_probability=1.0, seed=3)
    stacked = {"w": jnp.zeros((layers, 6, 4))}
    separate = {f"w{i}": jnp.zeros((6, 4)) for i in range(layers)}
    scanned_out, scanned_state = _run(scale_by_kron(scanned_layers={"w": True}, **common), stacked)

    # Feed the separate leaves the scanned run's gradients, layer by layer.
    tx = scale_by_kron(**common)
    state = tx.init(separate)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(0)
    for step in range(len(scanned_out)):
        g = jnp.asarray(rng.standard_normal((layers, 6, 4)))
        updates, state = update({f"w{i}": g[i] for i in range(layers)}, state, separate)
        for i in range(layers):
            np.testing.assert_allclose(
                updates[f"w{i}"], scanned_out[step]["w"][i], rtol=2e-6, atol=1e-6
            )
    # Per-layer Lipschitz estimates differ between layers: statistics are not shared.
    lips = np.asarray(scanned_state.lipschitz["w"][0])
    assert lips.shape == (layers,) and len(np.unique(lips)) == layers


@pytest.mark.parametrize("batch_size", [1, 3])
def test_lax_map_path_equals_batched(batch_size):
    params = {"w": jnp.zeros((4, 6, 5)), "b": jnp.zeros((4, 5))}
    scanned = {"w": True, "b": True}
    common = dict(
        preconditioner_update_probability=1.0,
        scanned_layers=scanned,
        precond_dtype=jnp.float64,
    )
    batched, batched_state = _run(scale_by_kron(**common), params)
    mapped, mapped_state = _run(
        scale_by_kron(lax_map_scanned_layers=True, lax_map_batch_size=batch_size, **common), params
    )
    for a, b in zip(
        jax.tree.leaves((batched, batched_state)), jax.tree.leaves((mapped, mapped_state))
    ):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_scanned_layers_structure_mismatch_raises():
    tx = scale_by_kron(scanned_layers={"w": True})
    with pytest.raises(ValueError, match="structure of the params"):
        tx.init({"w": jnp.zeros((2, 3, 3)), "b": jnp.zeros(3)})


def test_scanned_layers_as_a_function_of_params():
    params = {"w": jnp.zeros((2, 3, 3)), "b": jnp.zeros(3)}
    tx = scale_by_kron(scanned_layers=lambda p: {"w": True, "b": False})
    state = tx.init(params)
    assert state.factors["w"][0].shape == (2, 3, 3)
    assert state.factors["b"][0].shape == (1, 3)


def test_same_shape_leaves_share_one_stack():
    """Equal plans are stacked, so two (6, 4) leaves draw their noise from one stack: the run
    equals a scanned (2, 6, 4) leaf."""
    params = {"a": jnp.zeros((6, 4)), "b": jnp.zeros((6, 4))}
    out, _ = _run(scale_by_kron(preconditioner_update_probability=1.0), params)
    # _run draws one gradient per leaf in tree order (a, b); feed the stacked leaf the same.
    tx = scale_by_kron(preconditioner_update_probability=1.0, scanned_layers={"w": True})
    state = tx.init({"w": jnp.zeros((2, 6, 4))})
    rng = np.random.default_rng(0)
    for step in range(len(out)):
        ga, gb = (jnp.asarray(rng.standard_normal((6, 4))) for _ in range(2))
        updates, state = jax.jit(tx.update)({"w": jnp.stack([ga, gb])}, state)
        np.testing.assert_allclose(updates["w"][0], out[step]["a"], rtol=2e-6, atol=1e-6)
        np.testing.assert_allclose(updates["w"][1], out[step]["b"], rtol=2e-6, atol=1e-6)


def test_newton_needs_value_fn():
    tx = scale_by_kron(preconditioner_type="newton")
    params = {"w": jnp.zeros((3, 3))}
    state = tx.init(params)
    with pytest.raises(ValueError, match="value_fn"):
        tx.update(params, state, params)
    with pytest.raises(ValueError, match="preconditioner_type"):
        scale_by_kron(preconditioner_type="hessian")


@pytest.mark.parametrize("geometry", ["Q0.5EQ1.5", "EQ", "PRO4P"])
def test_cached_preconditioner_gives_the_uncached_run(geometry):
    """With ``cached``, steps apply the stored ``P_i = Q_iᵀQ_i`` (refreshed on every fit); the
    run equals the uncached one to rounding and the cache always equals ``Q_iᵀQ_i`` of the
    factors (PRO4P stores P itself and keeps no cache)."""
    params = {"w": jnp.zeros((6, 5)), "v": jnp.zeros(7)}
    common = dict(
        preconditioner_mode=geometry,
        preconditioner_update_probability=0.3,
        precond_dtype=jnp.float64,
        max_skew_triangular=float("inf"),
        decision_rule="counter",
    )
    plain, plain_state = _run(scale_by_kron(cached=False, **common), params, steps=12)
    cached, cached_state = _run(scale_by_kron(cached=True, **common), params, steps=12)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(cached)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-13)
    assert plain_state.cache == {"v": (), "w": ()}
    if geometry == "PRO4P":
        assert cached_state.cache == {"v": (), "w": ()}
        return
    q, p = cached_state.factors["w"][0], cached_state.cache["w"][0]
    np.testing.assert_allclose(p, jnp.swapaxes(q, -1, -2) @ q, rtol=1e-12)
    np.testing.assert_allclose(cached_state.cache["v"][0], cached_state.factors["v"][0] ** 2)
