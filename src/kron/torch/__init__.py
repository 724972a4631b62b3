"""PSGD-Kron for PyTorch: :class:`Kron`, a ``torch.optim.Optimizer``, and heavyball 1.5's
``ForeachPSGDKron`` family by name (:mod:`kron.torch.heavyball_classes`)."""

from kron.torch.heavyball_classes import (
    ForeachCachedDelayedPSGDKron,
    ForeachCachedPSGDKron,
    ForeachDelayedPSGD,
    ForeachPSGDKron,
    ForeachPurePSGD,
)
from kron.torch.optimizer import Kron

__all__ = [
    "ForeachCachedDelayedPSGDKron",
    "ForeachCachedPSGDKron",
    "ForeachDelayedPSGD",
    "ForeachPSGDKron",
    "ForeachPurePSGD",
    "Kron",
]
