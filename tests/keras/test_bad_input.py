"""Invalid options raise ValueError naming the accepted values; non-finite gradients leave the
variable and its optimizer state untouched, or raise."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from kron.keras import Kron, UpdateProbability

from ._helpers import to_numpy

BAD_OPTIONS = [
    (dict(preconditioner_mode="QQ"), "EQ"),
    (dict(memory_save_mode="half_diag"), "smart_one_diag"),
    (dict(decision_rule="sometimes"), "counter"),
    (dict(nonfinite="ignore"), "'skip', 'raise'"),
    (dict(update_clipping="l2"), "'rms', 'value', None"),
    (dict(norm_bound="frobenius"), "power"),
    (dict(damping_rule="none"), "elementwise"),
    (dict(b1=1.0), "b1 must be in [0, 1)"),
    (dict(precond_lr=-0.1), "precond_lr"),
    (dict(precond_init_scale=0.0), "precond_init_scale"),
    (dict(balance_probability=1.5), "balance_probability"),
    (dict(update_clip_value=0.0), "update_clip_value"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**31), "seed"),
    (dict(preconditioner_update_probability=1.5), "[0, 1]"),
    (dict(preconditioner_update_probability="often"), "a schedule or None"),
    (dict(mu_dtype="int32"), "float16, bfloat16, float32, float64"),
    (dict(precond_dtype="no_such_dtype"), "precond_dtype"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(gradient_accumulation_steps=1), "gradient_accumulation_steps"),
    (dict(momentum=0.9), "not recognized"),
    (dict(max_size_triangular=-1), "max_size_triangular must be >= 0; got -1"),
    (dict(min_ndim_triangular=-1), "min_ndim_triangular must be a whole number >= 0; got -1"),
    (dict(min_ndim_triangular=1.5), "min_ndim_triangular must be a whole number >= 0; got 1.5"),
    (dict(update_clip_value=float("inf")), "update_clip_value must be finite and > 0; got inf"),
    (dict(max_skew_triangular=-1.0), "max_skew_triangular must be >= 0; got -1.0"),
    (dict(b1="0.9"), "b1 must be a number; got '0.9'"),
    (dict(max_size_triangular=None), "max_size_triangular must be a number; got None"),
    (dict(whiten_grad="no"), "whiten_grad must be True, False or None; got 'no'"),
    (dict(cached="no"), "cached must be True or False; got 'no'"),
    (dict(momentum_into_precond_update="yes"), "momentum_into_precond_update must be True or"),
    (dict(decoupled_weight_decay=0), "decoupled_weight_decay must be True or False; got 0"),
    (dict(weight_decay=float("inf")), "weight_decay must be finite and >= 0; got inf"),
    (dict(precond_lr=float("inf")), "precond_lr must be finite and >= 0; got inf"),
    (dict(precond_init_scale=float("inf")), "precond_init_scale must be finite and > 0"),
    (dict(damping=float("inf")), "damping must be finite and >= 0; got inf"),
    (dict(seed=1.5), "seed must be an int in [0, "),
    # Keras takes any float; these turned the weights to NaN (or climbed) from the first step.
    (dict(learning_rate=float("nan")), "learning_rate must be finite and >= 0 (or a schedule"),
    (dict(learning_rate=float("inf")), "learning_rate must be finite and >= 0 (or a schedule"),
    (dict(learning_rate=-0.1), "learning_rate must be finite and >= 0 (or a schedule or"),
]


@pytest.mark.parametrize("options, message", BAD_OPTIONS, ids=[str(o) for o, _ in BAD_OPTIONS])
def test_invalid_options_raise(options: dict, message: str) -> None:
    with pytest.raises(ValueError) as error:
        Kron(**options)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("options", "name"),
    [
        (dict(flat_start="x"), "flat_start"),
        (dict(flat_start=float("nan")), "flat_start"),
        (dict(decay=None), "decay"),
        (dict(min_prob="0.1"), "min_prob"),
    ],
)
def test_update_probability_refuses_what_is_not_a_finite_number(options, name) -> None:
    """``"x"`` and NaN were taken and failed (or gave NaN probabilities) only while training."""
    with pytest.raises(ValueError, match=f"UpdateProbability's {name} must be a finite number"):
        UpdateProbability(**options)
    config = UpdateProbability(flat_start=np.int64(20)).get_config()
    assert type(config["flat_start"]) is int and json.loads(json.dumps(config)) == config


def test_numpy_numbers_are_taken_as_python_ones() -> None:
    """Values from a NumPy sweep work like Python numbers and serialise as them."""
    optimizer = Kron(
        preconditioner_update_probability=np.float32(0.5),
        seed=np.int64(3),
        block_size=np.int64(64),
        b1=np.float32(0.5),
        max_size_triangular=np.int64(128),
        update_clip_value=np.float64(2.0),
    )
    config = optimizer.get_config()
    assert config["preconditioner_update_probability"] == 0.5 and config["seed"] == 3
    assert type(config["preconditioner_update_probability"]) is float
    assert type(config["seed"]) is int
    assert type(config["block_size"]) is int and config["block_size"] == 64
    assert type(config["b1"]) is float and config["b1"] == 0.5
    assert json.loads(json.dumps(config)) == config
    assert Kron.from_config(config).get_config() == config
    decayed = Kron(weight_decay=np.float32(0.25)).get_config()  # Keras's own option
    assert type(decayed["weight_decay"]) is float and json.loads(json.dumps(decayed)) == decayed


def test_float16_momentum_of_a_huge_finite_gradient_stays_finite() -> None:
    """A finite gradient past float16's range must not store an inf momentum (the variable
    would turn to NaN on the next step)."""
    variable = keras.Variable(np.ones((4, 3)), dtype="float32")
    optimizer = Kron(learning_rate=0.01, mu_dtype="float16")
    optimizer.build([variable])
    for grad in (np.full((4, 3), 1e6, np.float32), np.ones((4, 3), np.float32)):
        optimizer.apply([keras.ops.convert_to_tensor(grad)], [variable])
    momenta = [v for v in optimizer.variables if "momentum" in v.path]
    assert momenta and all(np.isfinite(to_numpy(m)).all() for m in momenta)
    values = to_numpy(variable)
    assert np.isfinite(values).all() and not np.array_equal(values, np.ones((4, 3)))


def test_half_precision_factors_leave_the_gradient_and_momentum_in_float32() -> None:
    """Only the products and the fit run in ``precond_dtype``: a bfloat16 ``precond_dtype``
    does not round the momentum's average (it stalled at 1.2734 for g = 1.3: bfloat16 cannot
    hold the increments), and with float16 factors a gradient is non-finite only past
    float16's range, whose products would overflow (the parameter turned to NaN)."""
    variable = keras.Variable(np.ones((4, 3)), dtype="float32")
    optimizer = Kron(learning_rate=1e-3, precond_dtype="float16")
    optimizer.apply([keras.ops.full((4, 3), 1e5)], [variable])
    (count,) = [v for v in optimizer.variables if v.path.endswith("_count")]
    assert float(to_numpy(count)) == 0.0 and np.all(to_numpy(variable) == 1.0)
    optimizer.apply([keras.ops.full((4, 3), 6e4)], [variable])
    assert float(to_numpy(count)) == 1.0 and np.all(to_numpy(variable) < 1.0)

    variable = keras.Variable(np.zeros((4, 3)), dtype="float32")
    optimizer = Kron(learning_rate=1e-3, precond_dtype="bfloat16", b1=0.99)
    for _ in range(300):
        optimizer.apply([keras.ops.full((4, 3), 1.3)], [variable])
    (momentum,) = [v for v in optimizer.variables if "momentum" in v.path]
    # The debiased average of a constant 1.3 is 1.3 to float32's rounding.
    np.testing.assert_allclose(to_numpy(momentum), 1.3, rtol=1e-5)


