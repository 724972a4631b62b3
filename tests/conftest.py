"""Shared fixtures. The core suite runs once per ops backend (``ops`` fixture)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from kron.core import get_ops

# The core suite checks float64 invariants; JAX computes in float32 unless told otherwise.
jax.config.update("jax_enable_x64", True)

BACKENDS = ("numpy", "torch", "jax")


class Backend:
    """An ops backend plus conversions to and from NumPy, for tests."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ops = get_ops(name)

    def array(self, x) -> object:
        x = np.asarray(x)
        if self.name == "torch":
            import torch

            return torch.as_tensor(x)
        if self.name == "jax":
            import jax.numpy as jnp

            return jnp.asarray(x)
        return x

    def numpy(self, x) -> np.ndarray:
        if self.name == "torch":
            return x.detach().cpu().numpy()
        return np.asarray(x)


@pytest.fixture(params=BACKENDS)
def backend(request) -> Backend:
    return Backend(request.param)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
