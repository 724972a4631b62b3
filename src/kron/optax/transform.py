"""``scale_by_kron``: PSGD-Kron as an optax ``GradientTransformation`` over :mod:`kron.core`.

The state is a pytree of arrays only (static layout is recomputed from leaf shapes), so ``init``
and ``update`` jit, checkpoint with any pytree serialiser, and keep dtypes and shapes from step to
step. Randomness is counter-based: every draw of step ``t`` for leaf ``i`` comes from
``fold_in(fold_in(key, t), i)``, so a restored state repeats the run that never stopped. Whether
to fit the preconditioner is decided inside the jitted update with ``lax.cond``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kron.core import (
    FitOptions,
    LayoutOptions,
    StepOptions,
    TensorState,
    balance,
    counter_decision,
    exponential_schedule,
    fourth_moment,
    get_ops,
    init_factors,
    init_lipschitz,
    kron_step,
    make_plan,
    select_state,
    shared_scale,
)

OPS = get_ops("jax")
# Stream identifiers folded into a leaf's key.
_NOISE, _PROBES, _BALANCE, _DECISION = range(4)


class KronState(NamedTuple):
    """State of :func:`scale_by_kron`.

    Attributes:
      count: int32 scalar, steps taken.
      mu: momentum, like the params, in ``mu_dtype``.
      factors: per leaf, a tuple of ``Q_i`` (``(B, n, n)`` or ``(B, n)``) in ``precond_dtype``.
      lipschitz: per leaf, a tuple of ``(B,)`` Lipschitz estimates (at least float32).
      decision_total: float32 scalar, the counter of the deterministic decision rule.
      needs_scale_init: bool scalar; with ``preconditioner_init_scale=None`` the first update
        rescales Q from the first gradients.
      skipped: int32 scalar per leaf, updates skipped for a non-finite gradient.
      key: the PRNG key (``jax.random.PRNGKey(seed)``).
    """

    count: jax.Array
    mu: Any
    factors: Any
    lipschitz: Any
    decision_total: jax.Array
    needs_scale_init: jax.Array
    skipped: Any
    key: jax.Array


def leaf_key(key: jax.Array, count: jax.Array, index: int, stream: int) -> jax.Array:
    """The key of one random stream of leaf ``index`` at step ``count``."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, count), index), stream)