def test_float16_factors_fit_padded_blocks() -> None:
    """Padded blocks (``block_size`` not dividing a dimension) with float16 factors: the fit
    adds the padding's largest per-index count to the factor's norm bound, which a float16
    factor gets in float32. TensorFlow adds no mixed dtypes, so every such fit raised there."""
    rng = np.random.default_rng(0)
    start = rng.standard_normal((10, 6)).astype(np.float32)  # blocks of 4 pad to 12 x 8
    grads = [rng.standard_normal((10, 6)).astype(np.float32) for _ in range(5)]
    results = {}
    for precond_dtype in ("float16", "float32"):
        variable = keras.Variable(start, dtype="float32")
        optimizer = Kron(
            learning_rate=0.01,
            precond_dtype=precond_dtype,
            block_size=4,
            preconditioner_update_probability=1.0,
        )
        for grad in grads:
            optimizer.apply([keras.ops.convert_to_tensor(grad)], [variable])
        factors = [v for v in optimizer.variables if "_q" in v.path]
        assert factors and {keras.backend.standardize_dtype(f.dtype) for f in factors} == {
            precond_dtype
        }
        results[precond_dtype] = to_numpy(variable)
    assert not np.array_equal(results["float16"], start)
    np.testing.assert_allclose(results["float16"], results["float32"], atol=2e-3)


