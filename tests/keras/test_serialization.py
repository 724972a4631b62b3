"""``get_config`` round trips every option; ``model.save`` + ``load_model`` resumes exactly."""

from __future__ import annotations

import json
import math
import warnings

import keras
import numpy as np
import pytest
from sklearn.datasets import load_digits

from kron.keras import Kron, UpdateProbability

from ._helpers import to_numpy

# Every option away from its default, and schedules for both probabilities and the learning rate.
NON_DEFAULT = dict(
    learning_rate=keras.optimizers.schedules.ExponentialDecay(0.01, 100, 0.5),
    weight_decay=0.01,
    b1=0.8,
    preconditioner_update_probability=UpdateProbability(0.9, 0.1, 0.01, 20),
    max_size_triangular=64,
    min_ndim_triangular=1,
    memory_save_mode="one_diag",
    momentum_into_precond_update=False,
    precond_lr=0.2,
    precond_init_scale=None,
    mu_dtype="bfloat16",
    precond_dtype="float64",
    clipnorm=2.0,
    use_ema=True,
    ema_momentum=0.9,
    ema_overwrite_frequency=3,
    loss_scale_factor=4.0,
    gradient_accumulation_steps=2,
    name="kron_custom",
    preconditioner_mode="EQ",
    whiten_grad=True,
    max_skew_triangular=2.0,
    merge_dims=True,
    block_size=16,
    cached=False,
    update_clipping="value",
    update_clip_value=3.0,
    decision_rule="accumulator",
    beta_lipschitz=0.5,
    damping=1e-6,
    damping_rule="mean_abs",
    norm_bound="rowcol",
    balance_probability=0.5,
    seed=123,
    nonfinite="raise",
)


def test_config_round_trip_keeps_every_option() -> None:
    optimizer = Kron(**NON_DEFAULT)
    config = optimizer.get_config()
    assert set(NON_DEFAULT) <= set(config)
    restored = Kron.from_config(json.loads(json.dumps(config)))  # through JSON, as in a .keras
    assert restored.get_config() == config
    assert restored.step_options == optimizer.step_options
    assert isinstance(restored.preconditioner_update_probability, UpdateProbability)
    assert restored.preconditioner_update_probability.get_config() == {
        "max_prob": 0.9,
        "min_prob": 0.1,
        "decay": 0.01,
        "flat_start": 20,
    }
    assert float(restored.learning_rate) == float(optimizer.learning_rate)
    for name, value in NON_DEFAULT.items():
        if not callable(value) and not isinstance(
            value, keras.optimizers.schedules.LearningRateSchedule
        ):
            assert config[name] == value, name


def test_default_config_round_trips_through_keras_serialization() -> None:
    optimizer = Kron()
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored, Kron)
    assert restored.get_config() == optimizer.get_config()
    assert restored.get_config()["max_skew_triangular"] == math.inf
    assert restored.preconditioner_update_probability is None  # the default schedule


def _model() -> keras.Model:
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(12, activation="tanh"), keras.layers.Dense(10)]
    )


def _compile(model: keras.Model) -> None:
    optimizer = Kron(
        learning_rate=keras.optimizers.schedules.ExponentialDecay(0.02, 4, 0.9),
        weight_decay=0.01,
        # The probability falls from 1 within the run, so the decision counter matters; random
        # balancing and the per-variable init scale make the RNG and counts matter too.
        preconditioner_update_probability=UpdateProbability(1.0, 0.3, 0.5, 3),
        balance_probability=0.5,
        precond_init_scale=None,
        seed=5,
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=keras.backend.backend() != "jax",
    )


def test_save_load_resumes_the_uninterrupted_run(tmp_path) -> None:
    data = load_digits()
    x, y = (data.data[:192] / 16.0).astype(np.float32), data.target[:192].astype(np.int32)
    fit = dict(batch_size=32, verbose=0, shuffle=False)

    straight = _model()
    _compile(straight)
    straight.fit(x, y, epochs=2, **fit)

    first = _model()
    _compile(first)
    first.fit(x, y, epochs=1, **fit)
    path = str(tmp_path / "m.keras")
    first.save(path)
    resumed = keras.models.load_model(path)
    assert isinstance(resumed.optimizer, Kron)
    assert int(resumed.optimizer.iterations) == 6
    resumed.fit(x, y, epochs=1, **fit)

    assert int(resumed.optimizer.iterations) == int(straight.optimizer.iterations) == 12
    for a, b in zip(resumed.trainable_weights, straight.trainable_weights):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-6, atol=1e-7)
    assert len(resumed.optimizer.variables) == len(straight.optimizer.variables)
    for a, b in zip(resumed.optimizer.variables, straight.optimizer.variables):
        np.testing.assert_allclose(
            to_numpy(a).astype(np.float64), to_numpy(b).astype(np.float64), rtol=1e-6, atol=1e-7
        )
    # the optimizer state matters: a fresh optimizer from the same weights ends elsewhere
    restarted = _model()
    _compile(restarted)
    restarted.set_weights(first.get_weights())
    restarted.fit(x, y, epochs=1, **fit)
    assert not np.allclose(
        to_numpy(restarted.trainable_weights[0]), to_numpy(straight.trainable_weights[0]), atol=1e-6
    )


