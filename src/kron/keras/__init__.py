"""Keras 3 front end: :class:`Kron`, a ``keras.optimizers.Optimizer`` over :mod:`kron.core` that
runs on the TensorFlow, JAX and PyTorch backends (see ``docs/keras.md``)."""

from kron.keras.optimizer import Kron
from kron.keras.schedules import UpdateProbability

__all__ = ["Kron", "UpdateProbability"]
