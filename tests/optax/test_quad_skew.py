"""eformer's contract: quad/skew defaults, block-tiled parity with kron.core, partition specs that
always match the state (runs on meshes: test_mesh.py)."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

from kron.core import (
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
from kron.optax import (
    KronState,
    get_opt_state_partition_specs,
    leaf_key,
    quad,
    scale_by_quad,
    scale_by_skew,
    skew,
)
from kron.optax.fitting import NOISE
from kron.optax.quad_skew import annealed_precond_lr

OPS = get_ops("jax")
EFORMER_DEFAULTS = {
    "lr_style": "adam",
    "b1": 0.95,
    "normalize_grads": False,
    "max_size_dense": 16384,
    "preconditioner_lr": 0.7,
    "preconditioner_init_scale": 1.0,
    "dtype": jnp.bfloat16,
    "scanned_layers": None,
    "block_size": 256,
    "pipeline_axis_name": None,
    "pipeline_axis_size": 1,
    "params_partition_specs": None,
    "noise_scale": 1e-9,
}


@pytest.mark.parametrize("function", [scale_by_quad, scale_by_skew])
def test_defaults_are_eformers(function):
    defaults = {name: p.default for name, p in inspect.signature(function).parameters.items()}
    assert defaults == EFORMER_DEFAULTS
    for alias in (quad, skew):
        params = inspect.signature(alias).parameters
        assert params["learning_rate"].default == 0.001
        assert params["weight_decay"].default == 0.1


def test_annealed_precond_lr():
    schedule = annealed_precond_lr(0.7)
    np.testing.assert_allclose(schedule(0), 0.7)
    np.testing.assert_allclose(schedule(10_000), 0.7 / np.sqrt(2.0), rtol=1e-6)
    np.testing.assert_allclose(schedule(10**7), 0.4)
    np.testing.assert_allclose(annealed_precond_lr(0.1)(10**7), 0.1, rtol=1e-6)


@pytest.mark.parametrize(
    ("function", "geometry"), [(scale_by_quad, "QUAD"), (scale_by_skew, "Q0.5EQ1.5")]
)
def test_block_tiled_step_reproduces_the_core(function, geometry):
    """A (20, 6) leaf in 8×6 tiles (the last one padded), float64: every step equals
    kron.core's with the same noise, the padding mask, the annealed μ, debiased momentum,
    RMS cap 1.1, ÷5, and balancing at step 0 (every 100 steps)."""
    shape, steps = (20, 6), 12
    tx = function(dtype=jnp.float64, block_size=8, noise_scale=1e-3)
    params = {"w": jnp.zeros(shape)}
    state = tx.init(params)
    layout = LayoutOptions(max_skew=np.inf, min_ndim_dense=2, merge_dims=True, block_size=8)
    plan = make_plan(shape, layout)
    assert plan.num_blocks == 3 and plan.padded
    options = StepOptions(
        layout=layout,
        fit=FitOptions(
            geometry=geometry,
            beta_lipschitz=0.95,
            damping=1e-3,
            damping_rule="absolute",
            norm_bound="power",
        ),
        beta=0.95,
        momentum_rule="debiased_ema",
        whiten_momentum=True,
        clip_rms=1.1,
        clip_max=None,
    )
    like = jnp.zeros((), jnp.float64)
    reference = TensorState(
        tuple(init_factors(plan, 1.0, like, OPS)),
        tuple(init_lipschitz(plan, like, OPS)),
        jnp.zeros((1, *shape)),
    )
    mask = jnp.asarray(plan.mask())
    update = jax.jit(tx.update)
    rng = np.random.default_rng(4)
    for step in range(steps):
        g = jnp.asarray(rng.standard_normal(shape))
        updates, new_state = update({"w": g}, state)
        noise = jax.random.normal(
            leaf_key(state.key, jnp.int32(step), 0, NOISE), (3, 8, 6), jnp.float64
        )
        y, reference = kron_step(
            reference,
            g[None],
            float(step),
            noise,
            plan=plan,
            options=options,
            precond_lr=annealed_precond_lr(0.7)(step),  # float32, as the transformation uses
            do_fit=True,
            ops=OPS,
            mask=mask,
        )
        if step == 0:
            reference = reference._replace(factors=tuple(balance(reference.factors, OPS)))
        np.testing.assert_allclose(updates["w"], 0.2 * y[0], rtol=1e-9, atol=1e-13)
        state = new_state
    for a, b in zip(state.factors["w"], reference.factors):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-13)


def test_bfloat16_state_stays_bfloat16():
    params = {"w": jnp.zeros((12, 10), jnp.bfloat16), "b": jnp.zeros(10, jnp.float32)}
    tx = skew(learning_rate=1e-3)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.ones(p.shape, p.dtype), params)
    updates, after = jax.jit(tx.update)(grads, state, params)
    before_types = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), after) == before_types
    assert state[0].factors["w"][0].dtype == jnp.bfloat16
    assert state[0].lipschitz["w"][0].dtype == jnp.float32
    assert updates["w"].dtype == jnp.bfloat16 and updates["b"].dtype == jnp.float32


def test_invalid_options_raise():
    with pytest.raises(ValueError, match="lr_style"):
        scale_by_quad(lr_style="sgd")
    with pytest.raises(ValueError, match="dtype"):
        scale_by_skew(dtype=jnp.int32)
    with pytest.raises(ValueError, match="pipeline_axis_size"):
        scale_by_quad(pipeline_axis_size=0)


WHITE_KRON_DTYPES = "bfloat16, float32 or float64"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        # The core named it as its own "damping".
        (lambda: scale_by_quad(noise_scale=np.inf), r"^noise_scale must be finite and >= 0; got"),
        (lambda: skew(noise_scale=True), r"^noise_scale must be a finite number >= 0; got True\."),
        (lambda: quad(max_size_dense=True), r"^max_size_dense must be a number >= 0; got True\."),
        (lambda: quad(block_size=True), r"^block_size must be a number >= 1; got True\."),
        (lambda: skew(learning_rate=np.inf), r"^learning_rate must be finite and >= 0, or a sch"),
        (lambda: quad(learning_rate="1e-3"), r"^learning_rate must be a finite number >= 0, or"),
        (lambda: quad(weight_decay=np.inf), r"^weight_decay must be finite and >= 0, or a sched"),
        # eformer's dtypes; None was read as float64 and float16 is not one of them.
        *(
            (
                lambda dtype=dtype: scale_by_skew(dtype=dtype),
                rf"^dtype must be a floating-point dtype: {WHITE_KRON_DTYPES}; got {got}\.$",
            )
            for dtype, got in (
                (None, "None"),
                (False, "False"),
                ("float8_e4m3fn", "float8_e4m3fn"),
                (jnp.float16, "float16"),
            )
        ),
    ],
)
def test_bad_values_are_refused_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    ("built_with", "message"),
    [
        (
            dict(block_size=2),
            r"^the state's factors at \['w'\] are \(4, 2, 2\) bfloat16, \(4, 2, 2\) bfloat16, but "
            r"this transformation makes \(1, 3, 3\) bfloat16, \(1, 4, 4\) bfloat16 for these "
            r"params: the state was built with other options",
        ),
        (
            dict(dtype=jnp.float32),
            r"^the state's momentum at \['b'\] is float32, but this transformation keeps it in "
            r"bfloat16: the state was built with another mu_dtype \(dtype, in quad and skew\)",
        ),
    ],
    ids=["block_size", "dtype"],
)
def test_a_state_built_with_other_options_is_refused(built_with, message):
    params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
    state = quad(**built_with).init(params)
    with pytest.raises(ValueError, match=message):
        jax.jit(quad().update)(params, state, params)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"weight_decay": 0.0}, {"learning_rate": optax.linear_schedule(1e-3, 0.0, 100)}],
    ids=["default-wd", "no-wd", "schedule"],
)
def test_partition_specs_match_the_state(kwargs):
    """The spec tree has the real state's structure whatever weight_decay and learning_rate are
    (eformer's helper returns a 2-tuple for the default 3-part chain)."""
    params = {"w": jnp.zeros((64, 48)), "b": jnp.zeros(48), "v": jnp.zeros((48, 10))}
    options = dict(pipeline_axis_name="dp", pipeline_axis_size=4, block_size=16, **kwargs)
    specs = get_opt_state_partition_specs(params, **options)
    state = quad(**options).init(params)
    assert jax.tree.structure(specs) == jax.tree.structure(state)
    kron_specs, kron_state = specs[0], state[0]
    assert isinstance(kron_specs, KronState)
    # One stack per block layout, padded to a multiple of 4 and split over "dp": w's 4×3 = 12
    # blocks fill 12 rows; v's 3 blocks (16×10) and b's 3 get 4 rows (one inert).
    rows = [[f.shape[0] for f in unit] for unit in kron_state.factors]
    assert sorted(rows) == [[4], [4, 4], [12, 12]]
    for spec, x in zip(jax.tree.leaves(kron_specs.factors), jax.tree.leaves(kron_state.factors)):
        assert x.shape[0] % 4 == 0
        assert spec == PartitionSpec("dp", *([None] * (x.ndim - 1)))
    assert all(s == PartitionSpec("dp") for s in jax.tree.leaves(kron_specs.lipschitz))
    assert kron_specs.count == PartitionSpec()


def test_partition_specs_read_weight_decay_none_as_no_decay():
    """eformer's helper reads ``weight_decay=None`` as 0; ours raised (quad refuses None)."""
    params = {"w": jnp.zeros((8, 6)), "b": jnp.zeros(6)}
    specs = get_opt_state_partition_specs(params, weight_decay=None)
    assert jax.tree.structure(specs) == jax.tree.structure(quad(weight_decay=0.0).init(params))
    assert jax.tree.structure(specs) != jax.tree.structure(quad().init(params))


def test_state_json_round_trip_resumes_exactly():
    params = {"w": jnp.zeros((6, 5)), "b": jnp.zeros(5, jnp.bfloat16)}
    tx = quad(learning_rate=1e-2, block_size=4)
    state = tx.init(params)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(0)
    grads = [
        jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
        for _ in range(6)
    ]
    for g in grads[:3]:
        _, state = update(g, state, params)
    kron_state = state[0]
    restored = KronState.from_json(kron_state.to_json())
    assert int(restored.count) == int(kron_state.count) == 3
    resumed = (restored, *state[1:])
    for g in grads[3:]:
        a, state = update(g, state, params)
        b, resumed = update(g, resumed, params)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(resumed)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_to_json_refuses_params_it_would_restore_as_another_pytree():
    """A NamedTuple would come back a tuple and an OrderedDict a dict: another tree, which the
    next update would reject, so to_json names the type instead."""
    import collections

    Params = collections.namedtuple("Params", "w b")
    for params in (
        Params(jnp.zeros((3, 2)), jnp.zeros(2)),
        collections.OrderedDict(w=jnp.zeros((3, 2)), b=jnp.zeros(2)),
    ):
        state = quad(learning_rate=1e-2).init(params)[0]
        with pytest.raises(TypeError, match=type(params).__name__):
            state.to_json()


def test_a_vocabulary_sized_embedding_keeps_its_long_axis_whole_and_diagonal():
    """With the defaults (dense up to 16384, blocks of 256) a (50257, 4096) embedding gets one
    diagonal over its 50257 rows per block of columns and 16 dense 256² factors: under 4 MiB of
    factors (shapes only: jax.eval_shape allocates nothing). Tiled on both axes it took 3152
    pairs of 256² factors, 788 MiB."""
    params = {"embed": jax.ShapeDtypeStruct((50257, 4096), jnp.float32)}
    factors = jax.tree.leaves(jax.eval_shape(quad().init, params)[0].factors)
    assert sorted(f.shape for f in factors) == [(16, 256, 256), (16, 50257)]
    assert sum(f.size * f.dtype.itemsize for f in factors) < 4 * 2**20


def test_one_axis_leaves_take_eformers_one_d_path():
    """A (300,) bias and its (1, 300) and (1, 1, 300) spellings are one leaf to eformer (its
    size is its longest axis): one diagonal factor over all 300 entries, not tiled into 256-blocks
    nor dense, and the same updates from the same gradients."""
    shapes = {"vector": (300,), "row": (1, 300), "token": (1, 1, 300)}
    params = {name: jnp.zeros(shape) for name, shape in shapes.items()}
    tx = quad(learning_rate=1e-2, dtype=jnp.float32, noise_scale=0.0)
    state = tx.init(params)
    assert [f.shape for f in jax.tree.leaves(state[0].factors)] == [(1, 300)] * 3
    rng = np.random.default_rng(0)
    for _ in range(3):
        g = rng.standard_normal(300).astype(np.float32)
        grads = {name: jnp.asarray(g).reshape(shape) for name, shape in shapes.items()}
        updates, state = tx.update(grads, state, params)
        for name in ("row", "token"):
            np.testing.assert_array_equal(updates[name].reshape(300), updates["vector"])
