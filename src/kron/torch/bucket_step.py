"""One step of a bucket: the same-shape, same-dtype, same-device parameters of one param group,
stacked along a leading axis of size ``S`` and stepped in one batched :func:`kron.core.kron_step`.

:func:`step_bucket` is ``Kron``'s per-bucket path: it gathers the stacked gradients and state,
draws the fit's inputs, runs the step (compiled or eager, as ``Kron._compiled_step`` says),
clips the update, writes the parameters, and stores the new state back into each parameter's
entries (as views of the new stacks where it can). It is called per bucket and step: nothing
in it reads a device value on the host except where that is free (the CPU), or a group's
``lr`` given as a device tensor, which the weight decay and the update read once per bucket.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import numpy as np
import torch

from kron.core import balance, kron_step, make_plan, mars_correction, select_state
from kron.torch.functional import (
    NOISE,
    OPS,
    ROUNDING,
    SUBSPACE,
    apply_caution,
    clipper,
    concat,
    stack,
    stochastic_round,
)
from kron.torch.gradients import gather_gradients
from kron.torch.options import torch_dtype
from kron.torch.stacks import pack_triangles, unpack_triangles
from kron.torch.state import (
    DEFAULT_PRECOND_DTYPE,
    check_layout,
    convert_preconditioner,
    init_state,
)


def step_bucket(opt, gi, group, members, layout, options, do_fit, do_balance, probes, hvps):
    """One ``kron_step`` for same-shape parameters ``members`` (``(index, param)`` pairs) of
    group ``gi`` of the optimizer ``opt``, with the group's ``layout`` and step ``options``
    (see ``Kron._group_context``); ``probes`` and ``hvps`` hold Newton-type groups' probes and
    Hessian-vector products by ``id(param)``."""
    plan = make_plan(tuple(members[0][1].shape), layout)
    params = [p for _, p in members]
    factor_dtype = torch_dtype(group["precond_dtype"], "precond_dtype") or DEFAULT_PRECOND_DTYPE
    states = _states(opt, group, params, plan, options, factor_dtype, probes, hvps)
    # The gradient and momentum are handled in at least float32; only the products (and the
    # fit's inputs) are in the factors' dtype, so bfloat16 factors never round the momentum
    # and the float32 state is still stepped in place. Not wider: a float64 gradient past
    # float32's range would overflow the products, so it is skipped as non-finite.
    dtype = torch.promote_types(factor_dtype, torch.float32)
    size = len(params)
    clipped_grads, finite, all_finite = gather_gradients(group, params, states, dtype)
    grads = _corrected_gradients(group, params, states, clipped_grads, dtype)
    check_layout(gi, members[0][0], plan, states[0]["factors"])
    stacks = opt._stacks
    bucket = (gi, tuple(plan.shape), dtype, grads.device)
    indices = tuple(index for index, _ in members)
    old = unpack_triangles(stacks.gather(bucket, indices, states, plan.order, dtype), plan)
    fit_inputs = _fit_inputs(
        opt.seed, opt._streams, gi, group, members, plan, factor_dtype, do_fit, probes, hvps
    )
    step_fn = opt._compiled_step(plan, options, do_fit, size, dtype, grads.device)
    count = step_counts(states, len(plan.shape), step_fn is kron_step, dtype)
    # With every gradient known finite the old momentum is never restored, so the eager step
    # updates the optimizer's own stack in place: one large temporary and one copy fewer
    # (compiled steps plan their own buffers).
    donate = all_finite and step_fn is kron_step and stacks.owns(bucket, old)
    extra = dict(donate_momentum=True) if donate else {}
    y, new = step_fn(
        old,
        grads,
        count,
        plan=plan,
        options=options,
        ops=OPS,
        precond_lr=_precond_lr(
            opt._precond_lrs, gi, group["precond_lr"], factor_dtype, grads.device
        ),
        do_fit=do_fit,
        mask=_mask(opt._masks, plan, size, factor_dtype, grads.device),
        **fit_inputs,
        **extra,
    )
    if do_balance:
        new = new._replace(factors=tuple(balance(new.factors, OPS)))
    # y is a fresh temporary of the step's, so the named clips may overwrite it; all_finite
    # holds only on the CPU (see gather_gradients), where reading the norms is free.
    clip_update = clipper(
        group["update_clipping"],
        group["update_clip_value"],
        in_place=True,
        read_norms=all_finite,
    )
    if clip_update is not None:
        y = clip_update(y)
    # Caution is heavyball's option and comes after the clip, as in heavyball (the clip is
    # the last link of its chain, caution part of the parameter update): its rescale by the
    # inverse kept fraction may take the update past the clip's bound.
    if group["caution"]:
        y = apply_caution(y, grads)
    if not all_finite:
        new = select_state(finite, new, old, plan.num_blocks, OPS)
        y = y * finite.view(-1, *[1] * len(plan.shape)).to(dtype)
    _update_params(group, params, y, finite, all_finite)
    packed = group["store_triu_as_line"]
    if not (group["mars"] or packed) and stacks.store_in_place(bucket, old, new):
        _count_steps(states, finite, all_finite)
        return
    _write_back(
        opt.seed,
        opt._streams,
        gi,
        group,
        members,
        states,
        plan,
        old,
        new,
        clipped_grads,
        finite,
        all_finite,
    )
    if packed:  # the state holds lines, not views of the square stack
        stacks.forget(bucket)
    else:
        stacks.remember(bucket, indices, states, new, dtype)


def _states(opt, group, params, plan, options, factor_dtype, probes, hvps) -> list[dict]:
    """The parameters' states, made on a parameter's first step (:func:`init_state`), and
    converted where the group's ``precond_dtype`` or ``mu_dtype`` was edited since."""
    state_for = opt._state_for
    states = [
        state_for(p) or init_state(state_for(p), group, p, plan, options, probes, hvps)
        for p in params
    ]
    mu_dtype = torch_dtype(group["mu_dtype"], "mu_dtype")
    for p, state in zip(params, states):
        if state["factors"][0].dtype != factor_dtype:
            convert_preconditioner(state, factor_dtype)
        if state["momentum"].dtype != (mu_dtype or p.dtype):
            for key in ("momentum", "previous_grad"):
                if key in state:
                    state[key] = state[key].to(mu_dtype or p.dtype)
    return states