def scale_by_kron(
    b1: float = 0.9,
    preconditioner_lr: float = 0.1,
    preconditioner_init_scale: float | None = 1.0,
    preconditioner_mode: str = "Q0.5EQ1.5",
    whiten_grad: bool = True,
    preconditioner_update_probability: float | Callable[[jax.Array], jax.Array] | None = None,
    max_size_triangular: int = 8192,
    max_skew_triangular: float = 1.0,
    min_ndim_triangular: int = 2,
    memory_save_mode: str | None = None,
    mu_dtype: Any = None,
    precond_dtype: Any = None,
    precond_update_precision: str | None = "tensorfloat32",
    precond_grads_precision: str | None = None,
    grad_clip_max_amp: float | None = 1.0,
    beta_lipschitz: float = 0.9,
    damping: float = 1e-9,
    norm_bound: str = "subspace",
    balance_probability: float = 0.01,
    decision_rule: str = "bernoulli",
    seed: int = 42,
) -> optax.GradientTransformationExtraArgs:
    """PSGD-Kron preconditioning of the updates (psgdax's ``scale_by_kron`` contract).

    Args:
      b1: momentum β; the momentum is a running mean for the first steps
        (``β_t = min(t/(t+1), b1)``), then an EMA. Default 0.9.
      preconditioner_lr: μ. Default 0.1.
      preconditioner_init_scale: initial ``Q = scale·I``; ``None`` sets one scale for all leaves
        from the first gradients, ``(max mean g⁴ + δ⁴)^(-1/8)``. Default 1.0.
      preconditioner_mode: ``"Q0.5EQ1.5"`` (default, alias ``"Q0p5EQ1p5"``), ``"EQ"``,
        ``"QUAD"``, ``"QEQ"``, ``"QEP"``, ``"PRO4P"`` or ``"QUAD4P"``; anything else raises.
      whiten_grad: fit P on the gradient (True, default) or on the momentum (needs ``b1 > 0``).
      preconditioner_update_probability: float, optax schedule of the step, or ``None`` for 1.0
        for 500 steps then ``exp(-0.001·(t-500))`` down to 0.03.
      max_size_triangular, max_skew_triangular, min_ndim_triangular, memory_save_mode: which
        axes get dense factors (``kron.core.LayoutOptions``). Defaults 8192, 1.0, 2, None.
      mu_dtype, precond_dtype: momentum and preconditioner dtypes (None: param dtype, float32).
      precond_update_precision, precond_grads_precision: ``jax.default_matmul_precision`` while
        fitting and while applying P. Defaults ``"tensorfloat32"`` and None.
      grad_clip_max_amp: per-leaf RMS cap of the output, None for none. Default 1.0.
      beta_lipschitz, damping, norm_bound: ``kron.core.FitOptions``.
      balance_probability: chance per fit of rebalancing factor norms. Default 0.01.
      decision_rule: ``"bernoulli"`` (default, psgdax) or ``"counter"`` (psgd_jax).
      seed: seed of the PRNG key in the state. Default 42.
    """
    if decision_rule not in ("bernoulli", "counter"):
        raise ValueError(
            f"Unknown decision_rule {decision_rule!r}; accepted: 'bernoulli', 'counter'."
        )
    if not whiten_grad and b1 <= 0:
        raise ValueError(f"whiten_grad=False whitens the momentum and needs b1 > 0; got {b1!r}.")
    if preconditioner_init_scale is not None and not preconditioner_init_scale > 0:
        raise ValueError(
            f"preconditioner_init_scale must be > 0 or None; got {preconditioner_init_scale!r}."
        )
    layout = LayoutOptions(
        max_size=max_size_triangular,
        max_skew=max_skew_triangular,
        min_ndim_dense=min_ndim_triangular,
        memory_save_mode=memory_save_mode,
    )
    options = StepOptions(
        layout=layout,
        fit=FitOptions(
            geometry=preconditioner_mode,
            beta_lipschitz=beta_lipschitz,
            damping=damping,
            norm_bound=norm_bound,
        ),
        beta=b1,
        momentum_rule="running_mean",
        whiten_momentum=not whiten_grad,
        clip_rms=grad_clip_max_amp,
        clip_max=None,
    )
    schedule = (
        exponential_schedule(ops=OPS)
        if preconditioner_update_probability is None
        else preconditioner_update_probability
    )
    q_dtype = jnp.dtype(precond_dtype or jnp.float32)

    def init_fn(params: Any) -> KronState:
        leaves, treedef = jax.tree.flatten(params)
        plans = [make_plan(tuple(leaf.shape), layout) for leaf in leaves]
        like = jnp.zeros((), q_dtype)
        scale = 1.0 if preconditioner_init_scale is None else preconditioner_init_scale
        factors = [
            tuple(init_factors(plan, scale, like, OPS, options.fit.state_is_p)) for plan in plans
        ]
        lip_like = jnp.zeros((), jnp.promote_types(q_dtype, jnp.float32))
        lipschitz = [tuple(init_lipschitz(plan, lip_like, OPS)) for plan in plans]
        mu = [jnp.zeros(leaf.shape, mu_dtype or leaf.dtype) for leaf in leaves]
        return KronState(
            count=jnp.zeros((), jnp.int32),
            mu=treedef.unflatten(mu),
            factors=treedef.unflatten(factors),
            lipschitz=treedef.unflatten(lipschitz),
            decision_total=jnp.zeros((), jnp.float32),
            needs_scale_init=jnp.asarray(preconditioner_init_scale is None),
            skipped=treedef.unflatten([jnp.zeros((), jnp.int32) for _ in leaves]),
            key=jax.random.PRNGKey(seed),
        )

    def update_fn(updates: Any, state: KronState, params: Any = None, **extra_args: Any):
        del params, extra_args
        grads, treedef = jax.tree.flatten(updates)
        plans = [make_plan(tuple(g.shape), layout) for g in grads]
        count = state.count
        factors = _maybe_init_scale(treedef.flatten_up_to(state.factors), grads, state, plans)
        probability = jnp.asarray(schedule(count) if callable(schedule) else schedule, jnp.float32)
        if decision_rule == "bernoulli":
            draw = jax.random.uniform(leaf_key(state.key, count, 0, _DECISION))
            do_fit, decision_total = draw < probability, state.decision_total
        else:
            do_fit, decision_total = counter_decision(state.decision_total, probability, OPS)
        old = [
            TensorState(f, lips, m[None].astype(q_dtype))
            for f, lips, m in zip(
                factors, treedef.flatten_up_to(state.lipschitz), treedef.flatten_up_to(state.mu)
            )
        ]
        stacked = [g[None].astype(q_dtype) for g in grads]
        finite = [jnp.all(jnp.isfinite(g)) for g in grads]
        stacked = [jnp.where(ok, g, 0.0) for g, ok in zip(stacked, finite)]

        def run(fit: bool):
            def branch(_):
                outs = []
                for i, (plan, tensor_state, g) in enumerate(zip(plans, old, stacked)):
                    fit_inputs = _fit_inputs(state.key, count, i, plan) if fit else {}
                    with jax.default_matmul_precision(
                        precond_update_precision if fit else precond_grads_precision
                    ):
                        y, new = kron_step(
                            tensor_state,
                            g,
                            count.astype(q_dtype),
                            fit_inputs.pop("noise", None),
                            plan=plan,
                            options=options,
                            precond_lr=preconditioner_lr,
                            do_fit=fit,
                            ops=OPS,
                            mask=_mask(plan),
                            **fit_inputs,
                        )
                    if fit and balance_probability > 0:
                        draw = jax.random.uniform(leaf_key(state.key, count, i, _BALANCE))
                        new = new._replace(
                            factors=jax.lax.cond(
                                draw < balance_probability,
                                lambda f: tuple(balance(f, OPS)),
                                lambda f: tuple(f),
                                new.factors,
                            )
                        )
                    outs.append((y, new))
                return outs

            return branch

        outs = jax.lax.cond(do_fit, run(True), run(False), None)
        new_updates, new_mu, new_factors, new_lips, new_skipped = [], [], [], [], []
        for (y, new), tensor_state, ok, plan, g, m, skipped in zip(
            outs,
            old,
            finite,
            plans,
            grads,
            treedef.flatten_up_to(state.mu),
            treedef.flatten_up_to(state.skipped),
        ):
            new = select_state(ok[None], new, tensor_state, plan.num_blocks, OPS)
            new_updates.append(jnp.where(ok, y[0], 0.0).astype(g.dtype))
            new_mu.append(new.momentum[0].astype(m.dtype))
            new_factors.append(new.factors)
            new_lips.append(new.lipschitz)
            new_skipped.append(skipped + (~ok).astype(jnp.int32))
        new_state = KronState(
            count=optax.safe_int32_increment(count),
            mu=treedef.unflatten(new_mu),
            factors=treedef.unflatten(new_factors),
            lipschitz=treedef.unflatten(new_lips),
            decision_total=jnp.asarray(decision_total, jnp.float32),
            needs_scale_init=jnp.zeros((), bool),
            skipped=treedef.unflatten(new_skipped),
            key=state.key,
        )
        return treedef.unflatten(new_updates), new_state

    def _maybe_init_scale(factors, grads, state, plans):
        if preconditioner_init_scale is not None:
            return factors
        moments = [fourth_moment(g.astype(jnp.float32), OPS) for g in grads]
        scale = jnp.where(state.needs_scale_init, shared_scale(moments, OPS, damping), 1.0)
        if options.fit.state_is_p:
            scale = scale * scale
        return [
            tuple(f * (scale ** (1.0 / plan.order)).astype(f.dtype) for f in leaf)
            for leaf, plan in zip(factors, plans)
        ]

    def _fit_inputs(key, count, index, plan):
        shape = (plan.num_blocks, *plan.block_shape)
        inputs = {"noise": jax.random.normal(leaf_key(key, count, index, _NOISE), shape, q_dtype)}
        if norm_bound == "subspace":
            keys = jax.random.split(leaf_key(key, count, index, _PROBES), plan.order)
            inputs["norm_probes"] = [
                jax.random.normal(k, (plan.num_blocks, 32, n), q_dtype)
                for k, n in zip(keys, plan.block_shape)
            ]
        return inputs

    def _mask(plan):
        mask = plan.mask()
        return None if mask is None else jnp.asarray(mask, q_dtype)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


__all__ = ["KronState", "leaf_key", "scale_by_kron"]
