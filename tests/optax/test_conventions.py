"""kron.optax inside optax's combinators, at import, and on a small real task."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kron.optax import kron, quad, scale_by_kron, skew, static_args

PARAMS = {"w": jnp.zeros((6, 4)), "b": jnp.zeros(4)}


def grads_at(step: int):
    rng = np.random.default_rng(step)
    return jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), PARAMS)


def test_masked_preconditions_only_the_selected_leaves():
    tx = optax.masked(scale_by_kron(), {"w": True, "b": False})
    state = tx.init(PARAMS)
    updates, _ = jax.jit(tx.update)(grads_at(1), state, PARAMS)
    np.testing.assert_array_equal(updates["b"], grads_at(1)["b"])  # passed through
    assert not np.allclose(updates["w"], grads_at(1)["w"])


def test_masked_with_a_params_shaped_scanned_layers_tree_steps_the_selected_leaves():
    """Under optax.masked the left-out leaves are MaskedNodes; a scanned_layers tree shaped like
    the full params must still fit: the selected leaves step as they would alone."""
    params = {"stack": jnp.zeros((3, 4, 4)), "w": jnp.zeros((5, 4)), "b": jnp.zeros(4)}
    flags = {"stack": True, "w": False, "b": False}
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    masked = optax.masked(
        scale_by_kron(scanned_layers=flags), {"stack": True, "w": False, "b": True}
    )
    alone = scale_by_kron(scanned_layers={"stack": True, "b": False})
    selected = {"stack": params["stack"], "b": params["b"]}
    updates, _ = jax.jit(masked.update)(grads, masked.init(params), params)
    expected, _ = alone.update({k: grads[k] for k in selected}, alone.init(selected), selected)
    np.testing.assert_array_equal(updates["w"], grads["w"])
    for name in selected:
        np.testing.assert_allclose(updates[name], expected[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("make", [kron, scale_by_kron, quad])
def test_no_parameters_to_precondition_is_a_no_op(make):
    """optax.multi_transform or optax.masked may leave a Kron transform no leaf at all."""
    tx = make()
    state = tx.init({})
    updates, new_state = jax.jit(tx.update)({}, state, {})
    assert updates == {}
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), new_state, state))
    labels = {"w": "adam", "b": "adam"}
    mixed = optax.multi_transform({"kron": make(), "adam": optax.adam(1e-3)}, labels)
    updates, _ = jax.jit(mixed.update)(grads_at(1), mixed.init(PARAMS), PARAMS)
    adam = optax.adam(1e-3)
    expected, _ = adam.update(grads_at(1), adam.init(PARAMS), PARAMS)
    for name in PARAMS:
        np.testing.assert_allclose(updates[name], expected[name], rtol=1e-6)


@pytest.mark.parametrize(
    "given",
    [
        dict(key=jax.random.PRNGKey(7)),
        dict(seed=jax.random.PRNGKey(7)),
        dict(key=jax.random.key(7)),
        dict(seed=7),
        dict(seed=np.int64(7)),
    ],
)
def test_psgdax_key_or_an_int_seed_gives_the_state_key(given):
    """psgdax takes the key itself (``key=PRNGKey(42)``); ours takes a seed or that key."""
    state = scale_by_kron(**given).init(PARAMS)
    np.testing.assert_array_equal(state.key, jax.random.PRNGKey(7))


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (dict(seed="7"), r"seed must be an int or a JAX PRNG key \(psgdax's key\); got '7'"),
        (dict(seed=3, key=jax.random.PRNGKey(7)), r"seed and key \(psgdax's name\) both set"),
        (dict(seed=jnp.zeros(3, jnp.uint32)), "seed must be an int or a JAX PRNG key"),
    ],
)
def test_a_bad_seed_or_key_is_named(given, message):
    with pytest.raises(ValueError, match=message):
        scale_by_kron(**given)


def test_lax_map_batch_size_takes_a_numpy_integer():
    tx = scale_by_kron(scanned_layers={"w": True, "b": False}, lax_map_scanned_layers=True)
    numpy_sized = scale_by_kron(
        scanned_layers={"w": True, "b": False},
        lax_map_scanned_layers=True,
        lax_map_batch_size=np.int64(2),
    )
    params = {"w": jnp.zeros((4, 3, 3)), "b": jnp.zeros(3)}
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    ours, _ = numpy_sized.update(grads, numpy_sized.init(params), params)
    reference, _ = tx.update(grads, tx.init(params), params)
    for name in params:
        np.testing.assert_allclose(ours[name], reference[name], rtol=1e-6, atol=1e-7)


def test_multi_steps_accumulates_and_emits_every_k():
    tx = optax.MultiSteps(kron(learning_rate=1e-2), every_k_schedule=3)
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    for step in range(6):
        updates, state = update(grads_at(step), state, PARAMS)
        emitted = step % 3 == 2
        assert bool(any(jnp.any(u != 0) for u in jax.tree.leaves(updates))) == emitted
    assert int(state.inner_opt_state[0].count) == 2


def test_update_inside_scan_keeps_the_carry_type():
    """A lax.scan carry must keep dtypes and shapes: the state does, bf16 params included."""
    params = {"w": jnp.zeros((6, 4), jnp.bfloat16), "b": jnp.zeros(4)}
    tx = kron(learning_rate=1e-2)

    def body(carry, g):
        p, s = carry
        updates, s = tx.update(g, s, p)
        return (optax.apply_updates(p, updates), s), None

    grads = jax.tree.map(lambda p: jnp.ones((5, *p.shape), p.dtype), params)
    (params_after, _), _ = jax.lax.scan(body, (params, tx.init(params)), grads)
    assert params_after["w"].dtype == jnp.bfloat16


def test_import_creates_no_device_arrays():
    """Importing kron.optax (and building a transformation) must not start JAX's backend, or a
    later XLA_FLAGS device count or jax.distributed.initialize would be ignored (psgdax's
    import-time PRNGKey does exactly that)."""
    code = (
        "import os\n"
        "import kron.optax as ko\n"
        "tx = ko.kron(); tq = ko.quad()\n"
        "os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=3'\n"
        "import jax\n"
        "print(jax.device_count())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "3"


@pytest.mark.parametrize("factory", [kron, quad], ids=["kron", "quad"])
def test_inject_hyperparams_changes_the_learning_rate_in_the_state(factory):
    """Structural options stay static (``static_args``); the learning rate and μ become state,
    and halving the learning rate halves the update while everything else is unchanged."""
    tx = optax.inject_hyperparams(factory, static_args=static_args(factory))(
        learning_rate=1e-2, preconditioner_lr=0.3
    )
    state = tx.init(PARAMS)
    half = state._replace(hyperparams={**state.hyperparams, "learning_rate": jnp.asarray(5e-3)})
    full_updates, _ = jax.jit(tx.update)(grads_at(0), state, PARAMS)
    half_updates, _ = jax.jit(tx.update)(grads_at(0), half, PARAMS)
    for a, b in zip(jax.tree.leaves(full_updates), jax.tree.leaves(half_updates)):
        np.testing.assert_allclose(b, 0.5 * a, rtol=1e-2 if factory is quad else 1e-6)
        assert float(jnp.abs(a).max()) > 0


@pytest.mark.parametrize("factory", [kron, quad], ids=["kron", "quad"])
def test_an_injected_weight_decay_decays_as_the_same_number_given_directly(factory):
    """weight_decay is injectable, as optax.adamw's: injected at 0.1 it steps exactly as
    ``factory(weight_decay=0.1)``, and set to 0 in the state as ``factory(weight_decay=0.0)``."""
    params = {"w": jnp.ones((6, 4)), "b": jnp.full(4, 2.0)}
    grads = jax.tree.map(lambda p: 0.5 * jnp.ones_like(p), params)

    def updates(tx, state=None):
        state = tx.init(params) if state is None else state
        return jax.jit(tx.update)(grads, state, params)[0]

    tx = optax.inject_hyperparams(factory, static_args=static_args(factory))(
        learning_rate=1e-2, weight_decay=0.1
    )
    state = tx.init(params)
    undecayed = state._replace(hyperparams={**state.hyperparams, "weight_decay": jnp.asarray(0.0)})
    for injected, direct in (
        (updates(tx, state), updates(factory(learning_rate=1e-2, weight_decay=0.1))),
        (updates(tx, undecayed), updates(factory(learning_rate=1e-2, weight_decay=0.0))),
    ):
        for a, b in zip(jax.tree.leaves(injected), jax.tree.leaves(direct)):
            np.testing.assert_allclose(a, b, rtol=1e-6)
    decayed, plain = updates(tx, state), updates(tx, undecayed)
    assert not np.allclose(decayed["w"], plain["w"])


@pytest.mark.parametrize("factory", [kron, quad, skew], ids=["kron", "quad", "skew"])
def test_inject_hyperparams_without_static_args_says_what_to_pass(factory):
    """Without ``static_args`` every numeric option arrives as an array, and the structural ones
    cannot be; the error names the fix."""
    tx = optax.inject_hyperparams(factory)(learning_rate=1e-2)
    with pytest.raises(ValueError, match=r"static_args=kron\.optax\.static_args\(kron\)"):
        tx.init(PARAMS)


@pytest.mark.parametrize(
    ("make", "threshold"),
    [
        (lambda: kron(learning_rate=3e-3), 1e-2),
        (lambda: quad(learning_rate=3e-2, weight_decay=0.0, dtype=jnp.float32), 1e-2),
    ],
    ids=["kron", "quad"],
)
def test_trains_digits(make, threshold):
    """An MLP 64-32-10 on scikit-learn's digits, 300 full-batch steps (float32). Measured
    training cross-entropy: kron (lr 3e-3) 3.8e-4, quad (lr 3e-2) 9.9e-5; optax.adam at its best
    lr of {3e-3, 1e-2, 3e-2, 1e-1} (1e-1) 1.1e-3. The test asks for 1e-2."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = jnp.asarray(digits.data / 16.0, jnp.float32)
    y = jnp.asarray(digits.target)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    params = {
        "w1": jax.random.normal(keys[0], (64, 32)) / 8.0,
        "b1": jnp.zeros(32),
        "w2": jax.random.normal(keys[1], (32, 10)) / np.sqrt(32.0),
        "b2": jnp.zeros(10),
    }

    def loss(p):
        logits = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    tx = make()
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        updates, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, updates), s

    for _ in range(300):
        params, state = step(params, state)
    assert float(loss(params)) < threshold, float(loss(params))


