"""``DistributedKron``: :class:`kron.torch.Kron` with each parameter's preconditioner owned by one
rank.

Every rank runs the same ``step()``; the work differs:

1. gradients reach the owners: DTensor (FSDP2) shards are gathered onto the owner, together
   with the parameter's shards; with ``reduce_grads=True`` plain gradients are summed onto the
   owner (otherwise they are assumed already averaged, as DDP leaves them);
2. each rank steps only the parameters it owns, one chunk (same group, shape and dtype: one
   batched ``kron_step``) at a time, exactly as single-process ``Kron`` would: the random words
   are ``(seed, step, group index, parameter index in the group)``, so the owner draws the same
   noise wherever the parameter lands;
3. after each chunk, every rank launches the asynchronous collectives that publish that chunk
   (a broadcast of the updated plain parameters, a scatter of each updated DTensor into the
   local shards) and goes on with its next chunk; all are waited for at the end.

Collectives must be issued in the same order on every rank. The order here is fixed by the
assignment alone: gathers in parameter order, then round ``k`` publishes every rank's ``k``-th
chunk in rank order. The set of parameters with a gradient must be the same on every rank (as
DDP and FSDP guarantee).
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from kron.torch.distributed.assignment import CALL_OVERHEAD, assign_owners, parameter_cost
from kron.torch.distributed.replicas import (
    group_ranks,
    pack,
    packed_size,
    require_process_group,
    unpack,
)
from kron.torch.distributed.shards import Gather, Scatter, ShardSpec, is_dtensor, local_part
from kron.torch.gradients import usable_gradient
from kron.torch.optimizer import Kron


class _Entry(NamedTuple):
    """One parameter in the schedule: its group, index in the group, position in the state dict
    (the index over all groups), the tensor, its owner (group rank) and its shard layout (None
    for a plain tensor)."""

    gi: int
    index: int
    position: int
    param: torch.Tensor
    owner: int
    spec: ShardSpec | None


class _Unpack:
    """A pending broadcast of packed parameters; ``finish`` copies them in on receivers."""

    def __init__(self, work: Any, buffer: torch.Tensor, targets: list[torch.Tensor]) -> None:
        self.work, self.buffer, self.targets = work, buffer, targets

    def finish(self) -> None:
        self.work.wait()
        if self.targets:
            unpack(self.buffer, self.targets)


def _has_step(p: torch.Tensor) -> bool:
    """Whether ``p`` takes part in this step: it has a gradient and at least one element (an
    empty parameter has nothing to precondition, as in ``Kron``)."""
    return p.grad is not None and p.numel() > 0


class DistributedKron(Kron):
    """PSGD-Kron whose preconditioner work and state are split across ranks.

    A drop-in for :class:`kron.torch.Kron` in a data-parallel script: build it on every rank
    with the same parameters and options. Each parameter is owned by one rank, chosen by
    :func:`~kron.torch.distributed.assignment.assign_owners` (same-shape parameters packed
    together so that both fitting and applying steps are balanced, by
    :func:`~kron.torch.distributed.assignment.parameter_cost`); the owner alone holds the
    parameter's state (Q, L, cache, momentum) and computes its update, then every rank receives
    the new values. All ranks end each step with identical parameters.

    Args:
      params: parameters or param groups, identical (same order, same shapes) on every rank.
        Plain tensors (replicated, e.g. under DDP) and DTensors sharded on a 1-D mesh (FSDP2's
        ``fully_shard``) are accepted; for DTensors the owner preconditions the full matrix.
      *args, **kwargs: every argument of :class:`kron.torch.Kron`, with its meaning and default,
        except ``preconditioner_type="newton"`` (not supported: ``ValueError``). ``resync`` is
        accepted and has nothing to do: parameters are published from their single owner every
        step and state is not replicated.
      process_group: the ranks that share the work. Default None: the default process group.
        Must be initialised (``ValueError`` otherwise). DTensor parameters must live on a mesh
        over the same ranks in the same order.
      reduce_grads: False (default): gradients are used as they are, i.e. already averaged over
        ranks (DDP does this; FSDP2 reduce-scatters DTensor gradients). True: for plain
        parameters the optimizer sums each gradient onto its owner (``dist.reduce``, half the
        traffic of an all-reduce) and divides by the world size, for scripts that do not wrap
        the model in DDP; afterwards a non-owner's ``.grad`` holds unspecified values.

    Attributes:
      rank, world_size: this process's rank in ``process_group`` and the group's size.
      owners: owner rank of each parameter, in ``state_dict`` order (over all groups).

    ``state_dict()`` holds only this rank's parameters, keyed by their position over all groups
    (as torch optimizers key state), so the keys do not depend on the world size: save one per
    rank, or all together with ``torch.distributed.checkpoint`` (see
    :func:`kron.torch.distributed.load_template`). ``load_state_dict`` takes any such dict, a
    single-process ``Kron`` state dict included, and keeps the entries this rank owns.
    """

    def __init__(
        self,
        params: Any,
        *args: Any,
        process_group: Any = None,
        reduce_grads: bool = False,
        **kwargs: Any,
    ) -> None:
        self.process_group = require_process_group(process_group, "DistributedKron")
        if not isinstance(reduce_grads, bool):
            raise ValueError(f"reduce_grads must be True or False; got {reduce_grads!r}.")
        self.reduce_grads = reduce_grads
        self.rank = dist.get_rank(self.process_group)
        self.world_size = dist.get_world_size(self.process_group)
        self._ranks = group_ranks(self.process_group)
        self._loads = [(0.0, 0.0)] * self.world_size  # (fit, apply) per rank
        self._owner_of: dict[int, int] = {}
        self._specs: dict[int, ShardSpec | None] = {}
        self._chunks: list[list[list[_Entry]]] | None = None
        self._standins: dict[int, torch.Tensor] = {}  # id(full-size stand-in) -> parameter
        self._full: dict[int, torch.Tensor] = {}  # id(parameter) -> its updated stand-in
        # Per group, the layout options its owned state was last checked against (see
        # _check_owned_layouts); the same on every rank, as the groups are.
        self._checked_layouts: dict[int, Any] = {}
        super().__init__(params, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # Owners, shard specs and stand-ins are keyed by id() of this process's parameters, and
        # a process group does not travel: a copy would fail on its first step.
        raise TypeError(
            "DistributedKron cannot be copied or pickled (its parameter ownership belongs to "
            "this process and its process group); save state_dict() and load it into a new "
            "DistributedKron."
        )

    # -- ownership -----------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``Kron.add_param_group``; the new parameters are assigned owners continuing from
        the current per-rank loads (existing parameters keep theirs). A DTensor parameter
        that is not sharded on a 1-D mesh over the optimizer's ranks raises ``ValueError``."""
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif not isinstance(params, set):  # torch rejects sets (unordered) itself
            params = list(params)
        gi = len(self.param_groups)
        for index, p in enumerate(params):
            if p.is_complex():
                raise ValueError(
                    f"DistributedKron does not support complex parameters (parameter {index} of "
                    f"group {gi}, {p.dtype}); accepted: real floating-point parameters. Kron "
                    f"steps complex parameters as their real views."
                )
        specs = [  # checked before the group is installed, so a bad one leaves no trace
            ShardSpec(p, self._ranks, f"parameter {index} of group {gi} (shape {tuple(p.shape)})")
            if is_dtensor(p)
            else None
            for index, p in enumerate(params)
        ]
        super().add_param_group({**param_group, "params": params})
        group = self.param_groups[-1]
        for p, spec in zip(group["params"], specs):
            self._specs[id(p)] = spec
        layout, _ = self._options(group)
        costs = [parameter_cost(tuple(p.shape), layout) for p in group["params"]]
        buckets = [
            (tuple(p.shape), p.dtype, p.device, None if self.stack_params else index)
            for index, p in enumerate(group["params"])
        ]
        owners = assign_owners(
            costs, self.world_size, self._loads, buckets=buckets, overhead=CALL_OVERHEAD
        )
        for p, owner in zip(group["params"], owners):
            self._owner_of[id(p)] = owner
        self._chunks = None

    def _validate(self, group: dict[str, Any]) -> None:
        if group["preconditioner_type"] == "newton":
            raise ValueError(
                "DistributedKron does not support preconditioner_type='newton' (its "
                "Hessian-vector products need the closure and the full model on the owner); "
                "accepted: 'whitening'."
            )
        super()._validate(group)

    def owner(self, p: torch.Tensor) -> int:
        """The rank (in ``process_group``) that owns parameter ``p``."""
        try:
            return self._owner_of[id(p)]
        except KeyError:
            raise ValueError("owner(p): p is not a parameter of this optimizer.") from None

    @property
    def owners(self) -> list[int]:
        return [self._owner_of[id(p)] for g in self.param_groups for p in g["params"]]

    def _schedule(self) -> list[list[list[_Entry]]]:
        """Per rank, its chunks: owned parameters of one group with the same shape, dtype and
        device (one per parameter without ``stack_params``), in parameter order."""
        if self._chunks is None:
            by_rank: list[dict[Any, list[_Entry]]] = [{} for _ in range(self.world_size)]
            position = 0
            for gi, group in enumerate(self.param_groups):
                for index, p in enumerate(group["params"]):
                    spec, owner = self._specs[id(p)], self._owner_of[id(p)]
                    key = (gi, tuple(p.shape), p.dtype, p.device)
                    if not self.stack_params:
                        key = (*key, index)
                    entry = _Entry(gi, index, position, p, owner, spec)
                    by_rank[owner].setdefault(key, []).append(entry)
                    position += 1
            self._chunks = [list(chunks.values()) for chunks in by_rank]
        return self._chunks

    # -- the step ------------------------------------------------------------------------------

    def _step_all(self, decisions, probes, hvps) -> None:
        chunks = self._schedule()
        active = [any(_has_step(p) for p in g["params"]) for g in self.param_groups]
        contexts = {
            gi: self._group_context(gi, group, decisions[gi])
            for gi, group in enumerate(self.param_groups)
            if active[gi]
        }
        self._check_owned_layouts(contexts)
        arrivals = self._start_arrivals(chunks)
        pending: list[Any] = []
        try:
            for k in range(max(len(c) for c in chunks)):
                if k < len(chunks[self.rank]):
                    self._step_chunk(chunks[self.rank][k], arrivals, contexts, probes, hvps)
                for src in range(self.world_size):
                    if k < len(chunks[src]):
                        pending.extend(self._publish(chunks[src][k]))
            for item in pending:
                item.finish()
        finally:
            self._standins.clear()
            self._full.clear()
        for gi, group in enumerate(self.param_groups):
            if active[gi]:
                self._advance_clock(group, decisions[gi])

    def _check_owned_layouts(self, contexts) -> None:
        """``ValueError`` on every rank, before any collective of the step, when the factors a
        rank holds were made for another layout than a group's options now give (a layout
        option edited between steps). Only the owner holds a parameter's state, so each rank
        checks its own and all agree through one all-reduce; a rank raising alone would leave
        the others waiting in the step's collectives. Done only for a group whose layout
        options have changed since its last check (on its first step, after an edit or a
        load), so a step whose options did not change costs nothing."""
        changed = [gi for gi, ctx in contexts.items() if self._checked_layouts.get(gi) != ctx[0]]
        if not changed:
            return
        error = None
        for gi in changed:
            group = self.param_groups[gi]
            owned = [
                (index, p)
                for index, p in enumerate(group["params"])
                if _has_step(p) and self._owner_of[id(p)] == self.rank
            ]
            try:
                self._check_layouts(gi, owned, contexts[gi][0])
            except ValueError as found:
                error = found
                break
        device = self.param_groups[changed[0]]["params"][0].device
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.process_group)
        if error is not None:
            raise error
        if int(flag.item()):
            raise ValueError(
                "The factors another rank holds were made for another layout than the options "
                "of a group now give (that rank names the parameter). Options that set the "
                "layout (block_size, split, merge_dims, max_size_triangular, "
                "min_ndim_triangular, memory_save_mode, max_skew) cannot change after a "
                "parameter's first step."
            )
        self._checked_layouts.update((gi, contexts[gi][0]) for gi in changed)

    def _start_arrivals(self, chunks) -> dict[int, Any]:
        """Launch, in parameter order, the collectives that bring gradients to their owners: for a
        DTensor a gather of the parameter's and the gradient's shards, for a plain tensor with
        ``reduce_grads`` a sum onto the owner. Keyed by ``id(param)``."""
        entries = sorted((e for rank in chunks for c in rank for e in c), key=lambda e: e.position)
        arrivals: dict[int, Any] = {}
        for e in entries:
            p = e.param
            if not _has_step(p):
                continue
            if e.spec is not None:
                where = (e.spec, self.rank, e.owner, self._ranks, self.process_group)
                arrivals[id(p)] = (
                    Gather(p.to_local(), *where),
                    Gather(local_part(p.grad, e.spec), *where),
                )
                continue
            if self.reduce_grads:
                arrivals[id(p)] = dist.reduce(
                    p.grad,
                    dst=self._ranks[e.owner],
                    op=dist.ReduceOp.SUM,
                    group=self.process_group,
                    async_op=True,
                )
        return arrivals

    def _step_chunk(self, chunk, arrivals, contexts, probes, hvps) -> None:
        """Step this rank's chunk as single-process ``Kron`` steps those parameters."""
        members = []
        for e in chunk:
            p = e.param
            if not _has_step(p):
                continue
            if e.spec is not None:
                param_shards, grad_shards = arrivals[id(p)]
                full = param_shards.result()
                full.grad = grad_shards.result()
                self._standins[id(full)] = p
                self._full[id(p)] = full
                members.append((e.index, full))
                continue
            if id(p) in arrivals:  # reduce_grads: the sum arrives here; make it the mean
                arrivals[id(p)].wait()
                p.grad.div_(self.world_size)
            members.append((e.index, p))
        if not members:
            return
        gi = chunk[0].gi
        for bucket in self._buckets(members):
            self._step_bucket(gi, self.param_groups[gi], bucket, *contexts[gi], probes, hvps)

    def _publish(self, chunk) -> list[Any]:
        """Launch the collectives that give every rank the updated values of ``chunk`` (owned by
        ``chunk[0].owner``): one broadcast of the plain parameters, packed; one scatter per
        DTensor into the local shards."""
        src, group = chunk[0].owner, self.process_group
        entries = [e for e in chunk if _has_step(e.param)]
        pending: list[Any] = []
        plain = [e.param for e in entries if e.spec is None]
        if plain:
            if src == self.rank:
                buffer = pack(plain)
            else:
                buffer = torch.empty(packed_size(plain), dtype=torch.uint8, device=plain[0].device)
            work = dist.broadcast(buffer, src=self._ranks[src], group=group, async_op=True)
            pending.append(_Unpack(work, buffer, [] if src == self.rank else plain))
        for e in entries:
            if e.spec is None:
                continue
            full = self._full.get(id(e.param)) if src == self.rank else None
            local = e.param.to_local()
            pending.append(Scatter(full, local, e.spec, self.rank, src, self._ranks, group))
        return pending

    def _state_for(self, p: torch.Tensor) -> dict[str, Any]:
        return self.state[self._standins.get(id(p), p)]

    def _resync_if_due(self, clocks: list[int]) -> None:
        """Nothing to resync: each parameter is published from its single owner every step."""

    def _raise_on_nonfinite(self) -> None:
        """``nonfinite="raise"``: every rank checks its local gradients (shards for DTensors) and
        all agree, through one all-reduce, on the first parameter with a NaN or Inf."""
        params = [
            (gi, i, p) for gi, g in enumerate(self.param_groups) for i, p in enumerate(g["params"])
        ]
        first = len(params)
        for position, (_, _, p) in enumerate(params):
            grad = p.grad
            if grad is None:
                continue
            local = grad.to_local() if is_dtensor(grad) else grad
            if not usable_gradient(local, self.param_groups[params[position][0]]):
                first = position
                break
        device = params[0][2].device if params else torch.device("cpu")
        flag = torch.tensor([first], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.process_group)
        first = int(flag.item())
        if first < len(params):
            gi, index, p = params[first]
            raise FloatingPointError(
                f"Non-finite gradient in parameter {index} of group {gi} (shape "
                f"{tuple(p.shape)}) on at least one rank; nothing was updated."
            )

    # -- checkpoints ---------------------------------------------------------------------------

    def _load(self, state_dict: dict[str, Any]) -> None:
        """Load the param groups, and the state of the parameters this rank owns (entries for
        other parameters are ignored; owned parameters missing from ``state_dict`` start fresh).
        ``state_dict`` may come from any world size: a rank's own, a single-process ``Kron``'s, or
        :func:`~kron.torch.distributed.load_template` filled by ``dcp.load``."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        current = [p for g in self.param_groups for p in g["params"]]
        owned = {
            saved_id
            for saved_id, p in zip(saved_ids, current)
            if self._owner_of[id(p)] == self.rank
        }
        state = {}
        for key, value in state_dict["state"].items():
            position = int(key) if isinstance(key, str) and key.isdigit() else key
            if position in owned:
                state[position] = value
        self._warn_of_missing_state(state_dict, state, owned)
        super()._load({**state_dict, "state": state})
        self._checked_layouts.clear()

    def _warn_of_missing_state(self, state_dict, found, owned) -> None:
        """Warn when a trainable parameter this rank owns has no state in ``state_dict`` although
        its group has stepped: the usual cause is one rank's ``state_dict()`` saved alone (it
        holds only that rank's parameters), and those parameters would silently start fresh."""
        missing = []
        saved_groups = state_dict["param_groups"]
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if not saved.get("step", 0):
                continue
            for index, (saved_id, p) in enumerate(zip(saved["params"], group["params"])):
                if saved_id in owned and saved_id not in found and p.requires_grad:
                    missing.append(f"parameter {index} of group {gi}")
        if missing:
            warnings.warn(
                f"Rank {self.rank} owns {', '.join(missing)}, for which the loaded state dict "
                "has no state although their groups have stepped; they start fresh. If they "
                "never had a gradient, nothing is lost; otherwise save every rank's state (DCP "
                "with load_template, or the union of each rank's state_dict()), not one rank's.",
                stacklevel=3,
            )
