"""Run by test_mesh.py in its own process (the host device count is fixed when JAX starts, so the
test sets ``XLA_FLAGS=--xla_force_host_platform_device_count=N``). For ``kron`` and ``quad`` it
trains one small model twice for 10 steps, the factor stacks split over a mesh axis of all N
devices:

* on one device with no mesh (the same options, so the same padded state layout), and
* on an N-device mesh, params, momentum and updates FSDP-sharded over the same axis,

and prints a JSON report on its last line: largest differences of params and of every state
leaf, leaves not placed as the spec helper says, rows each device holds of each factor stack,
optimizer-state bytes on device 0 (and of the unsharded state for comparison), and how far a
different RNG key moves the params (so a parity bound is known to be able to fail).
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from kron.optax import get_opt_state_partition_specs, kron, kron_partition_specs, quad
from kron.optax.sharding import bytes_on

AXIS = "dp"
STEPS = 10
BATCH = 16
# Two unscanned 24×24 weights and a scanned stack of 3 more share one layout (5 rows, padded to
# 8); the biases another (4 rows); the head is alone in its own (1 row, padded to N). Every
# dimension divides by 8, so the params can be split over 8 devices.
SHAPES = {
    "w1": (24, 24),
    "b1": (24,),
    "w2": (24, 24),
    "scan_w": (3, 24, 24),
    "scan_b": (3, 24),
    "head": (24, 8),
}
SCANNED = {name: name.startswith("scan") for name in SHAPES}
SPECS = {
    name: PartitionSpec(None, AXIS, None)
    if name == "scan_w"
    else PartitionSpec(None, AXIS)
    if name == "scan_b"
    else PartitionSpec(AXIS, *([None] * (len(shape) - 1)))
    for name, shape in SHAPES.items()
}


def kron_options(devices: int) -> dict:
    # Damping 1e-2 and norm-bound probes make the noise visible in the params, so the parity
    # check also checks that each device draws what the unsharded run draws; p = 0.4 and a
    # balance chance of 0.5 exercise the decision and balance draws and the cached product.
    return dict(
        learning_rate=3e-2,
        preconditioner_update_probability=0.4,
        balance_probability=0.5,
        damping=1e-2,
        scanned_layers=SCANNED,
        pipeline_axis_name=AXIS,
        pipeline_axis_size=devices,
        params_partition_specs=SPECS,
    )


def quad_options(devices: int) -> dict:
    return dict(
        learning_rate=1e-2,
        block_size=8,
        dtype=jnp.float32,
        noise_scale=1e-2,
        scanned_layers=SCANNED,
        pipeline_axis_name=AXIS,
        pipeline_axis_size=devices,
        params_partition_specs=SPECS,
    )


OPTIMIZERS = {
    "kron": (kron, kron_options, kron_partition_specs),
    "quad": (quad, quad_options, get_opt_state_partition_specs),
}


def data():
    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(rng.standard_normal(s) * 0.2, jnp.float32) for k, s in SHAPES.items()}
    x = jnp.asarray(rng.standard_normal((BATCH, 24)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((BATCH, 8)), jnp.float32)
    return params, x, y


def loss(params, x, y):
    h = jnp.tanh(jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"])

    def layer(h, wb):
        return jnp.tanh(h @ wb[0] + wb[1]), None

    h, _ = jax.lax.scan(layer, h, (params["scan_w"], params["scan_b"]))
    return jnp.mean((h @ params["head"] - y) ** 2)


def make_step(tx, nan_in: str | None = None):
    def step(params, state, x, y):
        grads = jax.grad(loss)(params, x, y)
        if nan_in is not None:
            grads = {**grads, nan_in: grads[nan_in].at[0, 0].set(jnp.nan)}
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def train(params, state, step, x, y):
    for _ in range(STEPS):
        params, state = step(params, state, x, y)
    return params, state


def max_diff(a, b) -> float:
    """Largest ``|a - b|`` over the leaves of two trees."""
    return max(
        float(jnp.max(jnp.abs(jnp.asarray(u, jnp.float32) - jnp.asarray(v, jnp.float32))))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def max_relative_diff(a, b) -> float:
    """Largest ``|a - b| / max|b|`` over the leaves of two trees (each leaf on its own scale:
    Lipschitz estimates run in the thousands, factors near 1)."""
    return max(
        max_diff(u, v) / max(float(jnp.max(jnp.abs(jnp.asarray(v, jnp.float32)))), 1e-30)
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


COLLECTIVE = re.compile(r" (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)")


def collectives_in_conditionals(hlo: str) -> list[str]:
    """Collectives reachable from a branch of a ``conditional`` in compiled HLO text. XLA:CPU can
    run a conditional at the same time as a collective outside it, and host devices then wait
    on each other forever, so the optimizer keeps every collective out of its ``lax.cond``s."""
    bodies: dict[str, list[str]] = {}
    name = None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            name = header.group(1)
            bodies[name] = []
        elif name is not None:
            bodies[name].append(line)

    def reachable(computation: str, seen: set) -> list[str]:
        if computation in seen:
            return []
        seen.add(computation)
        found = []
        for line in bodies.get(computation, []):
            if match := COLLECTIVE.search(line):
                found.append(match.group(1))
            for called in re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", line):
                found += reachable(called, seen)
            branches = re.search(r"branch_computations=\{([^}]*)\}", line)
            for called in re.findall(r"%([\w.\-]+)", branches.group(1) if branches else ""):
                found += reachable(called, seen)
        return found

    found = []
    for lines in bodies.values():
        for line in lines:
            branches = re.search(r"conditional\(.*branch_computations=\{([^}]*)\}", line)
            for branch in re.findall(r"%([\w.\-]+)", branches.group(1) if branches else ""):
                found += reachable(branch, set())
    return found


def control_hlo(mesh, devices: int) -> str:
    """A program that does have a collective in a conditional (a sum over a sharded vector in a
    ``lax.cond``), so the check above is known to find one."""
    f = jax.jit(
        lambda flag, v: jax.lax.cond(flag, lambda: jnp.sum(v), lambda: jnp.float32(0)),
        in_shardings=(None, NamedSharding(mesh, PartitionSpec(AXIS))),
    )
    return f.lower(True, jnp.ones(8 * devices)).compile().as_text()


def with_key(state, key):
    """The chained state with the KronState's PRNG key replaced."""
    return (state[0].replace(key=key), *state[1:])


