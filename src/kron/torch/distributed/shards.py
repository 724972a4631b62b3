"""DTensor parameters sharded on a 1-D mesh (FSDP2's ``fully_shard``): gathering a full
parameter and gradient onto the rank that owns its preconditioner, and scattering the updated
parameter back to the local shards.

``Shard(dim)`` on a mesh of ``W`` ranks splits ``dim`` like ``torch.chunk``: chunks of
``c = ceil(n / W)`` rows, the last ones shorter or empty. Collectives need equal sizes, so every
chunk travels zero-padded to ``c`` rows and is trimmed on arrival.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
import torch.distributed as dist


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a DTensor. Does not import ``torch.distributed.tensor`` (about a second):
    if nothing has imported it, no DTensor exists."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


class ShardSpec:
    """How one DTensor parameter is split over the optimizer's ranks.

    Args:
      param: a DTensor on a 1-D mesh with a single ``Shard(dim)`` placement.
      ranks: global ranks of the optimizer's process group, in group-rank order; the mesh must
        list the same ranks in the same order (true for ``init_device_mesh(device, (W,))`` over
        the default group).
      name: how to name the parameter in errors.

    Attributes:
      dim: the sharded axis (non-negative).
      sizes: rows of ``dim`` held by each group rank, e.g. ``[4, 3]`` for 7 rows on 2 ranks.
      chunk_shape: shape of one padded chunk (the global shape with ``dim`` set to ``max(sizes)``).
    """

    def __init__(self, param: torch.Tensor, ranks: list[int], name: str) -> None:
        from torch.distributed.tensor import Shard

        mesh, placements = param.device_mesh, tuple(param.placements)
        if mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard):
            raise ValueError(
                f"DistributedKron supports DTensor parameters sharded on a 1-D mesh with one "
                f"Shard(dim) placement (FSDP2's fully_shard); {name} has placements {placements} "
                f"on a mesh of shape {tuple(mesh.shape)}."
            )
        mesh_ranks = [int(r) for r in mesh.mesh.flatten().tolist()]
        if mesh_ranks != ranks:
            raise ValueError(
                f"The device mesh of {name} spans ranks {mesh_ranks}; DistributedKron's process "
                f"group has ranks {ranks}. Give DistributedKron the mesh's group "
                "(process_group=mesh.get_group())."
            )
        self.name = name
        self.placements = placements
        self.dim = placements[0].dim % param.ndim
        n, world = param.shape[self.dim], len(ranks)
        step = math.ceil(n / world) if n else 0
        self.sizes = [max(0, min(step, n - r * step)) for r in range(world)]
        shape = list(param.shape)
        shape[self.dim] = step
        self.chunk_shape = tuple(shape)

    def pad(self, local: torch.Tensor, rank: int) -> torch.Tensor:
        """``local`` (this rank's shard) zero-padded to :attr:`chunk_shape`."""
        if local.shape[self.dim] != self.sizes[rank]:
            raise ValueError(
                f"{self.name}: the local shard on group rank {rank} has {local.shape[self.dim]} "
                f"rows along dim {self.dim}; torch.chunk's split gives {self.sizes[rank]} "
                f"(sizes per rank {self.sizes}). Only torch.chunk-style Shard placements are "
                "supported."
            )
        out = local.new_zeros(self.chunk_shape)
        out.narrow(self.dim, 0, self.sizes[rank]).copy_(local)
        return out

    def assemble(self, chunks: list[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's padded chunk (in group-rank order)."""
        return torch.cat(
            [c.narrow(self.dim, 0, size) for c, size in zip(chunks, self.sizes)], dim=self.dim
        )

    def split(self, full: torch.Tensor) -> list[torch.Tensor]:
        """``full`` cut into one padded chunk per rank (the inverse of :meth:`assemble`)."""
        chunks, start = [], 0
        for size in self.sizes:
            chunk = full.new_zeros(self.chunk_shape)
            chunk.narrow(self.dim, 0, size).copy_(full.narrow(self.dim, start, size))
            chunks.append(chunk)
            start += size
        return chunks


def local_part(x: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """The local tensor of DTensor ``x``, redistributed to the parameter's placements first if it
    has others (a collective: every rank must call it for the same tensors in the same order)."""
    if tuple(x.placements) != spec.placements:
        x = x.redistribute(placements=spec.placements)
    return x.to_local()


class Gather:
    """A pending gather of one sharded tensor onto ``owner`` (group rank), started at once."""

    def __init__(self, local: torch.Tensor, spec: ShardSpec, rank: int, owner: int, ranks, group):
        self.spec, self.mine = spec, rank == owner
        self.sent = spec.pad(local, rank)  # kept alive until the collective finishes
        self.received = [torch.empty_like(self.sent) for _ in ranks] if self.mine else None
        self.work = dist.gather(
            self.sent, gather_list=self.received, dst=ranks[owner], group=group, async_op=True
        )

    def result(self) -> torch.Tensor | None:
        """The full tensor on the owner (None elsewhere), after waiting for the gather."""
        self.work.wait()
        return self.spec.assemble(self.received) if self.mine else None


class Scatter:
    """A pending scatter of the owner's full tensor into every rank's local shard."""

    def __init__(self, full, local, spec: ShardSpec, rank: int, owner: int, ranks, group):
        self.spec, self.local, self.rank = spec, local, rank
        self.chunks = spec.split(full) if rank == owner else None
        self.received = local.new_empty(spec.chunk_shape)
        self.work = dist.scatter(
            self.received, scatter_list=self.chunks, src=ranks[owner], group=group, async_op=True
        )

    def finish(self) -> None:
        self.work.wait()
        self.local.copy_(self.received.narrow(self.spec.dim, 0, self.spec.sizes[self.rank]))
