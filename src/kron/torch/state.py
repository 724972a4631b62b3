"""A parameter's state in :class:`kron.torch.Kron`: how it starts, and the checks and conversions
it goes through when the group's options change after its first step.

``optimizer.state[p]`` holds ``momentum`` (``p``'s shape, in ``mu_dtype``, default ``p``'s dtype),
``factors`` (one per axis of the plan: ``(b, n, n)`` dense, ``(b, n·(n+1)/2)`` as the line of its
triangle with ``store_triu_as_line``, or ``(b, n)`` diagonal, for ``b`` blocks), ``lipschitz``
(one ``(b,)`` per factor), ``cache`` (empty, or one per factor, square or diagonal), ``count``
(steps taken, float32 0-d) and ``skipped`` (steps skipped for a non-finite gradient, int64 0-d),
plus ``previous_grad`` (``p``'s shape) with ``mars``. The factors and cache are in
``precond_dtype``, the Lipschitz estimates in at least float32.
"""

from __future__ import annotations

from typing import Any

import torch

from kron.core import (
    StepOptions,
    fourth_moment,
    init_factors,
    init_lipschitz,
    scale_from_moments,
)
from kron.torch.functional import OPS
from kron.torch.options import torch_dtype
from kron.torch.stacks import pack_triangles

# bfloat16 factors were level with float32 ones or better on 12 of the 13 `kron bench` tasks
# (the deep linear network ended up to 1.7× higher) and made the benchmark MLP's step 0.66× as
# long on a CPU with bfloat16 instructions (docs/benchmarks.md, *The preconditioner dtype*);
# the algorithm's author defaults his DDP wrapper to bfloat16 too.
DEFAULT_PRECOND_DTYPE = torch.bfloat16


def initial_state(
    group: dict[str, Any], p: torch.Tensor, plan: Any, options: StepOptions, scale: float
) -> dict[str, Any]:
    """The state of parameter ``p`` before its first step: zero momentum, ``Q_i = scale^(1/k)·I``
    (or ``P_i``, for the geometries that keep P), the initial Lipschitz estimates, no cache and
    a zero step count, in the dtypes ``group`` asks for."""
    precond_dtype = torch_dtype(group["precond_dtype"], "precond_dtype") or DEFAULT_PRECOND_DTYPE
    mu_dtype = torch_dtype(group["mu_dtype"], "mu_dtype") or p.dtype
    like = torch.zeros((), dtype=precond_dtype, device=p.device)
    factors = init_factors(plan, scale, like, OPS, options.fit.state_is_p)
    if group["store_triu_as_line"]:
        factors = pack_triangles(factors, plan)
    lipschitz_like = torch.zeros(
        (), dtype=torch.promote_types(precond_dtype, torch.float32), device=p.device
    )
    state = {
        "momentum": torch.zeros(p.shape, dtype=mu_dtype, device=p.device),
        "factors": factors,
        "lipschitz": init_lipschitz(plan, lipschitz_like, OPS),
        "cache": [],
        "count": torch.zeros((), dtype=torch.float32, device=p.device),
        "skipped": torch.zeros((), dtype=torch.int64, device=p.device),
    }
    if group["mars"]:
        state["previous_grad"] = torch.zeros(p.shape, dtype=mu_dtype, device=p.device)
    return state


def init_state(
    state: dict[str, Any],
    group: dict[str, Any],
    p: torch.Tensor,
    plan: Any,
    options: StepOptions,
    probes: dict[int, torch.Tensor],
    hvps: dict[int, torch.Tensor],
) -> dict[str, Any]:
    """``state``, the empty state of ``p`` (a real view, with its gradient), filled with
    :func:`initial_state` at the group's ``precond_init_scale``, or, where that is None, at the
    scale the first gradient gives (the Hessian-vector product and its probe, keyed by
    ``id(p)`` in ``hvps`` and ``probes``, for Newton-type groups)."""
    # The moments behind the automatic scale are taken in at least float32: a bfloat16 mean
    # of g⁴ over a large tensor would be mostly rounding.
    dtype = torch_dtype(group["precond_dtype"], "precond_dtype") or DEFAULT_PRECOND_DTYPE
    moment_dtype = torch.promote_types(dtype, torch.float32)
    scale = group["precond_init_scale"]
    if scale is None and id(p) in hvps:  # Newton: (E v²)^¼ (E h⁴)^(-1/8), algorithm.md §2.4
        v, h = probes[id(p)].to(moment_dtype), hvps[id(p)].to(moment_dtype)
        scale = scale_from_moments(
            fourth_moment(h, OPS), OPS, group["damping"], probe_second=(v * v).mean()
        )
    elif scale is None:
        grad = p.grad.to(moment_dtype)
        scale = scale_from_moments(fourth_moment(grad, OPS), OPS, group["damping"])
    state.update(initial_state(group, p, plan, options, scale))
    return state


def convert_preconditioner(state: dict[str, Any], dtype: torch.dtype) -> None:
    """``state``'s factors and cache in ``dtype``, its Lipschitz estimates in at least float32."""
    state["factors"] = [f.to(dtype) for f in state["factors"]]
    state["cache"] = [c.to(dtype) for c in state["cache"]]
    wide = torch.promote_types(dtype, torch.float32)
    state["lipschitz"] = [lip.to(wide) for lip in state["lipschitz"]]


def check_layout(gi: int, index: int, plan: Any, factors: list[torch.Tensor]) -> None:
    """``ValueError`` when a parameter's factors were made for another layout than ``plan``,
    the group's options now give (a layout option changed after the first step)."""
    found = [tuple(f.shape) for f in factors]
    blocks = plan.num_blocks
    fits = len(found) == plan.order and all(
        shape in ((blocks, n, n), (blocks, n * (n + 1) // 2)) if dense else shape == (blocks, n)
        for shape, n, dense in zip(found, plan.block_shape, plan.dense)
    )
    if not fits:
        raise ValueError(
            f"The factors of parameter {index} of group {gi} have shapes {found}, made for "
            f"another layout than the group's options now give ({blocks} block(s) of "
            f"{plan.block_shape}, dense axes {plan.dense}). Options that set the layout "
            "(block_size, split, merge_dims, max_size_triangular, min_ndim_triangular, "
            "memory_save_mode, max_skew) cannot change after a parameter's first step."
        )
