"""kron.optax: psgdax's contract — jit, state invariance, bad input, a trained problem (parity
with kron.core is in test_parity.py)."""

from __future__ import annotations

import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kron.optax import kron, quad, scale_by_kron, scale_by_skew, skew
from kron.optax.alias import CHAIN_ONLY

# psgdax 0.1.1's parameters in its order, with its defaults (its default update probability is
# the schedule that ``None`` stands for here); its last one, ``key``, is our ``seed``.
PSGDAX_DEFAULTS = {
    "learning_rate": 1e-3,
    "b1": 0.9,
    "weight_decay": 0.0,
    "weight_decay_mask": None,
    "preconditioner_update_probability": None,
    "max_size_triangular": 8192,
    "max_skew_triangular": 1.0,
    "min_ndim_triangular": 2,
    "memory_save_mode": None,
    "whiten_grad": True,
    "preconditioner_lr": 0.1,
    "preconditioner_init_scale": None,
    "mu_dtype": None,
    "precond_dtype": None,
    "precond_update_precision": "tensorfloat32",
    "precond_grads_precision": None,
    "scanned_layers": None,
    "lax_map_scanned_layers": False,
    "lax_map_batch_size": 8,
    "preconditioner_mode": "Q0.5EQ1.5",
    "beta_lipschitz": 0.9,
    "track_lipschitz": True,
    "damping": 1e-9,
    "grad_clip_max_amp": 1.0,
}
# scale_by_kron differs from kron only in its automatic init scale, as in psgdax.
PSGDAX_SCALE_BY_KRON_DEFAULTS = {
    **{k: v for k, v in PSGDAX_DEFAULTS.items() if k not in CHAIN_ONLY},
    "preconditioner_init_scale": 1.0,
}


@pytest.mark.parametrize(
    ("function", "expected"),
    [(kron, PSGDAX_DEFAULTS), (scale_by_kron, PSGDAX_SCALE_BY_KRON_DEFAULTS)],
    ids=["kron", "scale_by_kron"],
)
def test_defaults_and_order_are_psgdax(function, expected):
    """psgdax's parameters keep its defaults and its order, so positional calls mean the same."""
    parameters = inspect.signature(function).parameters
    assert {name: parameters[name].default for name in expected} == expected
    assert list(parameters)[: len(expected) + 1] == [*expected, "seed"]


def test_state_answers_to_psgdax_field_names():
    params = {"w": jnp.zeros((5, 4))}
    state = scale_by_kron(preconditioner_update_probability=1.0).init(params)
    assert state.Qs_preconditioners is state.factors
    assert state.Ls_lipschitz is state.lipschitz
    assert [q.shape for q in jax.tree.leaves(state.Qs_preconditioners)] == [(1, 5), (1, 4, 4)]


