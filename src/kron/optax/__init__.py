"""kron.optax: PSGD-Kron for JAX as optax transformations (psgdax's and eformer's contracts)."""

from kron.optax.alias import kron
from kron.optax.state import KronState, leaf_key
from kron.optax.transform import scale_by_kron

__all__ = ["KronState", "kron", "leaf_key", "scale_by_kron"]
