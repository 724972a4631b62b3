"""PSGD-Kron for PyTorch: :class:`Kron`, a ``torch.optim.Optimizer``."""

from kron.torch.optimizer import Kron

__all__ = ["Kron"]