def test_a_probability_callable_gets_a_float_step() -> None:
    """Seed 000 called the schedule with a float32 step; one written with ``keras.ops`` and
    float constants failed on TensorFlow, whose step counter is int64."""

    def decaying(step):
        return keras.ops.maximum(keras.ops.exp(-0.001 * (step - 500.0)), 0.03)

    variable = keras.Variable(np.ones((4, 3)), dtype="float32")
    optimizer = Kron(learning_rate=1e-3, preconditioner_update_probability=decaying)
    optimizer.apply([keras.ops.ones((4, 3))], [variable])
    assert np.all(to_numpy(variable) < 1.0)


def _setup(**options):
    rng = np.random.default_rng(0)
    variables = [keras.Variable(rng.standard_normal(s), dtype="float32") for s in [(4, 3), (3,)]]
    optimizer = Kron(learning_rate=0.1, weight_decay=0.1, **options)
    optimizer.build(variables)
    return variables, optimizer


def _snapshot(items) -> list[np.ndarray]:
    return [to_numpy(v).copy() for v in items]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_gradient_leaves_variable_and_state_untouched(bad: float) -> None:
    variables, optimizer = _setup()
    rng = np.random.default_rng(1)
    finite = [rng.standard_normal(v.shape).astype(np.float32) for v in variables]
    optimizer.apply([keras.ops.convert_to_tensor(g) for g in finite], variables)
    kron_slots = optimizer._slots[0]
    watched = [
        variables[0],
        kron_slots.momentum,
        *kron_slots.factors,
        *kron_slots.lipschitz,
        *kron_slots.cache,
        kron_slots.count,
    ]
    before, other_before = _snapshot(watched), to_numpy(variables[1]).copy()
    broken = finite[0].copy()
    broken[1, 2] = bad
    optimizer.apply([keras.ops.convert_to_tensor(broken), finite[1]], variables)
    for a, b in zip(before, _snapshot(watched)):
        np.testing.assert_array_equal(a, b)  # weight decay included
    assert not np.allclose(other_before, to_numpy(variables[1]))  # the other variable stepped
    assert float(to_numpy(optimizer._slots[1].count)) == 2.0
    # the next finite gradient steps normally
    optimizer.apply([keras.ops.convert_to_tensor(g) for g in finite], variables)
    assert np.isfinite(to_numpy(variables[0])).all()
    assert not np.allclose(before[0], to_numpy(variables[0]))
    assert float(to_numpy(kron_slots.count)) == 2.0