def test_untracked_lipschitz_is_a_zero_beta():
    """psgdax's ``track_lipschitz=False`` normalises each fit by the current bound alone."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.zeros((5, 4)), "b": jnp.zeros(4)}
    grads = [
        jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
        for _ in range(5)
    ]

    def run(**options):
        tx = scale_by_kron(preconditioner_update_probability=1.0, **options)
        state = tx.init(params)
        for g in grads:
            updates, state = tx.update(g, state)
        return updates

    untracked = run(track_lipschitz=False)
    zero_beta = run(beta_lipschitz=0.0)
    tracked = run()
    for a, b in zip(jax.tree.leaves(untracked), jax.tree.leaves(zero_beta)):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(untracked["w"], tracked["w"])


def test_state_keeps_dtypes_and_shapes_and_update_jits():
    params = {
        "w": jnp.zeros((6, 4), jnp.float32),
        "b": jnp.zeros(4, jnp.bfloat16),
        "s": jnp.zeros((), jnp.float32),
    }
    tx = kron(learning_rate=1e-2, weight_decay=1e-3)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
    after = jax.eval_shape(lambda s: tx.update(grads, s, params)[1], state)
    same = jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, state, after)
    assert all(jax.tree.leaves(same))
    updates, _ = jax.jit(tx.update)(grads, state, params)
    assert updates["b"].dtype == jnp.bfloat16


@pytest.mark.parametrize("whiten_grad", [True, False])
def test_non_finite_gradient_leaves_that_leaf_untouched(whiten_grad):
    """ "a" and "b" share a plan, so they are fitted as one stack: a NaN in "a" must neither
    change "a"'s state nor reach "b", whose step equals the one it takes beside a finite "a"."""
    tx = scale_by_kron(preconditioner_update_probability=1.0, whiten_grad=whiten_grad)
    params = {"a": jnp.zeros((4, 4)), "b": jnp.zeros((4, 4))}
    state = tx.init(params)
    _, state = tx.update({"a": jnp.ones((4, 4)), "b": jnp.ones((4, 4))}, state)
    bad = jnp.ones((4, 4)).at[1, 1].set(jnp.nan)
    b_grad = jnp.arange(16.0).reshape(4, 4) / 16
    updates, after = tx.update({"a": bad, "b": b_grad}, state)
    clean_updates, clean_after = tx.update({"a": jnp.ones((4, 4)), "b": b_grad}, state)
    assert jnp.all(updates["a"] == 0)
    for x, y in zip(
        jax.tree.leaves((state.mu["a"], state.factors["a"], state.lipschitz["a"])),
        jax.tree.leaves((after.mu["a"], after.factors["a"], after.lipschitz["a"])),
    ):
        np.testing.assert_array_equal(x, y)
    assert int(after.skipped["a"]) == 1 and int(after.skipped["b"]) == 0
    np.testing.assert_array_equal(updates["b"], clean_updates["b"])
    for x, y in zip(
        jax.tree.leaves((after.mu["b"], after.factors["b"], after.lipschitz["b"])),
        jax.tree.leaves(
            (clean_after.mu["b"], clean_after.factors["b"], clean_after.lipschitz["b"])
        ),
    ):
        np.testing.assert_array_equal(x, y)


def test_unknown_mode_raises_instead_of_falling_back():
    with pytest.raises(ValueError, match=r"Q0\.5EQ1\.5"):
        scale_by_kron(preconditioner_mode="Q1EQ1")
    with pytest.raises(ValueError, match="b1 > 0"):
        scale_by_kron(whiten_grad=False, b1=0.0)


@pytest.mark.parametrize("make", [lambda: kron(1e-3), quad, skew])
def test_a_complex_leaf_is_refused_by_name(make):
    """Stepped, a complex leaf would lose its imaginary part in the real-valued fit."""
    params = {"b": jnp.zeros(3), "w": jnp.zeros((4, 3), jnp.complex64)}
    with pytest.raises(ValueError, match=r"complex parameters; got complex64 at \['w'\]"):
        make().init(params)


@pytest.mark.parametrize("make", [lambda: kron(1e-3), quad])
@pytest.mark.parametrize("leaf", [jnp.zeros((), jnp.int32), jnp.zeros(3, bool), 3])
def test_a_leaf_that_is_not_floating_point_is_refused_by_name(make, leaf):
    """An integer leaf (a step counter kept in the params) was taken at init and failed at the
    first update with float0 gradients, naming no leaf."""
    params = {"b": jnp.zeros(3), "step": leaf}
    with pytest.raises(ValueError, match=r"floating-point leaves only; got \w+ at \['step'\]"):
        make().init(params)


@pytest.mark.parametrize(
    "make",
    [
        lambda: kron(1e-3),
        lambda: kron(1e-3, scanned_layers={"b": False, "w": True}),  # zero layers
        quad,
    ],
)
def test_an_empty_leaf_is_refused_by_name(make):
    """An empty leaf has nothing to precondition; it is refused at init, naming it, rather than
    failing at the first update (a scanned one of zero layers did, with a reduction error)."""
    params = {"b": jnp.zeros(3), "w": jnp.zeros((0, 4, 4))}
    with pytest.raises(ValueError, match=r"empty leaf; got shape \(0, 4, 4\) at \['w'\]"):
        make().init(params)


