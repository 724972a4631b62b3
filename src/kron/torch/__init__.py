"""PSGD-Kron for PyTorch: :class:`Kron`, a ``torch.optim.Optimizer``, heavyball 1.5's
``ForeachPSGDKron`` family by name (and its short names) (:mod:`kron.torch.heavyball_classes`), and
:func:`load_kron_torch_state`, which continues a run kron_torch's ``Kron`` started
(:mod:`kron.torch.migration`)."""

from kron.torch.heavyball_classes import (
    CachedDelayedPSGDKron,
    CachedPSGDKron,
    DelayedPSGD,
    ForeachCachedDelayedPSGDKron,
    ForeachCachedPSGDKron,
    ForeachDelayedPSGD,
    ForeachPSGDKron,
    ForeachPurePSGD,
    PSGDKron,
    PurePSGD,
)
from kron.torch.migration import KRON_TORCH_OPTIONS, load_kron_torch_state
from kron.torch.optimizer import Kron

__all__ = [
    "KRON_TORCH_OPTIONS",
    "CachedDelayedPSGDKron",
    "CachedPSGDKron",
    "DelayedPSGD",
    "ForeachCachedDelayedPSGDKron",
    "ForeachCachedPSGDKron",
    "ForeachDelayedPSGD",
    "ForeachPSGDKron",
    "ForeachPurePSGD",
    "Kron",
    "PSGDKron",
    "PurePSGD",
    "load_kron_torch_state",
]