def _last_gradient_nan(variables) -> list:
    """Gradients finite for every variable but the last: the ones before it must not move
    either (each variable used to check its own gradient as it was updated)."""
    grads = [np.ones(v.shape, np.float32) for v in variables]
    grads[-1][0] = np.nan
    return [keras.ops.convert_to_tensor(g) for g in grads]


def test_nonfinite_raise_policy_raises_eagerly() -> None:
    variables, optimizer = _setup(nonfinite="raise")
    before = _snapshot([*variables, *optimizer.variables])
    with pytest.raises(FloatingPointError, match="non-finite gradient for variable 1"):
        optimizer.apply(_last_gradient_nan(variables), variables)
    for a, b in zip(before, _snapshot([*variables, *optimizer.variables])):
        np.testing.assert_array_equal(a, b)


def test_nonfinite_raise_policy_inside_a_compiled_step() -> None:
    variables, optimizer = _setup(nonfinite="raise")
    grads = [keras.ops.convert_to_tensor(np.full(v.shape, np.nan, np.float32)) for v in variables]
    if keras.backend.backend() == "torch":
        # Keras's jit_compile=True on PyTorch is torch.compile; the host check breaks the graph
        # there and raises before anything is written.
        import torch

        before = _snapshot(variables)
        step = torch.compile(lambda gs: optimizer.apply(gs, variables), backend="aot_eager")
        with pytest.raises(FloatingPointError, match="non-finite gradient for variable 0"):
            step(grads)
        for a, b in zip(before, _snapshot(variables)):
            np.testing.assert_array_equal(a, b)
    elif keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        graph_step = tf.function(lambda gs: optimizer.apply(gs, variables))
        before = _snapshot([*variables, *optimizer.variables])
        with pytest.raises(tf.errors.InvalidArgumentError, match="gradient for variable 1"):
            graph_step(_last_gradient_nan(variables))
        for a, b in zip(before, _snapshot([*variables, *optimizer.variables])):
            np.testing.assert_array_equal(a, b)  # the graph's other updates waited too
        xla_step = tf.function(lambda gs: optimizer.apply(gs, variables), jit_compile=True)
        with pytest.raises(ValueError, match="jit_compile=False"):
            xla_step(grads)
    else:
        import jax

        step = jax.jit(lambda o, v, g: optimizer.stateless_apply(o, g, v))
        with pytest.raises(Exception, match="non-finite gradient for variable 0"):
            jax.block_until_ready(
                step([v.value for v in optimizer.variables], [v.value for v in variables], grads)
            )


def test_zero_first_gradient_with_automatic_scale_gives_no_nan() -> None:
    variables, optimizer = _setup(precond_init_scale=None)
    zeros = [keras.ops.zeros(v.shape) for v in variables]
    optimizer.apply(zeros, variables)
    rng = np.random.default_rng(3)
    optimizer.apply(
        [keras.ops.convert_to_tensor(rng.standard_normal(v.shape), "float32") for v in variables],
        variables,
    )
    for slots in optimizer._slots:
        for f in slots.factors:
            assert np.isfinite(to_numpy(f)).all()
    assert all(np.isfinite(to_numpy(v)).all() for v in variables)


