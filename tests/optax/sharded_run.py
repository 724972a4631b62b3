"""Run by test_quad_skew.py in its own process with 4 host devices: trains the same problem on one
device and on a 4-device mesh (params FSDP-sharded over "dp", factor block stacks split over
"dp"), and prints a JSON report on its last line."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from kron.optax import get_opt_state_partition_specs, quad

STEPS = 5
SHAPES = {"w": (64, 48), "b": (48,), "v": (48, 16)}
PARAM_SPECS = {
    "w": PartitionSpec("dp", None),
    "b": PartitionSpec(),
    "v": PartitionSpec("dp", None),
}
OPTIONS = dict(
    learning_rate=1e-2,
    block_size=16,
    dtype=jnp.float32,
    pipeline_axis_name="dp",
    pipeline_axis_size=4,
    params_partition_specs=PARAM_SPECS,
)


def data():
    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(rng.standard_normal(s) * 0.1, jnp.float32) for k, s in SHAPES.items()}
    x = jnp.asarray(rng.standard_normal((32, 64)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)
    return params, x, y


def loss(params, x, y):
    hidden = jnp.tanh(x @ params["w"] + params["b"])
    return jnp.mean((hidden @ params["v"] - y) ** 2)


def train(tx, params, x, y, init, step):
    state = init(params)
    for _ in range(STEPS):
        params, state = step(params, state, x, y)
    return params, state


def make_step(tx):
    def step(params, state, x, y):
        grads = jax.grad(loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def main() -> None:
    params, x, y = data()
    tx = quad(**OPTIONS)
    single_params, _ = train(tx, params, x, y, jax.jit(tx.init), jax.jit(make_step(tx)))

    mesh = jax.make_mesh((4,), ("dp",), axis_types=(jax.sharding.AxisType.Auto,))
    named = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    is_spec = lambda s: isinstance(s, PartitionSpec)  # noqa: E731
    with jax.set_mesh(mesh):
        param_shardings = jax.tree.map(named, PARAM_SPECS, is_leaf=is_spec)
        sharded = jax.device_put(params, param_shardings)
        specs = get_opt_state_partition_specs(sharded, **OPTIONS)
        state_shardings = jax.tree.map(named, specs, is_leaf=is_spec)
        init = jax.jit(tx.init, out_shardings=state_shardings)
        step = jax.jit(
            make_step(tx),
            in_shardings=(param_shardings, state_shardings, None, None),
            out_shardings=(param_shardings, state_shardings),
        )
        mesh_params, state = train(tx, sharded, x, y, init, step)

    flat_specs = jax.tree.leaves(specs, is_leaf=is_spec)
    mismatched = [
        f"{leaf.sharding.spec} != {spec}"
        for leaf, spec in zip(jax.tree.leaves(state), flat_specs)
        if not leaf.sharding.is_equivalent_to(named(spec), leaf.ndim)
    ]
    w_factor = state[0].factors["w"][0]
    report = {
        "devices": jax.device_count(),
        "max_abs_diff": max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(single_params), jax.tree.leaves(mesh_params))
        ),
        "mismatched_specs": mismatched,
        "w_factor_shard_rows": w_factor.addressable_shards[0].data.shape[0],
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