@pytest.mark.parametrize("make", [lambda: kron(1e-2), quad, skew])
def test_a_python_number_leaf_is_stepped_like_a_0d_array(make):
    params = {"w": jnp.ones((3, 4)), "temperature": 1.0}
    as_array = {"w": jnp.ones((3, 4)), "temperature": jnp.asarray(1.0)}
    grads = {"w": jnp.full((3, 4), 0.5), "temperature": jnp.asarray(0.25)}
    got, _ = make().update(grads, make().init(params), params)
    want, _ = make().update(grads, make().init(as_array), as_array)
    for leaf in ("w", "temperature"):
        np.testing.assert_array_equal(got[leaf], want[leaf])
    assert float(got["temperature"]) != 0.0
    # The gradient a Python number too, outside jit (update read its .shape, as optax.adam
    # does not).
    number_grads = {"w": grads["w"], "temperature": 0.25}
    got, _ = make().update(number_grads, make().init(params), params)
    np.testing.assert_array_equal(got["temperature"], want["temperature"])


@pytest.mark.parametrize("make", [quad, skew])
def test_quad_and_skew_take_a_weight_decay_schedule(make):
    """As ``kron`` and ``optax.add_decayed_weights`` do: the decay follows the schedule."""
    params = {"w": jnp.ones((4, 3))}
    grads = {"w": jnp.zeros((4, 3))}  # only the decay moves the parameters
    schedule = optax.linear_schedule(1e-1, 0.0, 10)
    tx = make(learning_rate=1.0, lr_style=None, weight_decay=schedule)
    updates, _ = tx.update(grads, tx.init(params), params)
    fixed = make(learning_rate=1.0, lr_style=None, weight_decay=1e-1)
    want, _ = fixed.update(grads, fixed.init(params), params)
    np.testing.assert_allclose(updates["w"], want["w"], rtol=1e-6)
    assert float(jnp.abs(updates["w"]).max()) > 0


def test_trains_a_rotated_least_squares_problem():
    """Least squares (256 samples, 8 rotated features scaled over 1.5 decades, 4 outputs),
    300 full-batch steps. Measured loss/start: kron (lr 3e-2) 1.4e-6; optax.adam 2.9e-4 at its
    best lr of {1e-2, 3e-2, 1e-1}. The test asks for 1e-4."""
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    x = jnp.asarray(rng.standard_normal((256, 8)) * np.logspace(0, 1.5, 8) @ rotation)
    w_true = jnp.asarray(rng.standard_normal((8, 4)))
    y = x @ w_true

    def loss(params):
        return jnp.mean((x @ params["w"] - y) ** 2)

    tx = kron(learning_rate=3e-2)
    params = {"w": jnp.zeros((8, 4))}
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    start = loss(params)
    for _ in range(300):
        params, state = step(params, state)
    assert loss(params) < 1e-4 * start, float(loss(params) / start)


def test_automatic_init_scale_applies_on_a_first_step_without_a_fit():
    """The automatic scale is set from the first gradients whether or not that step fits P: with
    a fit probability that never fires, the first update equals one from a run started at that
    scale, and differs from one started at 1 (the scale is far from 1 here). The largest 4th
    moment is the second of two same-shape leaves, whose moments are taken together."""
    from kron.core import fourth_moment, get_ops, shared_scale

    params = {"w": jnp.zeros((5, 3)), "v": jnp.zeros((5, 3)), "b": jnp.zeros(3)}
    grads = {
        "v": jnp.full((5, 3), 40.0).at[0, 0].set(-7.0),
        "w": jnp.full((5, 3), 90.0).at[2, 1].set(5.0),  # after "v" in the tree's order
        "b": jnp.arange(3.0) + 30.0,
    }
    ops = get_ops("jax")
    scale = float(shared_scale([fourth_moment(g, ops) for g in jax.tree.leaves(grads)], ops))
    assert not 0.5 < scale < 2.0

    def first_update(init_scale):
        tx = scale_by_kron(
            preconditioner_update_probability=1e-9,
            preconditioner_init_scale=init_scale,
        )
        updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
        return updates, state

    auto, auto_state = first_update(None)
    fixed, fixed_state = first_update(scale)
    unit, _ = first_update(1.0)
    for leaf in ("w", "v", "b"):
        np.testing.assert_allclose(auto[leaf], fixed[leaf], rtol=1e-5)
        assert not np.allclose(auto[leaf], unit[leaf], rtol=1e-2)
    for a, b in zip(jax.tree.leaves(auto_state.factors), jax.tree.leaves(fixed_state.factors)):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    assert not bool(auto_state.needs_scale_init)