def _corrected_gradients(group, params, states, grads, dtype) -> torch.Tensor:
    """The stacked, clipped ``grads`` with MARS's correction and coupled weight decay, when
    the group asks for them (the clipped gradient is what MARS remembers as the previous one)."""
    if group["mars"]:
        for p, s in zip(params, states):  # mars switched on after the first step: as at init
            if "previous_grad" not in s:
                s["previous_grad"] = torch.zeros_like(p, dtype=s["momentum"].dtype)
        previous = stack([s["previous_grad"] for s in states]).to(dtype)
        grads = mars_correction(grads, previous, group["b1"], group["mars_gamma"], OPS)
    if group["weight_decay"] and not group["decoupled_weight_decay"]:
        grads = grads + group["weight_decay"] * stack([p.detach() for p in params]).to(dtype)
    return grads


def fresh_kron_step() -> Callable:
    """``kron_step`` under a fresh code object. Compiled once per key, each copy gets its own
    compile cache, so models with many shapes never hit dynamo's per-function recompile limit
    (and no global setting changes)."""
    fresh = types.FunctionType(
        kron_step.__code__.replace(),
        kron_step.__globals__,
        kron_step.__name__,
        kron_step.__defaults__,
        kron_step.__closure__,
    )
    fresh.__kwdefaults__ = kron_step.__kwdefaults__
    return fresh


def warmup_factor(t: int, warmup_steps: int) -> float:
    """heavyball's warm-up, ``t / max(t, warmup_steps + 1)`` on step ``t`` counted from 1 (its
    option, so its formula): ``1/(W+1), …, W/(W+1)``, then 1 from step ``W + 1``. With
    ``warmup_steps=1`` the first step takes half the learning rate."""
    return t / max(t, warmup_steps + 1)


def step_counts(states, ndim: int, eager: bool, dtype: torch.dtype) -> torch.Tensor | float:
    """The parameters' step counts, ``(S, 1, …, 1)``, for the momentum's weights: in the
    stack's ``dtype`` but never narrower than float32 (float64 stacks get float64 weights,
    as from a number; a bfloat16 stack's counts stay exact past 256). An eager CPU step
    whose parameters share one count gets it as a number: the weights are then host
    arithmetic rather than five tiny tensor operations (a CPU tensor reads for free; a
    compiled step would specialise on the number and recompile every step). Its counts
    that differ are float64, the precision of a number, so that a parameter's weight does
    not depend on whether its stack mates missed a step (stacked or not, Kron or
    DistributedKron, the same bits)."""
    counts = [state["count"] for state in states]
    wide = torch.promote_types(dtype, torch.float32)
    if eager and counts[0].device.type == "cpu":
        first = counts[0].item()
        if all(c.item() == first for c in counts[1:]):
            return first
        wide = torch.float64
    return stack(counts).to(wide).view(-1, *[1] * ndim)


def _mask(masks, plan, stack_size, dtype, device):
    """The plan's mask for ``stack_size`` stacked parameters (None without one), made once per
    key into the cache ``masks``."""
    key = (plan, stack_size, dtype, device)
    if key not in masks:
        mask = plan.mask()
        masks[key] = (
            None
            if mask is None
            else torch.as_tensor(np.concatenate([mask] * stack_size), dtype=dtype, device=device)
        )
    return masks[key]