def test_an_all_zero_first_gradient_leaves_the_automatic_scale_to_the_first_real_one() -> None:
    """A zero first gradient (a LoRA factor whose partner starts at zero) is not counted, so the
    automatic scale comes from the next, nonzero one, as for a fresh optimizer (up to the
    damping noise of the other step), where it used to stay at its fallback 1.0 (0.14 here)."""
    rng = np.random.default_rng(0)
    start = rng.standard_normal((4, 3)).astype("float32")
    grad = (40.0 * rng.standard_normal((4, 3))).astype("float32")
    runs = []
    for zero_first in (True, False):
        variable = keras.Variable(start, dtype="float32")
        optimizer = Kron(learning_rate=0.1, precond_init_scale=None)
        optimizer.build([variable])
        if zero_first:
            optimizer.apply([keras.ops.zeros((4, 3))], [variable])
            np.testing.assert_array_equal(to_numpy(variable), start)
            assert float(to_numpy(optimizer._slots[0].count)) == 0.0
        optimizer.apply([keras.ops.convert_to_tensor(grad)], [variable])
        runs.append((to_numpy(variable), [to_numpy(f) for f in optimizer._slots[0].factors]))
    (waited, waited_factors), (fresh, fresh_factors) = runs
    np.testing.assert_allclose(waited, fresh, rtol=1e-4)
    for a, b in zip(waited_factors, fresh_factors):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_coupled_weight_decay_adds_to_the_gradient() -> None:
    """decoupled_weight_decay=False steps as decay 0 on the gradient g + wd·θ (seed 000's
    ``decoupled`` flag); the decoupled default steps differently."""
    rng = np.random.default_rng(1)
    start = rng.standard_normal((4, 3)).astype("float32")
    grads = [rng.standard_normal((4, 3)).astype("float32") for _ in range(3)]
    runs = {}
    for name, options in [
        ("coupled", dict(weight_decay=0.5, decoupled_weight_decay=False)),
        ("by hand", dict(weight_decay=0.0)),
        ("decoupled", dict(weight_decay=0.5)),
    ]:
        variable = keras.Variable(start, dtype="float32")
        optimizer = Kron(learning_rate=0.1, preconditioner_update_probability=1.0, **options)
        optimizer.build([variable])
        for g in grads:
            if name == "by hand":
                g = g + 0.5 * to_numpy(variable)
            optimizer.apply([keras.ops.convert_to_tensor(g)], [variable])
        runs[name] = to_numpy(variable)
    np.testing.assert_allclose(runs["coupled"], runs["by hand"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(runs["coupled"], runs["decoupled"], rtol=1e-3)


def test_an_update_probability_of_zero_never_fits() -> None:
    variables, optimizer = _setup(preconditioner_update_probability=0.0, precond_init_scale=1.0)
    before = _snapshot(optimizer.variables)
    optimizer.apply([keras.ops.ones((4, 3)), keras.ops.ones((3,))], variables)
    factors = [(to_numpy(v), b) for v, b in zip(optimizer.variables, before) if "_q" in v.name]
    assert len(factors) == 3 and all(np.array_equal(now, b) for now, b in factors)


if keras.backend.backend() == "tensorflow":  # only TensorFlow has variables outside Keras

    def test_plain_tensorflow_variables_are_stepped_as_with_adam() -> None:
        """Custom loops over ``tf.Module`` hand the optimizer ``tf.Variable``s, which have a
        name but no Keras ``path``."""
        import tensorflow as tf

        w = tf.Variable(tf.ones((4, 3)), name="w")
        optimizer = Kron(learning_rate=0.01)
        optimizer.apply_gradients([(tf.ones((4, 3)), w)])
        assert float(tf.reduce_max(w)) < 1.0
        assert any(v.name.startswith("w_0_momentum") for v in optimizer.variables)


def test_an_empty_variable_is_left_alone_as_keras_optimizers_do() -> None:
    """A variable with no elements gets no state and no update; the others step as without it."""
    empty, full = keras.Variable(np.zeros((0, 3), "float32")), keras.Variable(np.ones(3, "float32"))
    alone = keras.Variable(np.ones(3, "float32"))
    with_empty, without = Kron(learning_rate=0.01), Kron(learning_rate=0.01)
    for _ in range(2):
        with_empty.apply([keras.ops.zeros((0, 3)), keras.ops.ones(3)], [empty, full])
        without.apply([keras.ops.ones(3)], [alone])
    assert tuple(empty.shape) == (0, 3)
    np.testing.assert_array_equal(to_numpy(full), to_numpy(alone))
    assert not np.allclose(to_numpy(full), 1.0)
    assert len(with_empty.variables) == len(without.variables)


def test_learning_rate_schedules_callables_and_zero_are_still_taken() -> None:
    """Only a plain number is checked: a schedule or callable is the user's to keep in range."""
    schedule = keras.optimizers.schedules.ExponentialDecay(0.01, 100, 0.5)
    for learning_rate in (schedule, lambda: 0.01, 0.0):
        Kron(learning_rate=learning_rate)


def _int_variable() -> keras.Variable:
    # PyTorch cannot make an integer variable trainable; the optimizer is handed it all the same.
    trainable = keras.backend.backend() != "torch"
    return keras.Variable(np.ones((4, 3), "int32"), trainable=trainable, name="counts")


def test_a_non_floating_variable_is_refused_in_build() -> None:
    """An int32 variable was taken and its step cast to 0: training did nothing and said
    nothing (Keras's Adam does the same on JAX, fails on a dtype clash on TensorFlow)."""
    floating, counts = keras.Variable(np.ones(3, "float32")), _int_variable()
    optimizer = Kron(learning_rate=0.1)
    with pytest.raises(ValueError) as error:
        optimizer.build([floating, counts])
    message = str(error.value)
    assert "floating-point variables" in message and "float32" in message
    assert f"{counts.path!r} has dtype int32" in message
    assert not optimizer.built


def test_a_model_with_non_trainable_integer_state_trains() -> None:
    """Models hand the optimizer only their trainable variables: an integer counter and the
    seed generator of a dropout layer stay out of it."""

    class Counting(keras.layers.Layer):
        def build(self, input_shape):
            self.calls = self.add_weight((), "zeros", dtype="int32", trainable=False)

        def call(self, x):
            self.calls.assign_add(1)
            return x

    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dropout(0.1), Counting()]
    )
    assert any("int" in v.dtype for v in model.non_trainable_variables)
    model.compile(optimizer=Kron(learning_rate=0.1), loss="mse", run_eagerly=True)
    before = to_numpy(model.layers[0].kernel).copy()
    model.train_on_batch(np.ones((8, 4), "float32"), np.zeros((8, 3), "float32"))
    assert not np.allclose(before, to_numpy(model.layers[0].kernel))