@pytest.mark.parametrize("make", [lambda **k: scale_by_kron(b1=0.0, **k), scale_by_skew])
def test_a_step_with_every_gradient_skipped_is_not_counted(make):
    """An all-NaN step leaves the count, so the momentum's next update is the one a run without
    that step takes, and an automatic init scale still comes from the first finite gradients."""
    params = {"w": jnp.zeros((4, 3))}
    grads = {"w": jnp.arange(12.0).reshape(4, 3) + 1.0}
    nan = {"w": jnp.full((4, 3), jnp.nan)}
    tx = make(preconditioner_init_scale=None)
    state = tx.init(params)
    direct, direct_state = tx.update(grads, state, params)
    _, skipped_state = tx.update(nan, state, params)
    assert int(skipped_state.count) == 0 and bool(skipped_state.needs_scale_init)
    after, after_state = tx.update(grads, skipped_state, params)
    np.testing.assert_array_equal(after["w"], direct["w"])
    for a, b in zip(jax.tree.leaves(after_state.factors), jax.tree.leaves(direct_state.factors)):
        np.testing.assert_array_equal(a, b)


def test_an_all_zero_first_step_leaves_the_automatic_init_scale_to_the_first_real_gradient():
    """A first step whose gradients are all zeros (a loss term whose weight starts at 0) does not
    use up the automatic scale: the run then matches one given, as a fixed scale, the one the
    first nonzero gradients set, and not one started at 1 (the scale is far from 1 here)."""
    from kron.core import fourth_moment, get_ops, shared_scale

    params = {"w": jnp.zeros((5, 3)), "b": jnp.zeros(3)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    grads = {"w": jnp.full((5, 3), 40.0).at[0, 0].set(-7.0), "b": jnp.arange(3.0) + 30.0}
    ops = get_ops("jax")
    scale = float(shared_scale([fourth_moment(g, ops) for g in jax.tree.leaves(grads)], ops))
    assert not 0.5 < scale < 2.0

    def run(init_scale):
        tx = scale_by_kron(preconditioner_init_scale=init_scale, preconditioner_lr=0.5)
        update = jax.jit(tx.update)
        state = tx.init(params)
        _, state = update(zeros, state, params)
        waiting = bool(state.needs_scale_init)
        for _ in range(3):
            updates, state = update(grads, state, params)
        return updates, state, waiting

    auto, auto_state, waiting = run(None)
    fixed, fixed_state, _ = run(scale)
    unit, _, _ = run(1.0)
    assert waiting and not bool(auto_state.needs_scale_init)
    for leaf in ("w", "b"):
        np.testing.assert_allclose(auto[leaf], fixed[leaf], rtol=1e-5)
        assert not np.allclose(auto[leaf], unit[leaf], rtol=1e-2)
    for a, b in zip(jax.tree.leaves(auto_state.factors), jax.tree.leaves(fixed_state.factors)):
        np.testing.assert_allclose(a, b, rtol=1e-5)


def test_the_probability_schedule_gets_psgdaxs_step_number():
    """psgdax calls the schedule with the count after the step: 1 on the first."""
    seen = []

    def schedule(n):
        jax.debug.callback(lambda v: seen.append(int(v)), n)
        return jnp.where(n >= 1, 1.0, 0.0)

    tx = scale_by_kron(preconditioner_update_probability=schedule, preconditioner_lr=0.5)
    params = {"w": jnp.zeros((3, 3))}
    state = tx.init(params)
    _, state = tx.update({"w": jnp.arange(9.0).reshape(3, 3)}, state, params)
    jax.effects_barrier()
    assert seen == [1]
    assert not np.allclose(state.factors["w"][0], jnp.eye(3))  # fitted on the first step


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: scale_by_kron(b1=1.5), r"b1 must be in \[0, 1\]; got 1.5"),
        (lambda: scale_by_kron(max_size_triangular=-1), "max_size_triangular must be >= 0"),
        (lambda: scale_by_kron(grad_clip_max_amp=0.0), "grad_clip_max_amp must be > 0"),
        (lambda: scale_by_kron(preconditioner_lr=-1.0), "preconditioner_lr must be finite and"),
        # inf passed: the fits were all discarded (lr), or every update was NaN (scale).
        (lambda: kron(preconditioner_lr=np.inf), "preconditioner_lr must be finite and > 0"),
        (lambda: quad(preconditioner_lr=np.inf), "preconditioner_lr must be finite and > 0"),
        (lambda: kron(preconditioner_init_scale=np.inf), "init_scale must be finite and > 0"),
        (lambda: quad(preconditioner_init_scale=np.inf), "init_scale must be finite and > 0"),
        (lambda: scale_by_kron(mu_dtype=jnp.int32), "mu_dtype must be a floating-point dtype"),
        (lambda: scale_by_kron(precond_dtype="int32"), "precond_dtype must be a floating-point"),
        (
            lambda: scale_by_kron(preconditioner_mode="foo"),
            "Unknown preconditioner_mode \\(geometry\\) 'foo'",
        ),
        (lambda: skew(max_size_dense=-1), "max_size_dense must be >= 0; got -1"),
        (lambda: quad(noise_scale=-1.0), "noise_scale must be finite and >= 0; got -1.0"),
        (lambda: quad(b1=1.0), r"b1 must be in \[0, 1\)"),
        (lambda: kron(weight_decay=-0.1), "weight_decay must be finite and >= 0, .*; got -0.1"),
        (lambda: skew(weight_decay=-0.1), "weight_decay must be finite and >= 0, .*; got -0.1"),
        # Strings met a comparison and raised TypeError without the option's name.
        (lambda: kron(b1="0.9"), "b1 must be a number in"),
        (lambda: kron(weight_decay="0.1"), "weight_decay must be a finite number >= 0, .*'0.1'"),
        (lambda: kron(max_size_triangular="8"), "max_size_triangular must be a number"),
        (
            lambda: kron(preconditioner_update_probability="x"),
            "preconditioner_update_probability must be a number",
        ),
        (lambda: quad(b1="x"), "b1 must be a number in"),
        (lambda: kron(mu_dtype="bf16"), "mu_dtype must be a floating-point dtype: .*or None"),
        (lambda: kron(precond_dtype="bf16"), "precond_dtype must be a floating-point dtype"),
        (lambda: quad(dtype="bf16"), "dtype must be a floating-point dtype"),
        (lambda: quad(normalize_grads="no"), "normalize_grads must be True or False; got 'no'"),
        # Strings and None would be read as truth values ("no" turning an option on).
        (lambda: kron(track_lipschitz="no"), "track_lipschitz must be True or False; got 'no'"),
        (lambda: kron(cached="maybe"), "cached must be True, False or None; got 'maybe'"),
        (lambda: scale_by_kron(whiten_grad=None), "whiten_grad must be True or False; got None"),
        (
            lambda: scale_by_kron(lax_map_scanned_layers="yes"),
            "lax_map_scanned_layers must be True or False",
        ),
        # Refused by JAX only inside the first update, without the option's name.
        (lambda: kron(precond_update_precision="bogus"), "precond_update_precision: .*bogus"),
        (lambda: scale_by_kron(precond_grads_precision="fast"), "precond_grads_precision: "),
    ],
)
def test_bad_options_are_named_as_the_caller_spelled_them(make, message):
    with pytest.raises(ValueError, match=message):
        make()