def run(name: str, devices: int, params, x, y) -> dict:
    factory, make_options, specs_of = OPTIMIZERS[name]
    options = make_options(devices)
    tx = factory(**options)
    step = make_step(tx)

    single_state = jax.jit(tx.init)(params)
    single_params, single_state = train(params, single_state, jax.jit(step), x, y)

    mesh = jax.make_mesh((devices,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
    is_spec = lambda s: isinstance(s, PartitionSpec)  # noqa: E731
    named = lambda tree: jax.tree.map(lambda s: NamedSharding(mesh, s), tree, is_leaf=is_spec)  # noqa: E731
    with jax.set_mesh(mesh):
        param_shardings = named(SPECS)
        sharded = jax.device_put(params, param_shardings)
        specs = specs_of(sharded, **options)
        state_shardings = named(specs)
        start = jax.jit(tx.init, out_shardings=state_shardings)(sharded)
        mesh_step = (
            jax.jit(
                step,
                in_shardings=(param_shardings, state_shardings, None, None),
                out_shardings=(param_shardings, state_shardings),
            )
            .lower(sharded, start, x, y)
            .compile()
        )
        mesh_params, mesh_state = train(sharded, start, mesh_step, x, y)
        # One step whose head gradient holds a NaN in device 0's shard: a maximum that XLA
        # splits over the devices drops NaN, and that check once let it into the state.
        nan_step = jax.jit(
            make_step(tx, nan_in="head"),
            in_shardings=(param_shardings, state_shardings, None, None),
            out_shardings=(param_shardings, state_shardings),
        )
        after_nan, state_after_nan = nan_step(mesh_params, mesh_state, x, y)
        # The same run from another key (the compiled step is reused): how far the RNG alone
        # moves the params, i.e. what a sharded run drawing different noise would be off by.
        other_key = jax.device_put(jax.random.PRNGKey(7), NamedSharding(mesh, PartitionSpec()))
        other_params, _ = train(sharded, with_key(start, other_key), mesh_step, x, y)

    flat_specs = jax.tree.leaves(specs, is_leaf=is_spec)
    leaves = jax.tree.leaves(mesh_state)
    mismatched = [
        f"{leaf.shape}: {leaf.sharding.spec} != {spec}"
        for leaf, spec in zip(leaves, flat_specs)
        if not leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim)
    ]
    kron_state = mesh_state[0]
    device0 = mesh.devices.flat[0]
    unsharded = jax.eval_shape(
        factory(**{**options, "pipeline_axis_name": None, "pipeline_axis_size": 1}).init, params
    )
    return {
        "param_diff": max_diff(single_params, mesh_params),
        "state_relative_diff": max_relative_diff(mesh_state, single_state),
        "other_key_param_diff": max_diff(mesh_params, other_params),
        "spec_leaves": len(flat_specs),
        "state_leaves": len(leaves),
        "mismatched_specs": mismatched,
        "stack_rows": [f.shape[0] for f in jax.tree.leaves(kron_state.factors)],
        "stack_rows_on_device0": [
            f.addressable_shards[0].data.shape[0] for f in jax.tree.leaves(kron_state.factors)
        ],
        "state_bytes_device0": bytes_on(device0, mesh_state),
        "unsharded_state_bytes": sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(unsharded)),
        "param_bytes_device0": bytes_on(device0, mesh_params),
        "collectives_in_conditionals": collectives_in_conditionals(mesh_step.as_text()),
        "conditionals": mesh_step.as_text().count(" conditional("),
        "collectives": len(COLLECTIVE.findall(mesh_step.as_text())),
        "nan_leaf_kept": bool(jnp.array_equal(after_nan["head"], mesh_params["head"])),
        "nan_skips": int(
            sum(jnp.sum(a) for a in jax.tree.leaves(state_after_nan[0].skipped))
            - sum(jnp.sum(a) for a in jax.tree.leaves(kron_state.skipped))
        ),
        "nan_other_leaves_moved": max_diff(
            {k: v for k, v in after_nan.items() if k != "head"},
            {k: v for k, v in mesh_params.items() if k != "head"},
        ),
        "nan_state_finite": all(
            bool(jnp.isfinite(leaf).all())
            for leaf in jax.tree.leaves(state_after_nan)
            if jnp.issubdtype(leaf.dtype, jnp.floating)
        ),
    }