def test_a_state_of_another_structure_is_refused_readably():
    """A state built with factor stacks (pipeline_axis_name) given to a per-leaf transformation,
    or one built for other params, gets a message naming the cause, not JAX's dump of every
    array; the stacked side already had one."""
    params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
    stacked = scale_by_kron(pipeline_axis_name="dp", pipeline_axis_size=2).init(params)
    with pytest.raises(ValueError, match=r"not have these params' structure \(2 leaves\)"):
        scale_by_kron().update(params, stacked, params)
    other = scale_by_kron().init({"w": jnp.ones((4, 4))})
    with pytest.raises(ValueError, match="built for other params"):
        scale_by_kron().update(params, other, params)
    with pytest.raises(ValueError, match="built for other params or another pipeline_axis"):
        scale_by_kron(pipeline_axis_name="dp", pipeline_axis_size=2).update(
            params, scale_by_kron().init(params), params
        )


@pytest.mark.parametrize(
    ("built_with", "used_with", "message"),
    [
        # Diagonal factors kept where dense ones belong: the update ran and kept them.
        (
            dict(max_skew_triangular=0),
            {},
            r"factors at \['w'\] are \(1, 3\) float32, \(1, 4\) float32, but this "
            r"transformation makes \(1, 3, 3\) float32, \(1, 4\) float32 for these params: the "
            r"state was built with other options",
        ),
        # EQ caches Q^T Q, QUAD4P keeps P itself and no cache: a raw "cond branch outputs must
        # have the same pytree structure".
        (
            dict(preconditioner_mode="EQ"),
            dict(preconditioner_mode="QUAD4P"),
            r"cached preconditioners at \['b'\] are \(1, 4\) float32, but this transformation "
            r"makes none",
        ),
        (
            dict(precond_dtype=jnp.bfloat16),
            {},
            r"factors at \['b'\] are \(1, 4\) bfloat16, but this transformation makes \(1, 4\) "
            r"float32",
        ),
        (
            dict(mu_dtype=jnp.bfloat16),
            dict(mu_dtype=jnp.float32),
            r"momentum at \['b'\] is bfloat16, but this transformation keeps it in float32",
        ),
        (
            dict(pipeline_axis_name="dp", pipeline_axis_size=2, max_skew_triangular=0),
            dict(pipeline_axis_name="dp", pipeline_axis_size=2),
            r"factors at the stack of \['w'\] are \(2, 3\) float32, \(2, 4\) float32, but this "
            r"transformation makes \(2, 3, 3\) float32, \(2, 4\) float32",
        ),
    ],
    ids=["layout", "geometry", "precond_dtype", "mu_dtype", "stacked"],
)
def test_a_state_built_with_other_options_is_refused_naming_the_leaf(
    built_with, used_with, message
):
    """Each unit's factors, Lipschitz estimates and caches are checked against init's shapes and
    dtypes while the update traces (no cost per step), inside jit too."""
    params = {"w": jnp.ones((3, 4), jnp.float32), "b": jnp.ones(4, jnp.float32)}
    state = scale_by_kron(**built_with).init(params)
    with pytest.raises(ValueError, match=message):
        jax.jit(scale_by_kron(**used_with).update)(params, state, params)