FLOATS = "float16, bfloat16, float32 or float64, or None"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        # optax took any learning rate: nan and inf stepped the params to NaN, and a string or
        # None failed inside the first update.
        *(
            (lambda make=make, lr=lr: make(learning_rate=lr), f"learning_rate must be {want}")
            for make in (kron, quad, skew)
            for lr, want in (
                (np.nan, r"finite and >= 0, or a schedule; got nan\."),
                (np.inf, r"finite and >= 0, or a schedule; got inf\."),
                (-1e-3, r"finite and >= 0, or a schedule; got -0\.001\."),
                (True, r"a finite number >= 0, or a schedule; got True\."),
                (None, r"a finite number >= 0, or a schedule; got None\."),
                ("1e-3", r"a finite number >= 0, or a schedule; got '1e-3'\."),
                (jnp.asarray(np.nan), r"finite and >= 0, or a schedule; got Array\(nan"),
                (
                    jnp.ones(2, jnp.float32),
                    r"a finite number .*; got a float32 array of shape \(2,\)\.",
                ),
            )
        ),
        (lambda: kron(weight_decay=np.inf), r"weight_decay must be finite and >= 0, .*; got inf"),
        # Compared inside the core, where these met '<=' between float and str.
        *(
            (
                lambda name=name, value=value: scale_by_kron(**{name: value}),
                f"{name} must be {kind}; got {re.escape(repr(value))}\\.",
            )
            for name, kind in (
                ("beta_lipschitz", r"a number in \[0, 1\)"),
                ("damping", "a finite number >= 0"),
                ("balance_probability", r"a number in \[0, 1\]"),
                ("preconditioner_init_scale", "a finite number > 0, or None"),
            )
            for value in ("0.5", None, [1])
            if not (name == "preconditioner_init_scale" and value is None)
        ),
        # Arrays of several values met "The truth value of an array ... is ambiguous".
        *(
            (
                lambda name=name: scale_by_kron(**{name: jnp.full(2, 0.5, jnp.float32)}),
                f"{name} must be a .*number .*; got a float32 array of shape \\(2,\\)\\.",
            )
            for name in ("b1", "max_size_triangular", "damping")
        ),
        # True counted as 1.
        *(
            (
                lambda name=name: scale_by_kron(**{name: True}),
                f"{name} must be a .*; got True\\.",
            )
            for name in (
                "max_size_triangular",
                "preconditioner_lr",
                "damping",
                "grad_clip_max_amp",
                "preconditioner_update_probability",
                "balance_probability",
            )
        ),
        (lambda: quad(noise_scale=True), r"noise_scale must be a finite number >= 0; got True\."),
        (lambda: skew(max_size_dense=True), r"max_size_dense must be a number >= 0; got True\."),
        (
            lambda: scale_by_kron(min_ndim_triangular=1.5),
            r"min_ndim_triangular must be a whole number >= 0; got 1\.5\.",
        ),
        # The core named it as its own "damping".
        (lambda: quad(noise_scale=np.inf), r"^noise_scale must be finite and >= 0; got inf\.$"),
        (lambda: skew(noise_scale=np.nan), r"^noise_scale must be finite and >= 0; got nan\.$"),
        # JAX's TypePromotionError inside init; False was read as None (float32).
        (
            lambda: scale_by_kron(precond_dtype="float8_e4m3fn"),
            f"precond_dtype must be a floating-point dtype: {FLOATS}; got float8_e4m3fn\\.",
        ),
        (
            lambda: kron(mu_dtype=jnp.float8_e5m2),
            f"mu_dtype must be a floating-point dtype: {FLOATS}; got float8_e5m2\\.",
        ),
        (
            lambda: scale_by_kron(precond_dtype=False),
            f"precond_dtype must be a floating-point dtype: {FLOATS}; got False\\.",
        ),
        # A schedule where quad's μ (annealed from it) is a number failed inside the update.
        (lambda: quad(preconditioner_lr=lambda count: 0.5), "preconditioner_lr must be a finite"),
        (lambda: scale_by_kron(b1=lambda count: 0.9), "b1 must be a number in"),
    ],
)
def test_bad_values_are_refused_at_construction_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "options",
    [
        dict(learning_rate=jnp.asarray(1e-2)),
        dict(learning_rate=np.asarray(1e-2)),
        dict(learning_rate=np.float32(1e-2)),
        dict(learning_rate=optax.constant_schedule(1e-2)),
        dict(learning_rate=1e-2, weight_decay=jnp.asarray(0.0)),
        dict(learning_rate=1e-2, preconditioner_lr=jnp.asarray(0.1)),
        dict(learning_rate=1e-2, b1=np.float64(0.9), min_ndim_triangular=np.int64(2)),
        dict(learning_rate=1e-2, min_ndim_triangular=2.0, max_size_triangular=np.inf),
        dict(learning_rate=1e-2, precond_dtype="float32", mu_dtype=np.dtype("float32")),
    ],
)
def test_numbers_as_numpy_values_0d_arrays_or_schedules_step_as_plain_floats(options):
    """The checks refuse bools and arrays of several values, not the 0-d arrays
    optax.inject_hyperparams passes, NumPy numbers, schedules or dtype names."""
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    grads = jax.tree.map(lambda p: jnp.linspace(-1.0, 1.0, p.size).reshape(p.shape), params)
    tx, plain = kron(**options), kron(learning_rate=1e-2)
    got, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    want, _ = jax.jit(plain.update)(grads, plain.init(params), params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("make", [kron, quad])
def test_a_traced_learning_rate_passes_the_checks(make):
    """Built inside jit (as optax.inject_hyperparams does in its update), the injectable options
    are tracers, whose values cannot be compared: they pass, and step as the same numbers."""
    params = {"w": jnp.ones((4, 3))}
    grads = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)}
    state = make(learning_rate=1e-2, weight_decay=0.1).init(params)

    @jax.jit
    def step(lr, precond_lr, wd):
        tx = make(learning_rate=lr, preconditioner_lr=precond_lr, weight_decay=wd)
        return tx.update(grads, state, params)[0]

    want, _ = make(learning_rate=1e-2, preconditioner_lr=0.5, weight_decay=0.1).update(
        grads, state, params
    )
    got = step(jnp.asarray(1e-2), jnp.asarray(0.5), jnp.asarray(0.1))
    np.testing.assert_allclose(got["w"], want["w"], rtol=1e-5)