def _stepped(**options) -> tuple[list, Kron]:
    """An optimizer one step into training two variables, built with ``options``."""
    variables = [keras.Variable(np.ones((4, 3), "float32")), keras.Variable(np.ones(3, "float32"))]
    optimizer = Kron(learning_rate=0.1, **options)
    optimizer.apply([keras.ops.ones((4, 3)), keras.ops.ones(3)], variables)
    return variables, optimizer


def _saved(optimizer: Kron) -> dict:
    store: dict = {}
    optimizer.save_own_variables(store)
    return store


def _values(optimizer: Kron) -> list[np.ndarray]:
    return [to_numpy(v).copy() for v in optimizer.variables]


# Four of the optimizer's own (iteration, learning_rate, seed, decision_counter), then 8 for the
# (4, 3) variable (momentum, two factors, two estimates, two caches, count) and 5 for the (3,).
SAVED = "17 variables were saved and this optimizer has"


@pytest.mark.parametrize(
    ("saved", "loaded", "message"),
    [
        (dict(cached=True), dict(cached=False), f"{SAVED} 14"),
        (dict(), dict(preconditioner_mode="PRO4P"), f"{SAVED} 14"),  # no caches
        (dict(), dict(use_ema=True), f"{SAVED} 19"),  # the two moving averages
        (dict(), dict(max_size_triangular=3), "was saved with shape (1, 4, 4) and this optim"),
    ],
    ids=["cached", "geometry", "ema", "layout"],
)
def test_state_saved_with_other_options_is_refused(saved, loaded, message) -> None:
    """Keras only warned "Skipping variable loading" and kept none of the state (iterations back
    to 0) when the counts differed, and failed half-way through when only the shapes did."""
    variables, source = _stepped(**saved)
    target = Kron(learning_rate=0.1, **loaded)
    target.build(variables)
    before = _values(target)
    with pytest.raises(ValueError) as error:
        target.load_own_variables(_saved(source))
    assert message in str(error.value)
    option = next(iter(loaded))
    assert option in str(error.value)  # the option that changed the count or shapes
    for a, b in zip(before, _values(target)):
        np.testing.assert_array_equal(a, b)  # nothing was loaded


def test_matching_state_loads_every_variable() -> None:
    variables, source = _stepped(cached=False)
    target = Kron(learning_rate=0.1, cached=False)
    target.build(variables)
    target.load_own_variables(_saved(source))
    assert int(target.iterations) == 1
    for a, b in zip(_values(source), _values(target)):
        np.testing.assert_array_equal(a, b)


def test_loading_into_an_unbuilt_optimizer_is_left_to_keras() -> None:
    """Keras builds the optimizer before it loads (``load_model``); one that is not built yet
    has nothing to compare with, and Keras warns and loads nothing, as it does for Adam."""
    _, source = _stepped()
    target = Kron(learning_rate=0.1)
    with pytest.warns(UserWarning, match="Skipping variable loading"):
        target.load_own_variables(_saved(source))
    assert not target.built and int(target.iterations) == 0


def test_load_weights_with_other_options_raises(tmp_path) -> None:
    """Through ``model.load_weights``: Keras reports the optimizer's error, which names the
    counts and the options."""
    path = str(tmp_path / "m.weights.h5")
    saved = _model()
    saved.compile(optimizer=Kron(cached=True), loss="mse")
    saved.optimizer.build(saved.trainable_variables)
    saved.save_weights(path)

    loaded = _model()
    loaded.compile(optimizer=Kron(cached=False), loss="mse")
    loaded.optimizer.build(loaded.trainable_variables)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Skipping variable loading" warning instead
        with pytest.raises(ValueError, match="variables were saved and this optimizer has"):
            loaded.load_weights(path)


def test_a_model_saved_before_fit_loads(tmp_path) -> None:
    """A model compiled and saved before training (initial weights) holds an unbuilt optimizer:
    iterations and the learning rate only. Loading it, or its weights into a trained model,
    loads as Keras's own optimizers do, with nothing to lose."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer=Kron(learning_rate=0.1), loss="mse")
    model.save(tmp_path / "initial.keras")
    loaded = keras.models.load_model(tmp_path / "initial.keras")
    x, y = np.ones((8, 4), "float32"), np.zeros((8, 3), "float32")
    loaded.fit(x, y, epochs=1, verbose=0)
    assert int(loaded.optimizer.iterations) == 1
    loaded.load_weights(tmp_path / "initial.keras")