@pytest.mark.parametrize(
    "shape", [(3, 4), (12,), (3,), (4, 1)], ids=["transposed", "flat", "broadcast", "column"]
)
def test_a_gradient_of_the_wrong_shape_names_the_variable(shape) -> None:
    """A (3,) or (4, 1) gradient broadcast into a (4, 3) step silently; the others failed in
    the step with a bare broadcasting error."""
    variable = keras.Variable(np.ones((4, 3), "float32"), name="kernel")
    optimizer = Kron(learning_rate=0.1)
    optimizer.build([variable])
    before = _snapshot([variable, *optimizer.variables])
    with pytest.raises(ValueError) as error:
        optimizer.apply([keras.ops.ones(shape)], [variable])
    assert f"gradient for variable {variable.path!r} has shape {shape}" in str(error.value)
    assert "the variable has shape (4, 3)" in str(error.value)
    for a, b in zip(before, _snapshot([variable, *optimizer.variables])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (2.0, "preconditioner_update_probability gave 2.0 at step 0; it must be in [0, 1]"),
        (-0.5, "preconditioner_update_probability gave -0.5 at step 0; it must be in [0, 1]"),
        (float("nan"), "preconditioner_update_probability gave nan at step 0; it must be in"),
        (np.float32(1.5), "preconditioner_update_probability gave 1.5 at step 0; it must be in"),
        ("often", "preconditioner_update_probability must return a number in [0, 1] or a scal"),
    ],
)
def test_a_probability_callable_giving_a_bad_number_raises(returned, message) -> None:
    """A number out of [0, 1] from the schedule was taken silently (2.0 as 1.0; NaN never fit
    and turned the accumulator's counter NaN), and a string failed without naming the option.
    The check runs before anything is written."""
    variable = keras.Variable(np.ones((4, 3)), dtype="float32")
    optimizer = Kron(learning_rate=0.1, preconditioner_update_probability=lambda step: returned)
    optimizer.build([variable])
    before = _snapshot([variable, *optimizer.variables])
    with pytest.raises(ValueError) as error:
        optimizer.apply([keras.ops.ones((4, 3))], [variable])
    assert message in str(error.value)
    for a, b in zip(before, _snapshot([variable, *optimizer.variables])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("returned", "number"), [(True, 1.0), (False, 0.0), (np.True_, 1.0)])