def test_half_precision_factors_leave_the_gradient_and_momentum_in_float32():
    """Only the fit and the product take q_dtype: bfloat16 factors do not round the momentum's
    average (it stayed at 1.0 for a gradient of 1.001, psgdax's 1.001), and with float16
    factors a gradient is skipped only past float16's range, where its products overflow."""
    params = {"w": jnp.zeros((4, 3))}
    tx = scale_by_kron(mu_dtype=jnp.float32, precond_dtype=jnp.bfloat16)
    state = tx.init(params)
    for _ in range(5):
        _, state = tx.update({"w": jnp.full((4, 3), 1.001)}, state, params)
    np.testing.assert_allclose(state.mu["w"], 1.001, rtol=1e-6)
    tx = scale_by_kron(precond_dtype=jnp.float16)
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.full((4, 3), 7e4)}, state, params)
    assert int(state.skipped["w"]) == 1 and not jnp.any(updates["w"])
    updates, state = tx.update({"w": jnp.full((4, 3), 6e4)}, state, params)
    assert int(state.skipped["w"]) == 1 and bool(jnp.all(jnp.isfinite(updates["w"])))
    assert bool(jnp.all(updates["w"] != 0))


def test_a_scanned_leaf_gets_the_automatic_scale_its_layers_would_get_apart():
    """The init scale takes the largest 4th moment over layers as over leaves; over a scanned
    leaf it took the mean of its layers', and the run differed from separate leaves."""
    rng = np.random.default_rng(0)
    layers = [jnp.asarray(rng.standard_normal((5, 4)) * scale) for scale in (1.0, 30.0)]
    separate_tx = kron(1e-2, seed=0)
    separate = {"a": layers[0], "b": layers[1]}
    scanned_tx = kron(1e-2, seed=0, scanned_layers={"w": True})
    scanned = {"w": jnp.stack(layers)}
    got, _ = scanned_tx.update(scanned, scanned_tx.init(scanned), scanned)
    want, _ = separate_tx.update(separate, separate_tx.init(separate), separate)
    np.testing.assert_allclose(got["w"], jnp.stack([want["a"], want["b"]]), rtol=1e-6)


