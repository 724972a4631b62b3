"""Continue in :class:`kron.torch.Kron` a run that kron_torch's ``Kron`` started.

kron_torch keeps, per parameter, ``step``, ``momentum_buffer`` (the momentum EMA, not yet divided
by ``1 − β^t``, in the shape the factors act on), ``Q`` (one upper-triangular or diagonal factor
per axis of that shape, which is the parameter's own or, with ``merge_dims``, a 2-D view of it)
and ``exprs`` (opt_einsum contractions, not needed here). :func:`load_kron_torch_state` turns
that into this optimizer's state:

* the momentum is divided by ``1 − β^t``, as ``Kron`` stores it, and reshaped to the parameter;
* each factor keeps the preconditioner it encodes, ``P_i = Q_iᵀQ_i``: the EQ geometry (kron_torch's)
  takes Q as it is; the geometries with a symmetric positive definite Q take the symmetric
  square root of P; PRO4P and QUAD4P, which keep P, take P;
* a size-1 axis, which kron_torch gives a 1×1 diagonal factor and ``Kron`` drops, is folded
  into the first remaining factor, so P is unchanged;
* the step count continues, and so do the update-probability schedule and the counter that
  decides the fits (kron_torch does not save the counter; it is replayed from the step count,
  so the fits fall on the steps kron_torch's own continuation would take);
* the momentum is debiased with kron_torch's ``b1``, the one it was averaged with;
* the Lipschitz estimates, which kron_torch has not got, start afresh, as in a new optimizer.

:data:`KRON_TORCH_OPTIONS` are the options under which ``Kron`` computes kron_torch's update; with
others (the default geometry, say) the run continues under those. One difference no option
covers: kron_torch decays only parameters of two or more dimensions, ``Kron`` every parameter of
a group with ``weight_decay``, so a run with weight decay continues exactly only with its vectors
in a group of their own with ``weight_decay=0`` (loading warns otherwise).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from kron.core import make_plan
from kron.torch.optimizer import Kron
from kron.torch.options import core_records
from kron.torch.stacks import pack_triangles
from kron.torch.state import initial_state

# kron_torch 0.3.3's Kron, in this optimizer's options: its lr, fitting target, geometry, merging
# rule, per-step normaliser, damping and norm bound, no cache, and float32 factors.
KRON_TORCH_OPTIONS = dict(
    lr=3e-4,
    momentum_into_precond_update=True,
    preconditioner_mode="EQ",
    merge_dims="first_last",
    beta_lipschitz=0.0,
    damping_rule="mean_abs",
    norm_bound="rowcol",
    cached=False,
    precond_dtype=torch.float32,
)


def load_kron_torch_state(optimizer: Kron, state_dict: dict[str, Any]) -> None:
    """Load ``state_dict``, from ``kron_torch.Kron.state_dict()`` over the same parameters in the
    same groups, into ``optimizer``.

    Parameters kron_torch has no state for (never stepped) keep none here either. Raises
    ``ValueError`` when the groups or parameters do not line up, for a complex parameter, or
    when kron_torch's factors for a parameter do not match the layout ``optimizer``'s options
    give it (the message names the parameter, both layouts and the options that set them).
    """
    groups = state_dict.get("param_groups")
    saved = state_dict.get("state")
    if groups is None or saved is None:
        raise ValueError(
            "state_dict must be a torch optimizer state dict with 'state' and 'param_groups'; "
            f"got keys {sorted(state_dict)}."
        )
    sizes = [len(g["params"]) for g in groups]
    ours = [len(g["params"]) for g in optimizer.param_groups]
    if sizes != ours:
        raise ValueError(
            f"kron_torch's state has groups of {sizes} parameters; this optimizer has {ours}."
        )
    converted = optimizer.state_dict()
    converted["state"] = {}
    index = 0
    for gi, (group, saved_group, our_group) in enumerate(
        zip(optimizer.param_groups, groups, converted["param_groups"])
    ):
        _warn_of_decayed_vectors(group, gi)
        b1 = float(saved_group.get("b1", group["b1"]))
        steps = [0]
        for p, saved_id in zip(group["params"], saved_group["params"]):
            peer = saved.get(saved_id)
            if peer:
                converted["state"][index] = _param_state(group, p, peer, index, b1)
                steps.append(int(peer["step"]))
            index += 1
        our_group["step"] = max(steps)
        our_group["decision_total"] = _replayed_counter(optimizer, gi, group, max(steps))
    optimizer.load_state_dict(converted)


def _replayed_counter(optimizer: Kron, gi: int, group: dict[str, Any], steps: int) -> float:
    """The fit-decision counter after ``steps`` steps from a fresh start: kron_torch's
    ``_update_counter``, which its state dict leaves out, under this group's schedule."""
    clock = {**group, "step": 0, "decision_total": 0.0}
    for _ in range(steps):
        Kron._advance_clock(clock, optimizer._decide(gi, clock))
    return clock["decision_total"]


