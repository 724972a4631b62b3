"""Seed 000's contract: its parameters keep its defaults, and ``b1=0`` works with its default
fitting target."""

from __future__ import annotations

import inspect

import keras
import numpy as np

from kron.keras import Kron

from ._helpers import to_numpy

# Seed 000's documented defaults (shared/seeds/000: the parameter list and its example).
SEED_000_DEFAULTS = {
    "learning_rate": 0.0003,
    "weight_decay": 0.0,
    "b1": 0.9,
    "preconditioner_update_probability": None,
    "max_size_triangular": 8192,
    "min_ndim_triangular": 2,
    "memory_save_mode": None,
    "momentum_into_precond_update": True,
    "precond_lr": 0.1,
    "precond_init_scale": 1.0,
    "mu_dtype": None,
    "precond_dtype": "float32",
    "clipnorm": None,
    "clipvalue": None,
    "global_clipnorm": None,
    "use_ema": False,
    "ema_momentum": 0.99,
    "ema_overwrite_frequency": None,
    "loss_scale_factor": None,
    "gradient_accumulation_steps": None,
    "name": "kron",
}


def test_seed_000_parameters_keep_their_defaults() -> None:
    parameters = inspect.signature(Kron).parameters
    defaults = {name: parameters[name].default for name in SEED_000_DEFAULTS}
    assert defaults == SEED_000_DEFAULTS
    # ... in seed 000's order, so its positional calls mean the same
    assert list(parameters)[: len(SEED_000_DEFAULTS)] == list(SEED_000_DEFAULTS)


def _trajectory(**options) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    variables = [keras.Variable(rng.standard_normal((5, 3)), dtype="float32")]
    optimizer = Kron(learning_rate=0.05, preconditioner_update_probability=1.0, **options)
    for _ in range(4):
        grad = rng.standard_normal((5, 3)).astype(np.float32)
        optimizer.apply([keras.ops.convert_to_tensor(grad)], variables)
    return [to_numpy(v) for v in variables]


def test_without_momentum_fitting_on_the_momentum_is_fitting_on_the_gradient() -> None:
    """With ``b1=0`` the momentum is the gradient, so seed 000's default target needs no b1."""
    on_momentum = _trajectory(b1=0.0, momentum_into_precond_update=True)
    on_gradient = _trajectory(b1=0.0, momentum_into_precond_update=False)
    with_momentum = _trajectory(b1=0.9, momentum_into_precond_update=True)
    np.testing.assert_array_equal(on_momentum[0], on_gradient[0])
    assert not np.allclose(on_momentum[0], with_momentum[0])