def test_a_probability_above_one_fits_every_step_as_in_psgdax():
    tx = scale_by_kron(preconditioner_update_probability=1.5)
    params = {"w": jnp.zeros((3, 3))}
    state = tx.init(params)
    for _ in range(3):
        before = state.factors["w"][0]
        _, state = tx.update({"w": jnp.arange(9.0).reshape(3, 3)}, state, params)
        assert not np.array_equal(state.factors["w"][0], before)


def test_grad_clip_max_amp_none_leaves_the_output_unclipped():
    """None is psgdax's "no clip": the output equals an unreachable cap's, and differs from the
    default cap of 1 on gradients whose preconditioned RMS is far above it."""
    params = {"w": jnp.zeros((5, 3))}
    grads = {"w": 100.0 * jnp.arange(15.0).reshape(5, 3)}

    def output(cap):
        tx = scale_by_kron(grad_clip_max_amp=cap, preconditioner_init_scale=1.0)
        return tx.update(grads, tx.init(params), params)[0]["w"]

    unclipped = output(None)
    np.testing.assert_array_equal(unclipped, output(1e30))
    assert float(jnp.sqrt(jnp.mean(unclipped**2))) > 2.0
    assert float(jnp.sqrt(jnp.mean(output(1.0) ** 2))) <= 1.0 + 1e-5


