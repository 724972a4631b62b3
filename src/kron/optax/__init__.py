"""PSGD-Kron for JAX: optax transformations over :mod:`kron.core` (psgdax's contract)."""

from kron.optax.alias import kron
from kron.optax.transform import KronState, scale_by_kron

__all__ = ["KronState", "kron", "scale_by_kron"]
