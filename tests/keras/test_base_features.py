"""Keras's shared optimizer features work with Kron as they do with Keras's own Adam: EMA,
gradient accumulation, gradient clipping and loss scaling (all done by the base class)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kron.keras import Kron

from ._helpers import to_numpy

SHAPES = [(4, 3), (3,)]


def _make(name: str, **options):
    if name == "kron":
        return Kron(learning_rate=0.05, preconditioner_update_probability=0.5, **options)
    return keras.optimizers.Adam(learning_rate=0.05, **options)


def _grads(steps: int, seed: int = 0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(steps)]


def _variables() -> list:
    rng = np.random.default_rng(42)
    return [keras.Variable(rng.standard_normal(s), dtype="float32") for s in SHAPES]


def _apply(optimizer, variables, grads) -> list[list[np.ndarray]]:
    """Apply each step's gradients; the variables' values after every step."""
    history = []
    for step in grads:
        optimizer.apply([keras.ops.convert_to_tensor(g) for g in step], variables)
        history.append([to_numpy(v) for v in variables])
    return history


@pytest.mark.parametrize("name", ["kron", "adam"])
def test_ema_follows_keras_rule(name: str) -> None:
    """The averages obey Keras's EMA (the first step copies the variables) and
    ``finalize_variable_values`` writes them into the model variables."""
    variables = _variables()
    optimizer = _make(name, use_ema=True, ema_momentum=0.8)
    history = _apply(optimizer, variables, _grads(4))
    expected = history[0]
    for values in history[1:]:
        expected = [0.8 * e + 0.2 * v for e, v in zip(expected, values)]
    averages = [to_numpy(a) for a in optimizer._model_variables_moving_average]
    for a, e, v in zip(averages, expected, history[-1]):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)
        assert not np.allclose(a, v)
    optimizer.finalize_variable_values(variables)
    for variable, e in zip(variables, expected):
        np.testing.assert_allclose(to_numpy(variable), e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["kron", "adam"])
def test_gradient_accumulation_averages_micro_steps(name: str) -> None:
    """With 2 accumulation steps the variables change only on every second call, and the run
    equals the plain one fed the mean of each pair of gradients (same iteration count)."""
    grads = _grads(4)
    accumulated_vars = _variables()
    accumulating = _make(name, gradient_accumulation_steps=2)
    history = _apply(accumulating, accumulated_vars, grads)
    start = [to_numpy(v) for v in _variables()]
    for a, b in zip(history[0], start):
        np.testing.assert_array_equal(a, b)  # first micro-step: no update
    assert not np.allclose(history[1][0], start[0])
    np.testing.assert_array_equal(history[2][0], history[1][0])
    assert int(accumulating.iterations) == 2

    plain_vars = _variables()
    plain = _make(name)
    means = [[(a + b) / 2 for a, b in zip(grads[i], grads[i + 1])] for i in (0, 2)]
    plain_history = _apply(plain, plain_vars, means)
    for a, b in zip(history[-1], plain_history[-1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "option, clip",
    [
        ("clipvalue", lambda gs: [np.clip(g, -0.5, 0.5) for g in gs]),
        ("clipnorm", lambda gs: [g * min(1.0, 0.5 / np.linalg.norm(g)) for g in gs]),
        (
            "global_clipnorm",
            lambda gs: [
                g * min(1.0, 0.5 / np.sqrt(sum(float(np.sum(h * h)) for h in gs))) for g in gs
            ],
        ),
    ],
)
def test_gradient_clipping_options(option: str, clip) -> None:
    """Kron with a clipping option equals Kron fed gradients clipped by hand."""
    grads = _grads(3)
    clipped = _apply(_make("kron", **{option: 0.5}), _variables(), grads)
    by_hand = _apply(_make("kron"), _variables(), [clip(step) for step in grads])
    unclipped = _apply(_make("kron"), _variables(), grads)
    for a, b in zip(clipped[-1], by_hand[-1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(clipped[-1][0], unclipped[-1][0])


def test_loss_scale_factor_unscales_gradients() -> None:
    grads = _grads(3)
    optimizer = _make("kron", loss_scale_factor=8.0)
    assert float(to_numpy(optimizer.scale_loss(keras.ops.convert_to_tensor(2.0)))) == 16.0
    scaled = _apply(optimizer, _variables(), [[8.0 * g for g in step] for step in grads])
    plain = _apply(_make("kron"), _variables(), grads)
    for a, b in zip(scaled[-1], plain[-1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