def test_values_the_seeds_accept_are_accepted():
    """psgdax and eformer read 0 as a size below every axis (all factors diagonal) and a
    lax.map batch below 2 as one layer at a time; NumPy integers are integers. All were
    refused."""
    params = {"w": jnp.ones((3, 6, 5)), "b": jnp.ones(5)}
    state = scale_by_kron(max_size_triangular=0).init(params)
    assert all(f.ndim == 2 for f in jax.tree.leaves(state.factors))  # (blocks, n): diagonal
    grads = jax.tree.map(lambda p: jnp.linspace(-1.0, 1.0, p.size).reshape(p.shape), params)

    def scanned(batch):
        tx = kron(
            scanned_layers={"w": True, "b": False},
            lax_map_scanned_layers=True,
            lax_map_batch_size=batch,
            preconditioner_update_probability=1.0,
        )
        return tx.update(grads, tx.init(params), params)[0]

    for a, b in zip(jax.tree.leaves(scanned(0)), jax.tree.leaves(scanned(1))):
        np.testing.assert_array_equal(a, b)

    def shapes(make, axis_size, **options):
        tx = make(pipeline_axis_name="dp", pipeline_axis_size=axis_size, **options)
        return jax.tree.map(jnp.shape, jax.eval_shape(tx.init, params))

    assert shapes(quad, np.int64(4), max_size_dense=0) == shapes(quad, 4, max_size_dense=0)
    assert shapes(kron, np.int64(4)) == shapes(kron, 4)


def test_b1_of_one_averages_every_gradient():
    """psgdax's momentum weight is min(t/(t+1), b1), so b1 = 1 keeps a running mean of all the
    gradients (psgdax takes it; the bias-corrected EMA of quad and skew could not)."""
    tx = scale_by_kron(b1=1.0, preconditioner_update_probability=0.0)
    params = {"w": jnp.zeros((3, 4))}
    state = tx.init(params)
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(5)]
    for g in grads:
        _, state = tx.update({"w": jnp.asarray(g)}, state, params)
    np.testing.assert_allclose(state.mu["w"], np.mean(grads, axis=0), rtol=1e-5, atol=1e-6)


def test_float64_momentum_without_x64_steps_as_jax_stores_it(tmp_path):
    """Without x64, JAX stores a float64 momentum as float32; the state check must expect what
    init stored, not refuse every update. In a process of its own: the suite enables x64."""
    import subprocess
    import sys

    script = tmp_path / "no_x64.py"
    script.write_text(
        "import jax, jax.numpy as jnp\n"
        "from kron.optax import kron, quad\n"
        "params = {'w': jnp.ones((3, 4)), 'b': jnp.ones(4)}\n"
        "for tx in (kron(mu_dtype=jnp.float64), quad(dtype=jnp.float64)):\n"
        "    state = tx.init(params)\n"
        "    updates, state = jax.jit(tx.update)(params, state, params)\n"
        "    assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates))\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize(("make", "b1"), [(kron, 0.9), (quad, 0.95)], ids=["kron", "quad"])
def test_a_leaf_with_zero_gradients_coasts_to_a_stop(make, b1):
    """Zero gradients (``jax.grad`` of a loss that does not use the leaf) leave the
    preconditioner as it is, so the update decays with the momentum, over about 1 / (1 - b1)
    steps. It stayed at the clip's size for ~150 steps (a drift of 28 here for kron, 6.0 for
    quad; now 0.3 and 2.9)."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((16, 16)), jnp.float32)}
    grads = [rng.standard_normal((16, 16)).astype(np.float32) for _ in range(20)]
    optimizer = make(1e-2)
    state = optimizer.init(params)
    step = jax.jit(optimizer.update)
    for grad in grads:
        updates, state = step({"w": jnp.asarray(grad)}, state, params)
        params = optax.apply_updates(params, updates)
    trained = params["w"]
    zeros = {"w": jnp.zeros((16, 16), jnp.float32)}
    for _ in range(200):
        updates, state = step(zeros, state, params)
        params = optax.apply_updates(params, updates)
    one_step = 1e-2 * 1.1 * 16  # a whole update at the RMS clip, in norm
    assert float(jnp.linalg.norm(params["w"] - trained)) < 1.5 * one_step / (1 - b1)