def _warn_of_decayed_vectors(group: dict[str, Any], gi: int) -> None:
    vectors = [i for i, p in enumerate(group["params"]) if p.dim() < 2]
    if group["weight_decay"] and vectors:
        warnings.warn(
            f"Group {gi} has weight_decay={group['weight_decay']} and parameters of fewer "
            f"than two dimensions (indices {vectors}), which kron_torch did not decay and Kron "
            "will; to continue as kron_torch would, put them in a group with weight_decay=0.",
            stacklevel=3,
        )


def _param_state(
    group: dict[str, Any], p: torch.Tensor, peer: dict[str, Any], index: int, b1: float
) -> dict[str, Any]:
    """``p``'s state from kron_torch's ``peer``, whose momentum was averaged with ``b1``."""
    if p.is_complex():
        raise ValueError(f"parameter {index} is complex; kron_torch has no complex parameters.")
    layout, options = core_records(group)
    plan = make_plan(tuple(p.shape), layout)
    factors = _factors_for(plan, peer["Q"], options.fit, index)
    state = initial_state(group, p, plan, options, 1.0)
    precond_dtype = state["factors"][0].dtype
    state["factors"] = [f.to(precond_dtype).unsqueeze(0).to(p.device) for f in factors]
    if group["store_triu_as_line"]:
        state["factors"] = pack_triangles(state["factors"], plan)
    step = int(peer["step"])
    momentum = peer["momentum_buffer"].to(torch.float64).reshape(p.shape)
    if step > 0:
        momentum = momentum / (1 - b1**step)
    state["momentum"] = momentum.to(state["momentum"].dtype).to(p.device)
    state["count"] = torch.full((), float(step), dtype=torch.float32, device=p.device)
    return state


def _factors_for(plan: Any, peer_factors: list, fit: Any, index: int) -> list[torch.Tensor]:
    """kron_torch's ``Q`` list as this layout's factors (no block axis yet), in float64."""
    qs = [q.detach().to(torch.float64) for q in peer_factors]
    fold = math.prod(float(q.abs().reshape(-1)[0]) for q in qs if q.numel() == 1)
    kept = [q for q in qs if q.numel() > 1]
    found = [(q.shape[0], q.dim() == 2) for q in kept]
    expected = [(n, dense) for n, dense in zip(plan.block_shape, plan.dense) if n > 1]
    if plan.num_blocks != 1 or found != expected:
        raise ValueError(
            f"parameter {index} (shape {tuple(plan.shape)}): kron_torch's factors are "
            f"{_describe(found)}, but this optimizer's options give "
            f"{_describe(list(zip(plan.block_shape, plan.dense)))} in {plan.num_blocks} block(s). "
            "Match merge_dims ('first_last' is kron_torch's rule), max_size_triangular, "
            "min_ndim_triangular, memory_save_mode, max_skew (inf) and split (False) to "
            "kron_torch's; kron.torch.migration.KRON_TORCH_OPTIONS has them."
        )
    if not kept:  # every axis has size 1: one 1×1 diagonal factor
        kept = [torch.ones(1, dtype=torch.float64)]
    kept[0] = kept[0] * fold
    return [_in_geometry(q, fit) for q in kept]


def _in_geometry(q: torch.Tensor, fit: Any) -> torch.Tensor:
    """A factor with the same ``P = QᵀQ`` in the form ``fit``'s geometry keeps."""
    if q.dim() == 1:
        return q * q if fit.state_is_p else q.abs()
    if fit.geometry == "EQ":
        return q
    p = q.T @ q
    if fit.state_is_p:
        return p
    values, vectors = torch.linalg.eigh(p)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def _describe(factors: list[tuple[int, bool]]) -> str:
    return "[" + ", ".join(f"{n}×{n}" if dense else f"diag({n})" for n, dense in factors) + "]"


__all__ = ["KRON_TORCH_OPTIONS", "load_kron_torch_state"]