def main() -> None:
    devices = jax.device_count()
    params, x, y = data()
    mesh = jax.make_mesh((devices,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
    report = {
        "devices": devices,
        "control_collectives_in_conditionals": collectives_in_conditionals(
            control_hlo(mesh, devices)
        ),
    }
    for name in OPTIMIZERS:
        report[name] = run(name, devices, params, x, y)
    report["per_leaf_mu_mismatches"] = per_leaf_mu_mismatches(mesh, params, x, y)
    print(json.dumps(report))


def per_leaf_mu_mismatches(mesh, params, x, y) -> list[str]:
    """With ``params_partition_specs`` but no ``pipeline_axis_name`` (a state per leaf), the
    momentum is still pinned to the params' specs, after ``init`` and after a step."""
    is_spec = lambda s: isinstance(s, PartitionSpec)  # noqa: E731
    tx = kron(learning_rate=1e-2, scanned_layers=SCANNED, params_partition_specs=SPECS)
    with jax.set_mesh(mesh):
        sharded = jax.device_put(
            params, jax.tree.map(lambda s: NamedSharding(mesh, s), SPECS, is_leaf=is_spec)
        )
        state = jax.jit(tx.init)(sharded)
        _, stepped = jax.jit(make_step(tx))(sharded, state, x, y)
    return [
        f"{when} {name}: {leaf.sharding.spec} != {SPECS[name]}"
        for when, kron_state in (("init", state[0]), ("step", stepped[0]))
        for name, leaf in kron_state.mu.items()
        if not leaf.sharding.is_equivalent_to(NamedSharding(mesh, SPECS[name]), leaf.ndim)
    ]


if __name__ == "__main__":
    main()
