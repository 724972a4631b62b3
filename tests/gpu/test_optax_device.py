"""kron.optax on an accelerator: the jitted step follows the CPU's trajectory (JAX's random bits
do not depend on the device) and learns with the TF32 fit that psgdax also uses by default."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kron.optax

PLATFORM = {"cuda": "gpu"}.get(os.environ.get("KRON_TEST_DEVICE", "cuda"), "cpu")
DEVICE, CPU = jax.devices(PLATFORM)[0], jax.devices("cpu")[0]


def problem(device):
    """A two-layer regression with a matrix, a vector and a 3-D leaf, placed on ``device``."""
    rng = np.random.default_rng(0)
    params = {
        "w1": rng.standard_normal((16, 32)) / 4,
        "b1": np.zeros(32),
        "w2": rng.standard_normal((32, 4)) / 6,
        "conv": rng.standard_normal((3, 4, 5)) / 3,
    }
    x = rng.standard_normal((64, 16))
    y = rng.standard_normal((64, 4))
    put = lambda tree: jax.device_put(jax.tree.map(jnp.float32, tree), device)  # noqa: E731
    return put(params), put(x), put(y)


def loss_fn(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    out = h @ params["w2"] + jnp.sum(params["conv"]) * 1e-2
    return jnp.mean((out - y) ** 2)


def run(device, steps=30, **options):
    params, x, y = problem(device)
    tx = kron.optax.kron(learning_rate=3e-3, preconditioner_update_probability=0.5, **options)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert all(leaf.devices() == {device} for leaf in jax.tree.leaves(params))
    return jax.device_get(params), losses


def test_the_device_follows_the_cpu_trajectory_at_full_precision():
    options = dict(precond_update_precision="highest", precond_grads_precision="highest")
    with jax.default_matmul_precision("highest"):
        on_device, _ = run(DEVICE, **options)
        on_cpu, _ = run(CPU, **options)
    for a, b in zip(jax.tree.leaves(on_device), jax.tree.leaves(on_cpu)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_the_default_tf32_fit_learns_on_the_device():
    _, losses = run(DEVICE, steps=100)
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), (losses[:5], losses[-5:])
