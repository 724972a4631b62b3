"""Random combinations of ``scale_by_kron``'s options on leaves of every order: each combination
that is a documented conflict (CONFLICTS) is refused with a ValueError naming one of its options,
and for every other one the jitted update keeps the state's shapes and dtypes, trains with finite
parameters, and leaves a leaf whose gradient holds a NaN untouched."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.conftest import Conflict, refused_as_documented

from kron.core import GEOMETRIES
from kron.optax import scale_by_kron

SHAPES = [(), (7,), (5, 3), (1, 9), (16, 4), (3, 4, 5), (2, 1, 6)]
OPTIONS = st.fixed_dictionaries(
    {
        "preconditioner_mode": st.sampled_from(GEOMETRIES),
        "memory_save_mode": st.sampled_from([None, "one_diag", "smart_one_diag", "all_diag"]),
        "max_size_triangular": st.sampled_from([4, 8192]),
        "max_skew_triangular": st.sampled_from([1.0, math.inf]),
        "min_ndim_triangular": st.sampled_from([1, 2, 3]),
        "whiten_grad": st.booleans(),
        "b1": st.sampled_from([0.9, 0.9, 0.0]),
        "preconditioner_init_scale": st.sampled_from([None, 1.0]),
        "preconditioner_update_probability": st.sampled_from([None, 1.0, 0.3]),
        "decision_rule": st.sampled_from(["counter", "bernoulli"]),
        "mu_dtype": st.sampled_from([None, jnp.bfloat16]),
        "precond_dtype": st.sampled_from([None, jnp.bfloat16]),
        "norm_bound": st.sampled_from(["power", "rowcol", "spd", "subspace"]),
        "track_lipschitz": st.booleans(),
        "grad_clip_max_amp": st.sampled_from([None, 1.0]),
        "cached": st.sampled_from([None, True, False]),
    }
)
# The combinations of OPTIONS that scale_by_kron must refuse; it must accept every other one.
CONFLICTS = [
    # docs/optax.md, whiten_grad: "False fits on the momentum (needs b1 > 0)"
    # (kron/optax/transform.py, scale_by_kron).
    Conflict(("whiten_grad", "b1"), lambda o: not o["whiten_grad"] and o["b1"] <= 0),
]


def loss(params):
    return sum(
        ((x.astype(jnp.float32) - 0.5) ** 2).sum() + 0.1 * (x.astype(jnp.float32) ** 4).sum()
        for x in jax.tree.leaves(params)
    )


def layout(tree):
    return jax.tree.map(lambda x: (x.shape, x.dtype), tree)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    options=OPTIONS,
    shapes=st.lists(st.sampled_from(SHAPES), min_size=2, max_size=3),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
)
def test_conflicts_are_refused_by_name_and_the_rest_step_safely(options, shapes, dtype):
    if refused_as_documented(scale_by_kron, options, CONFLICTS):
        return
    tx = scale_by_kron(**options)
    keys = jax.random.split(jax.random.PRNGKey(0), len(shapes))
    params = {f"p{i}": jax.random.normal(k, s, dtype) for i, (k, s) in enumerate(zip(keys, shapes))}
    start = params
    state = tx.init(params)
    before = layout(state)
    update = jax.jit(tx.update)
    for _ in range(3):
        updates, state = update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, jax.tree.map(lambda u: -0.01 * u, updates))
        assert layout(state) == before
    assert all(bool(jnp.isfinite(x.astype(jnp.float32)).all()) for x in jax.tree.leaves(params))
    # Every leaf moved: finite parameters alone would also pass for an update of zeros. (Not
    # checked in bfloat16, where a step of 0.01·u can be below half an ulp.)
    if dtype == jnp.float32:
        assert all(bool(jnp.any(params[k] != start[k])) for k in params)

    grads = jax.grad(loss)(params)
    grads["p0"] = grads["p0"].at[(0,) * grads["p0"].ndim].set(jnp.nan)
    updates, after = update(grads, state, params)
    assert not jnp.any(updates["p0"])
    kept = (state.mu["p0"], state.factors["p0"], state.lipschitz["p0"])
    for old, new in zip(
        jax.tree.leaves(kept),
        jax.tree.leaves((after.mu["p0"], after.factors["p0"], after.lipschitz["p0"])),
    ):
        np.testing.assert_array_equal(np.asarray(old), np.asarray(new))
    assert int(after.skipped["p0"]) == int(state.skipped["p0"]) + 1
    assert all(bool(jnp.isfinite(u.astype(jnp.float32)).all()) for u in jax.tree.leaves(updates))
