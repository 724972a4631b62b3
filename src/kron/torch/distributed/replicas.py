"""Process-group checks, byte packing of mixed tensors, and the ``resync`` broadcast.

Replicated training needs no communication from the optimizer: every random draw of
:class:`kron.torch.Kron` derives from ``(seed, step, group, parameter index, stream)``, never from
the global RNG or anything rank-local, so ranks fed the same averaged gradients take the same
steps. ``resync`` only cancels floating-point drift (e.g. from a non-deterministic all-reduce);
it is a broadcast from rank 0 every N steps.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

# Each tensor's bytes start at a multiple of this, so that any dtype can view its slice in place.
_ALIGN = 16


def require_process_group(group: Any, what: str) -> Any:
    """The process group to use (``group``, or the default one when None) after checking that
    ``torch.distributed`` is initialised; raises ``ValueError`` naming ``what`` otherwise."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"{what} needs an initialised torch.distributed process group and none is; call "
            "torch.distributed.init_process_group (backend 'gloo' on CPU, 'nccl' on CUDA) first."
        )
    return dist.group.WORLD if group is None else group


def group_ranks(group: Any) -> list[int]:
    """Global ranks of ``group``'s members, in group-rank order."""
    return list(dist.get_process_group_ranks(group))


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def packed_size(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of the buffer :func:`pack` makes for tensors of these shapes and dtypes."""
    return sum(_aligned(t.numel() * t.element_size()) for t in tensors)


def pack(tensors: Sequence[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """The tensors' bytes in one ``uint8`` buffer (any mix of dtypes and shapes; each slice is
    aligned so that :func:`unpack` can view it back as its dtype)."""
    device = device or (tensors[0].device if tensors else torch.device("cpu"))
    buffer = torch.zeros(packed_size(tensors), dtype=torch.uint8, device=device)
    offset = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if nbytes:
            flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
            buffer[offset : offset + nbytes].copy_(flat)
        offset += _aligned(nbytes)
    return buffer


def unpack(buffer: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy :func:`pack`'s buffer back into ``tensors`` (in place; shapes and dtypes as packed)."""
    offset = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if nbytes:
            raw = buffer[offset : offset + nbytes].view(t.dtype).view(t.shape)
            t.detach().copy_(raw)
        offset += _aligned(nbytes)


def state_tensors(state: dict[str, Any]) -> list[torch.Tensor]:
    """Every tensor of one parameter's state, in a fixed order (sorted keys, lists in order)."""
    found: list[torch.Tensor] = []
    for key in sorted(state):
        value = state[key]
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, list | tuple):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


def broadcast_state(
    optimizer: torch.optim.Optimizer,
    params: Iterable[torch.Tensor],
    src: int = 0,
    group: Any = None,
) -> None:
    """Overwrite ``params`` and their optimizer state on every rank with rank ``src``'s (a rank
    of ``group``, default the default group), in one broadcast of packed bytes.

    Every rank must hold state of the same structure for these parameters (as replicas do); this
    is checked first with an all-gather of a small signature, and a mismatch raises
    ``ValueError`` on every rank instead of corrupting memory.
    """
    group = require_process_group(group, "broadcast_state")
    tensors: list[torch.Tensor] = []
    for p in params:
        tensors.append(p.data)
        if p in optimizer.state:
            tensors.extend(state_tensors(optimizer.state[p]))
    device = tensors[0].device if tensors else torch.device("cpu")
    # Python's hash() differs between processes; crc32 of the layout's text does not.
    layout = zlib.crc32(";".join(f"{t.dtype}{tuple(t.shape)}" for t in tensors).encode())
    signature = torch.tensor(
        [len(tensors), packed_size(tensors), layout], dtype=torch.int64, device=device
    )
    signatures = [torch.empty_like(signature) for _ in range(dist.get_world_size(group))]
    dist.all_gather(signatures, signature, group=group)
    if any(not torch.equal(s, signatures[src]) for s in signatures):
        raise ValueError(
            "broadcast_state: ranks hold optimizer state of different structure "
            f"([tensors, bytes, layout hash] per rank: {[s.tolist() for s in signatures]}); "
            "replicas must step the same parameters."
        )
    if not tensors:
        return
    rank = dist.get_rank(group)
    buffer = (
        pack(tensors, device)
        if rank == src
        else torch.empty(packed_size(tensors), dtype=torch.uint8, device=device)
    )
    dist.broadcast(buffer, src=group_ranks(group)[src], group=group)
    if rank != src:
        unpack(buffer, tensors)
