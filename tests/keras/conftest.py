"""The Keras suite runs once per Keras backend, each in its own process:
``KERAS_BACKEND=tensorflow|jax|torch python -m pytest tests/keras`` (``scripts/test.sh`` does all
three). Without ``KERAS_BACKEND`` it runs on JAX, which shares a process with the main suite's
torch and JAX safely (TensorFlow may not)."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's start-up chatter
# XLA (JAX, TensorFlow with jit_compile) spends most of this suite compiling small programs; its
# LLVM optimisations only speed up the compiled code, which these tests run a few times each.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)

import keras
import pytest

BACKEND = keras.backend.backend()
if BACKEND != os.environ["KERAS_BACKEND"]:
    raise RuntimeError(
        f"Keras was imported with backend {BACKEND!r} before tests/keras/conftest.py could select "
        f"{os.environ['KERAS_BACKEND']!r}; run the Keras suite in its own process."
    )

if BACKEND == "torch":
    import torch

    # The suite's tensors are tiny: on a busy 2-core machine torch's intra-op threads only
    # contend (a 32×32 matmul took 15 ms with 2 threads against 20 µs with 1).
    torch.set_num_threads(1)


def pytest_configure(config) -> None:
    # Keras's convert_to_numpy calls np.array(x, copy=False) on the backends' tensors.
    config.addinivalue_line(
        "filterwarnings", "ignore:__array__ implementation doesn't accept:DeprecationWarning"
    )


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Every test starts from float32 defaults, the float32 policy and seeded initializers."""
    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(0)
    yield
    keras.mixed_precision.set_global_policy("float32")