def _precond_lr(held_lrs, gi, value, dtype, device) -> torch.Tensor:
    """The group's preconditioner learning rate as a 0-d tensor on ``device``, so a changed
    value never recompiles the step, kept in ``held_lrs`` as ``(value, tensor)``. It is
    refreshed in place (a kernel with a scalar argument): a CPU tensor or
    ``torch.tensor(value, device=...)`` would cost a blocking host-to-device copy per bucket
    and step."""
    key = (gi, dtype, device)
    if isinstance(value, torch.Tensor):  # may be edited in place, as schedulers edit lr
        held = held_lrs.get(key, (None, None))[1]
        if held is None:
            held = torch.empty((), dtype=dtype, device=device)
            held_lrs[key] = (None, held)
        return held.copy_(value.reshape(()))
    if key not in held_lrs:
        held_lrs[key] = (value, torch.full((), value, dtype=dtype, device=device))
    held_value, held = held_lrs[key]
    if held_value != value:
        held.fill_(value)
        held_lrs[key] = (value, held)
    return held


def _update_params(group, params, y, finite, all_finite) -> None:
    """``θ ← θ·(1 - lr·wd) - lr·y`` in each parameter's own dtype (a float64 parameter is
    never rounded through the float32 preconditioner)."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):  # one element, checked; alpha= takes only a 0-d tensor
        lr = lr.reshape(())
    if group["warmup_steps"]:
        lr = lr * warmup_factor(group["step"] + 1, group["warmup_steps"])
    decay = 1.0 - lr * group["weight_decay"] if group["decoupled_weight_decay"] else 1.0
    if decay != 1.0:
        if all_finite:
            torch._foreach_mul_(params, decay)
        else:
            factors = torch.where(finite, decay, 1.0)
            torch._foreach_mul_(params, [factors[s].to(p.dtype) for s, p in enumerate(params)])
    # An in-place add promotes, so each parameter takes y in its own dtype with no cast (and
    # no operation) per slice.
    torch._foreach_add_(params, list(y.unbind(0)), alpha=-lr)


def _fit_inputs(seed, streams, gi, group, members, plan, dtype, do_fit, probes, hvps):
    """The random and Newton inputs of a fit (all None on steps that do not fit), drawn from
    ``streams`` with the words ``(seed, step, gi, parameter index, stream)``."""
    if not do_fit:
        return dict(noise=None)
    device, step = members[0][1].device, group["step"]

    def draw(shape, *words):
        return concat(
            [
                streams.normal(shape, dtype, device, (seed, step, gi, index, *words))
                for index, _ in members
            ]
        )

    inputs = dict(noise=draw((plan.num_blocks, *plan.block_shape), NOISE))
    if group["norm_bound"] == "subspace":
        inputs["norm_probes"] = [
            draw((plan.num_blocks, 32, n), SUBSPACE, axis)
            for axis, n in enumerate(plan.block_shape)
        ]
    if group["preconditioner_type"] == "newton":
        for key, source in (("probe", probes), ("hvp", hvps)):
            stacked = stack([source[id(p)] for _, p in members]).to(dtype)
            inputs[key] = plan.to_blocks(stacked, OPS, stacked=True)
    return inputs


def _count_steps(states, finite, all_finite) -> None:
    """Add one to each parameter's ``count`` if its gradient was finite, else to ``skipped``,
    in place (no host synchronisation: ``finite`` stays on the device)."""
    counts = [state["count"] for state in states]
    if all_finite:
        torch._foreach_add_(counts, 1.0)
        return
    torch._foreach_add_(counts, list(finite.to(counts[0].dtype).unbind(0)))
    skipped = [state["skipped"] for state in states]
    torch._foreach_add_(skipped, list((~finite).to(skipped[0].dtype).unbind(0)))


def _write_back(
    seed, streams, gi, group, members, states, plan, old, new, clipped_grads, finite, all_finite
):
    """Store each parameter's slice of the stacked state (momentum stochastically rounded to
    its storage dtype with the words ``(seed, step, gi, parameter index, ROUNDING)``)."""
    nb, step = plan.num_blocks, group["step"]
    _count_steps(states, finite, all_finite)
    factors = new.factors
    if group["store_triu_as_line"]:
        # A factor the step left as it was is still in the stored lines: no packing.
        stored = states[0]["factors"]
        unchanged = tuple(
            i
            for i, (f, g) in enumerate(zip(new.factors, old.factors))
            if f is g and stored[i].ndim == f.ndim - plan.dense[i]
        )
        factors = pack_triangles(factors, plan, unchanged)
    for s, ((index, _), state) in enumerate(zip(members, states)):
        state["factors"] = [
            state["factors"][i] if f is None else f[s * nb : (s + 1) * nb]
            for i, f in enumerate(factors)
        ]
        state["lipschitz"] = [f[s * nb : (s + 1) * nb] for f in new.lipschitz]
        state["cache"] = [f[s * nb : (s + 1) * nb] for f in new.cache]
        state["momentum"] = stochastic_round(
            new.momentum[s],
            state["momentum"].dtype,
            (seed, step, gi, index, ROUNDING),
            streams,
        )
        if group["mars"]:
            kept = (
                clipped_grads[s]
                if all_finite
                else torch.where(
                    finite[s], clipped_grads[s], state["previous_grad"].to(clipped_grads.dtype)
                )
            )
            state["previous_grad"] = kept.to(state["previous_grad"].dtype)