def test_a_probability_callable_may_answer_with_a_bool(returned, number) -> None:
    """``lambda step: True`` (always fit) steps as ``lambda step: 1.0``, as a tensor bool does."""
    gradient = np.random.default_rng(0).standard_normal((4, 3)).astype("float32")
    runs = []
    for answer in (returned, number):
        variable = keras.Variable(np.ones((4, 3)), dtype="float32")
        optimizer = Kron(
            learning_rate=0.1, preconditioner_update_probability=lambda step, a=answer: a
        )
        optimizer.build([variable])
        optimizer.apply([keras.ops.convert_to_tensor(gradient)], [variable])
        runs.append(_snapshot([variable, *optimizer.variables]))
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_a_bad_probability_number_raises_while_tracing() -> None:
    """In a compiled step a returned Python number is known while tracing: it raises there
    (without a step, which is not known yet)."""
    variable = keras.Variable(np.ones((4, 3)), dtype="float32")
    optimizer = Kron(learning_rate=0.1, preconditioner_update_probability=lambda step: 2.0)
    optimizer.build([variable])
    grads = [keras.ops.ones((4, 3))]
    match = r"gave 2\.0; it must be in \[0, 1\]"
    if keras.backend.backend() == "jax":
        import jax

        step = jax.jit(lambda o, v, g: optimizer.stateless_apply(o, g, v))
        with pytest.raises(ValueError, match=match):
            step([v.value for v in optimizer.variables], [variable.value], grads)
    elif keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with pytest.raises(ValueError, match=match):
            tf.function(lambda gs: optimizer.apply(gs, [variable]))(grads)
    else:  # PyTorch: Keras steps eagerly, where the step is known
        with pytest.raises(ValueError, match=r"gave 2\.0 at step 0; it must be in \[0, 1\]"):
            optimizer.apply(grads, [variable])


@pytest.mark.parametrize("rule", ["counter", "accumulator"])
def test_a_probability_tensor_is_clipped_and_nan_never_fits(rule) -> None:
    """A tensor is known only when the step runs: it is clipped to [0, 1], and NaN counts as 0,
    so the decision counter (the accumulator's running sum of p) never turns NaN."""

    def run(schedule) -> tuple[np.ndarray, Kron]:
        variable = keras.Variable(np.ones((4, 3)), dtype="float32")
        optimizer = Kron(
            learning_rate=0.1, preconditioner_update_probability=schedule, decision_rule=rule
        )
        for _ in range(3):
            optimizer.apply([keras.ops.ones((4, 3))], [variable])
        return to_numpy(variable), optimizer

    never, _ = run(0.0)
    always, _ = run(1.0)
    nan, optimizer = run(lambda step: step * 0.0 + float("nan"))
    np.testing.assert_array_equal(nan, never)
    assert np.isfinite(float(to_numpy(optimizer._decision_counter)))
    np.testing.assert_array_equal(run(lambda step: step * 0.0 + 2.0)[0], always)
    np.testing.assert_array_equal(run(lambda step: step * 0.0 - 1.0)[0], never)
