"""PSGD-Kron with ``torch.distributed`` (see ``docs/distributed.md``).

* Replicated training (DDP): plain :class:`kron.torch.Kron` keeps replicas identical without
  communicating (all randomness is counter-based); its ``resync`` option re-broadcasts
  parameters and state from rank 0 every N steps.
* :class:`DistributedKron`: each parameter's preconditioner is fitted, applied and stored on one
  owner rank, chosen to balance the cost; works with DDP and with FSDP2 (DTensor) parameters.
* :func:`load_template`: load owner-only state from a ``torch.distributed.checkpoint`` saved at
  any world size.
"""

from kron.torch.distributed.assignment import Cost, assign_owners, parameter_cost
from kron.torch.distributed.checkpoint import load_template
from kron.torch.distributed.optimizer import DistributedKron
from kron.torch.distributed.replicas import broadcast_state

__all__ = [
    "Cost",
    "DistributedKron",
    "assign_owners",
    "broadcast_state",
    "load_template",
    "parameter_cost",
]