@pytest.mark.parametrize("options", [{}, dict(pipeline_axis_name="dp", pipeline_axis_size=2)])
def test_a_gradient_of_another_shape_is_refused_naming_the_leaf(options):
    """It met the factors in a raw dot_general error."""
    params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
    tx = scale_by_kron(**options)
    grads = {"w": jnp.ones((4, 3)), "b": jnp.ones(4)}
    with pytest.raises(
        ValueError,
        match=r"the gradient at \['w'\] has shape \(4, 3\), but the state's momentum there has "
        r"shape \(3, 4\)",
    ):
        jax.jit(tx.update)(grads, tx.init(params), params)


@pytest.mark.parametrize(
    ("factory", "given", "message"),
    [
        (kron, dict(learning_rate=-1e-2), r"learning_rate must be finite and >= 0, .*got Array"),
        (quad, dict(learning_rate=np.nan), r"learning_rate must be finite and >= 0, .*got Array"),
        (kron, dict(weight_decay=np.inf), r"weight_decay must be finite and >= 0, .*got Array"),
        (skew, dict(preconditioner_lr=0.0), r"preconditioner_lr must be finite and > 0; got Arr"),
    ],
)
def test_inject_hyperparams_values_are_checked_at_init(factory, given, message):
    """The injected options reach the factory as 0-d arrays, checked like numbers at init (inside
    the jitted update they are tracers, which pass)."""
    tx = optax.inject_hyperparams(factory, static_args=static_args(factory))(
        **{"learning_rate": 1e-2, **given}
    )
    with pytest.raises(ValueError, match=message):
        tx.init(PARAMS)
