"""kron: PSGD-Kron (Kronecker-factored preconditioned SGD) for NumPy, PyTorch, JAX and Keras 3.

Front ends live in submodules and import their framework only when imported themselves:
``kron.numpy.KronPsgd``, ``kron.torch.Kron``, ``kron.optax.kron`` and ``kron.keras.Kron``, with the
math they share in ``kron.core``. ``from kron import Kron`` gives the Keras optimizer, as in the
Keras ``Kron`` contract this library honours; Keras is imported only then.
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "Kron":
        from kron.keras import Kron

        return Kron
    raise AttributeError(f"module 'kron' has no attribute {name!r}")
