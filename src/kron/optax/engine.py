"""The machinery behind every :mod:`kron.optax` transformation.

Leaves are laid out by :func:`kron.core.make_plan`; a leaf flagged as scanned contributes its
leading axis as ``S`` stacked layers, each with its own factors and statistics. Leaves (and layers)
that share a plan are fitted as one stack, so a model with ten ``256×256`` weights traces one
batched fit instead of ten: the traced fit, and so the compile time, grows with the number of
distinct shapes, not of leaves. Scanned stacks may instead be fitted with ``lax.map`` in chunks of
``lax_map_batch_size`` layers, which trades speed for peak memory; both paths compute the same
numbers. The momentum and ``P·m`` run leaf by leaf, outside the ``lax.cond`` of the fit.

The state (:class:`~kron.optax.state.KronState`) keeps factors per leaf, so it mirrors the param
tree; stacks are assembled inside the jitted update. Whether to fit P is decided inside the update
(``lax.cond``), and every random draw is folded from the state's key with the step and the stack
index, so a restored state repeats the run that never stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kron.core import (
    Plan,
    StepOptions,
    TensorState,
    balance,
    cache_preconditioner,
    counter_decision,
    fit,
    fourth_moment,
    get_ops,
    init_factors,
    init_lipschitz,
    make_plan,
    precondition,
    scale_from_moments,
    select_state,
    shared_scale,
    update_momentum,
)
from kron.core.step import clip_update
from kron.optax.sharding import check_mesh, constrain, constrain_like_params
from kron.optax.state import KronState, leaf_key

OPS = get_ops("jax")
# Stream identifiers folded into a stack's key.
NOISE, NORM_PROBES, BALANCE, DECISION, NEWTON_PROBE = range(5)
SUBSPACE_PROBES = 32
PRECONDITIONER_TYPES = ("whitening", "newton")


@dataclass(frozen=True)
class EngineConfig:
    """Everything static about one transformation; the public constructors fill it in.

    Attributes:
      step: the core's per-parameter step options.
      precond_lr: μ, a float or a function of the step count.
      update_probability: a float or a function of the step count; ``>= 1`` fits every step and
        traces no ``lax.cond``.
      decision_rule: ``"bernoulli"`` (a uniform draw ``< p``) or ``"counter"`` (every ``1/p``).
      balance_probability: chance per fit of rebalancing each stack's factor norms.
      balance_every: rebalance on fits at steps divisible by this instead (None: use the chance).
      q_dtype: dtype of Q and of the preconditioner arithmetic.
      mu_dtype: dtype of the momentum (None: the param's).
      init_scale: initial ``Q = scale·I``; None sets one scale for all leaves from the first
        gradients (Newton: from the first Hessian-vector products).
      fit_precision, apply_precision: ``jax.default_matmul_precision`` on fitting and on
        preconditioning-only steps.
      scanned_layers: a bool pytree like the params, a function of the params returning one, or
        None; True marks a leaf whose leading axis stacks layers.
      lax_map_scanned_layers, lax_map_batch_size: walk scanned stacks with ``lax.map``.
      normalize_grads: divide each layer's gradient by its L2 norm first.
      output_scale: multiplies the clipped update (eformer's ``lr_style="adam"`` uses 1/5).
      preconditioner_type: ``"whitening"`` or ``"newton"`` (fit on ``(v, H v)`` pairs computed
        with ``jax.jvp`` of the gradient of the ``value_fn`` extra argument).
      cache: keep ``P_i = Q_iᵀQ_i`` in the state, refreshed on every fit, so that steps without
        a fit apply P with one product per axis instead of two (not for PRO4P/QUAD4P, whose
        state is P already).
      block_axis_name, block_axis_size: the mesh axis (and its size) that the block stacks of
        the factors are split over when a mesh is active (:mod:`kron.optax.sharding`).
      params_partition_specs: specs of the params; the momentum and the updates follow them.
      seed: seed of the state's PRNG key.
    """

    step: StepOptions
    precond_lr: float | Callable[[jax.Array], jax.Array]
    update_probability: float | Callable[[jax.Array], jax.Array]
    decision_rule: str = "bernoulli"
    balance_probability: float = 0.0
    balance_every: int | None = None
    q_dtype: Any = jnp.float32
    mu_dtype: Any = None
    init_scale: float | None = 1.0
    fit_precision: str | None = None
    apply_precision: str | None = None
    scanned_layers: Any = None
    lax_map_scanned_layers: bool = False
    lax_map_batch_size: int = 8
    normalize_grads: bool = False
    output_scale: float = 1.0
    preconditioner_type: str = "whitening"
    cache: bool = False
    block_axis_name: str | None = None
    block_axis_size: int = 1
    params_partition_specs: Any = None
    seed: int = 42

    def __post_init__(self) -> None:
        if self.decision_rule not in ("bernoulli", "counter"):
            raise ValueError(
                f"Unknown decision_rule {self.decision_rule!r}; accepted: 'bernoulli', 'counter'."
            )
        if self.preconditioner_type not in PRECONDITIONER_TYPES:
            raise ValueError(
                f"Unknown preconditioner_type {self.preconditioner_type!r}; accepted: "
                f"{', '.join(repr(t) for t in PRECONDITIONER_TYPES)}."
            )
        if self.init_scale is not None and not self.init_scale > 0:
            raise ValueError(
                f"preconditioner_init_scale must be > 0 or None; got {self.init_scale!r}."
            )
        if not isinstance(self.lax_map_batch_size, int) or self.lax_map_batch_size < 1:
            raise ValueError(
                f"lax_map_batch_size must be a positive int; got {self.lax_map_batch_size!r}."
            )
        if not 0.0 <= self.balance_probability <= 1.0:
            raise ValueError(
                f"balance_probability must be in [0, 1]; got {self.balance_probability!r}."
            )
        if not callable(self.update_probability) and not 0.0 <= self.update_probability <= 1.0:
            raise ValueError(
                "preconditioner_update_probability must be in [0, 1] or a schedule; got "
                f"{self.update_probability!r}."
            )

    @property
    def newton(self) -> bool:
        return self.preconditioner_type == "newton"


class LeafLayout(NamedTuple):
    """How one leaf is preconditioned: ``layers`` stacked copies of ``plan``."""

    plan: Plan
    layers: int

    @property
    def blocks(self) -> int:
        return self.layers * self.plan.num_blocks


def scanned_flags(scanned_layers: Any, tree: Any) -> list[bool]:
    """One bool per leaf of ``tree`` from a bool pytree or a function returning one."""
    count = len(jax.tree.leaves(tree))
    if scanned_layers is None:
        return [False] * count
    flags_tree = scanned_layers(tree) if callable(scanned_layers) else scanned_layers
    try:
        flags = jax.tree.leaves(jax.tree.map(lambda _, flag: bool(flag), tree, flags_tree))
    except (ValueError, TypeError) as error:
        raise ValueError(
            "scanned_layers must be a pytree of bools with the structure of the params (or a "
            f"function of the params returning one): {error}"
        ) from None
    return flags


def leaf_layouts(leaves: list[Any], flags: list[bool], config: EngineConfig) -> list[LeafLayout]:
    layouts = []
    for leaf, scanned in zip(leaves, flags):
        shape = tuple(leaf.shape)
        if scanned and not shape:
            raise ValueError("a scanned leaf needs a leading layer axis; got a scalar leaf.")
        layer_shape = shape[1:] if scanned else shape
        plan = make_plan(layer_shape, config.step.layout)
        layouts.append(LeafLayout(plan, shape[0] if scanned else 1))
    return layouts


def stacks_of(layouts: list[LeafLayout]) -> list[list[int]]:
    """Leaf indices grouped by plan, in order of first appearance."""
    members: dict[Plan, list[int]] = {}
    for index, layout in enumerate(layouts):
        members.setdefault(layout.plan, []).append(index)
    return list(members.values())


def _concat(arrays: list[Any]) -> Any:
    return arrays[0] if len(arrays) == 1 else jnp.concatenate(arrays)


def _split(array: Any, sizes: list[int]) -> list[Any]:
    if len(sizes) == 1:
        return [array]
    cuts, total = [], 0
    for size in sizes[:-1]:
        total += size
        cuts.append(total)
    return jnp.split(array, cuts)


def _precision(name: str | None):
    return jax.default_matmul_precision(name) if name else _NoContext()


class _NoContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def build(config: EngineConfig) -> optax.GradientTransformationExtraArgs:
    """The ``init``/``update`` pair of ``config``. ``update(updates, state, params=None, *,
    value_fn=None)``; Newton type needs ``params`` and ``value_fn(params) -> loss``."""
    options = config.step
    q_dtype = jnp.dtype(config.q_dtype)
    lip_dtype = jnp.promote_types(q_dtype, jnp.float32)
    state_is_p = options.fit.state_is_p
    always_fit = not callable(config.update_probability) and config.update_probability >= 1.0
    caching = config.cache and not state_is_p
    if not options.fit_before_apply:
        raise ValueError("kron.optax fits P before applying it; fit_before_apply must be True.")

    def init_fn(params: Any) -> KronState:
        leaves, treedef = jax.tree.flatten(params)
        layouts = leaf_layouts(leaves, scanned_flags(config.scanned_layers, params), config)
        like = jnp.zeros((), q_dtype)
        scale = 1.0 if config.init_scale is None else config.init_scale
        factors = [
            tuple(init_factors(lay.plan, scale, like, OPS, state_is_p, stack=lay.layers))
            for lay in layouts
        ]
        lip_like = jnp.zeros((), lip_dtype)
        lipschitz = [
            tuple(init_lipschitz(lay.plan, lip_like, OPS, stack=lay.layers)) for lay in layouts
        ]
        state = KronState(
            count=jnp.zeros((), jnp.int32),
            mu=treedef.unflatten([jnp.zeros(x.shape, config.mu_dtype or x.dtype) for x in leaves]),
            factors=treedef.unflatten(factors),
            lipschitz=treedef.unflatten(lipschitz),
            decision_total=jnp.zeros((), jnp.float32),
            needs_scale_init=jnp.asarray(config.init_scale is None),
            skipped=treedef.unflatten([jnp.zeros((), jnp.int32) for _ in leaves]),
            key=jax.random.PRNGKey(config.seed),
            cache=treedef.unflatten([_cached(f) for f in factors]),
        )
        return _constrain(state)

    def update_fn(
        updates: Any, state: KronState, params: Any = None, value_fn: Any = None, **extra: Any
    ) -> tuple[Any, KronState]:
        del extra
        check_mesh()
        if config.newton and (params is None or value_fn is None):
            raise ValueError(
                "preconditioner_type='newton' needs update(grads, state, params, "
                "value_fn=loss_of_params); got "
                f"params={'None' if params is None else 'given'}, "
                f"value_fn={'None' if value_fn is None else 'given'}."
            )
        grads, treedef = jax.tree.flatten(updates)
        layouts = leaf_layouts(grads, scanned_flags(config.scanned_layers, updates), config)
        stacks = stacks_of(layouts)
        count = state.count

        layered = [
            jnp.reshape(g.astype(q_dtype), (lay.layers, *lay.plan.shape))
            for g, lay in zip(grads, layouts)
        ]
        finite = [jnp.all(jnp.isfinite(jnp.reshape(g, (g.shape[0], -1))), axis=1) for g in layered]
        layered = [jnp.where(_expand(ok, g), g, 0.0) for g, ok in zip(layered, finite)]
        if config.normalize_grads:
            layered = [_normalize(g) for g in layered]
        mu = [
            jnp.reshape(m.astype(q_dtype), g.shape)
            for m, g in zip(treedef.flatten_up_to(state.mu), layered)
        ]
        momenta, debiased = mu, layered
        if options.beta > 0:
            pairs = [
                update_momentum(
                    m, g, count.astype(lip_dtype), options.beta, options.momentum_rule, OPS
                )
                for m, g in zip(mu, layered)
            ]
            momenta, debiased = [p[0] for p in pairs], [p[1] for p in pairs]
        targets = debiased if options.whiten_momentum else layered
        applied = debiased if options.precondition_momentum else layered

        factors = [tuple(f) for f in treedef.flatten_up_to(state.factors)]
        lipschitz = [tuple(lip) for lip in treedef.flatten_up_to(state.lipschitz)]
        cache = [tuple(c) for c in treedef.flatten_up_to(state.cache)]
        if config.init_scale is None and not config.newton:
            factors, cache = jax.lax.cond(
                state.needs_scale_init,
                lambda: _whitening_init(factors, layered, layouts),
                lambda: (factors, cache),
            )
        do_fit, decision_total = _decide(state, count)
        precond_lr = config.precond_lr(count) if callable(config.precond_lr) else config.precond_lr

        def fit_branch(_: Any) -> Any:
            with _precision(config.fit_precision):
                return _fit_all(
                    state,
                    factors,
                    lipschitz,
                    targets,
                    layouts,
                    stacks,
                    precond_lr,
                    params,
                    value_fn,
                )

        def keep_branch(_: Any) -> Any:
            unchanged = [jnp.ones((lay.layers,), bool) for lay in layouts]
            return factors, lipschitz, cache, unchanged, jnp.asarray(False)

        if always_fit:
            fitted = fit_branch(None)
        else:
            fitted = jax.lax.cond(do_fit, fit_branch, keep_branch, None)
        new_factors, new_lips, new_cache, fit_ok, newton_scaled = fitted
        with _precision(config.apply_precision):
            directions = _apply_all(new_factors, new_cache, applied, layouts, stacks)

        new_updates, new_mu, kept_factors, kept_lips, kept_cache, new_skipped = (
            [] for _ in range(6)
        )
        for i, (lay, g, m, skipped) in enumerate(
            zip(
                layouts,
                grads,
                treedef.flatten_up_to(state.mu),
                treedef.flatten_up_to(state.skipped),
            )
        ):
            keep = finite[i] & fit_ok[i]
            new = select_state(
                keep,
                TensorState(new_factors[i], new_lips[i], momenta[i], new_cache[i]),
                TensorState(factors[i], lipschitz[i], mu[i], cache[i]),
                lay.plan.num_blocks,
                OPS,
            )
            y = jnp.where(_expand(keep, directions[i]), directions[i], 0.0) * config.output_scale
            new_updates.append(jnp.reshape(y, g.shape).astype(g.dtype))
            new_mu.append(jnp.reshape(new.momentum, m.shape).astype(m.dtype))
            kept_factors.append(new.factors)
            kept_lips.append(new.lipschitz)
            kept_cache.append(new.cache)
            new_skipped.append(skipped + jnp.sum(~keep).astype(jnp.int32))
        scaled = newton_scaled if config.newton else jnp.asarray(config.init_scale is None)
        new_state = KronState(
            count=optax.safe_int32_increment(count),
            mu=treedef.unflatten(new_mu),
            factors=treedef.unflatten(kept_factors),
            lipschitz=treedef.unflatten(kept_lips),
            decision_total=jnp.asarray(decision_total, jnp.float32),
            needs_scale_init=state.needs_scale_init & ~scaled,
            skipped=treedef.unflatten(new_skipped),
            key=state.key,
            cache=treedef.unflatten(kept_cache),
        )
        new_updates = constrain_like_params(
            treedef.unflatten(new_updates), config.params_partition_specs
        )
        return new_updates, _constrain(new_state)

    def _constrain(state: KronState) -> KronState:
        return constrain(
            state, config.block_axis_name, config.block_axis_size, config.params_partition_specs
        )

    def _decide(state: KronState, count: jax.Array) -> tuple[Any, Any]:
        if always_fit:
            return True, state.decision_total
        p = config.update_probability
        probability = jnp.asarray(p(count) if callable(p) else p, jnp.float32)
        if config.decision_rule == "bernoulli":
            draw = jax.random.uniform(leaf_key(state.key, count, 0, DECISION))
            return draw < probability, state.decision_total
        return counter_decision(state.decision_total, probability, OPS)

    def _cached(factors: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(cache_preconditioner(factors, OPS)) if caching else ()

    def _whitening_init(factors, layered, layouts):
        """The automatic scale from the first gradients, ``(max mean g⁴ + δ⁴)^(-1/8)``."""
        moments = [fourth_moment(g.astype(jnp.float32), OPS) for g in layered]
        scale = shared_scale(moments, OPS, options.fit.damping)
        factors = _rescale(factors, scale, layouts, state_is_p)
        return factors, [_cached(f) for f in factors]

    def _fit_all(state, factors, lipschitz, targets, layouts, stacks, precond_lr, params, value_fn):
        """One fit of every stack. Returns per-leaf factors, Lipschitz estimates and caches, the
        per-layer finiteness of the Newton pairs, and whether Newton's init scale was applied."""
        count = state.count
        fit_ok = [jnp.ones((lay.layers,), bool) for lay in layouts]
        scaled = jnp.asarray(False)
        probes = None
        if config.newton:
            probes, targets = _newton_pairs(state.key, count, params, value_fn, layouts)
            fit_ok = [
                jnp.all(jnp.isfinite(jnp.reshape(h, (h.shape[0], -1))), axis=1) for h in targets
            ]
            targets = [jnp.where(_expand(ok, h), h, 0.0) for h, ok in zip(targets, fit_ok)]
            if config.init_scale is None:
                factors = _newton_init(state, factors, probes, targets, layouts)
                scaled = state.needs_scale_init
        new_factors: list[Any] = [None] * len(layouts)
        new_lips: list[Any] = [None] * len(layouts)
        for index, members in enumerate(stacks):
            plan = layouts[members[0]].plan
            sizes = [layouts[i].layers for i in members]
            block_sizes = [layouts[i].blocks for i in members]
            inputs = _fit_inputs(state.key, count, index, plan, sum(sizes))
            inputs["x"] = plan.to_blocks(_concat([targets[i] for i in members]), OPS, stacked=True)
            if probes is not None:
                inputs["probe"] = plan.to_blocks(
                    _concat([probes[i] for i in members]), OPS, stacked=True
                )
            stack_factors = [_concat([factors[i][k] for i in members]) for k in range(plan.order)]
            stack_lips = [_concat([lipschitz[i][k] for i in members]) for k in range(plan.order)]
            scanned = any(size > 1 for size in sizes)
            fit_stack = _mapped_fit if (config.lax_map_scanned_layers and scanned) else _batched_fit
            stack_factors, stack_lips = fit_stack(
                stack_factors, stack_lips, plan, precond_lr, inputs
            )
            stack_factors = _maybe_balance(tuple(stack_factors), state.key, count, index)
            split_factors = [_split(f, block_sizes) for f in stack_factors]
            split_lips = [_split(lip, block_sizes) for lip in stack_lips]
            for position, i in enumerate(members):
                new_factors[i] = tuple(f[position] for f in split_factors)
                new_lips[i] = tuple(lip[position] for lip in split_lips)
        return new_factors, new_lips, [_cached(f) for f in new_factors], fit_ok, scaled

    def _batched_fit(factors, lipschitz, plan, precond_lr, inputs):
        inputs = dict(inputs)
        x, noise = inputs.pop("x"), inputs.pop("noise")
        return fit(
            factors,
            lipschitz,
            x,
            noise,
            lr=precond_lr,
            options=options.fit,
            ops=OPS,
            mask=_mask(plan, x.shape[0] // plan.num_blocks),
            **inputs,
        )

    def _mapped_fit(factors, lipschitz, plan, precond_lr, inputs):
        """``lax.map`` over layers, ``lax_map_batch_size`` at a time; each call fits one layer."""
        blocks = plan.num_blocks
        layers = factors[0].shape[0] // blocks

        def per_layer(x: Any) -> Any:
            return jnp.reshape(x, (layers, blocks, *x.shape[1:]))

        per_layer_inputs = jax.tree.map(per_layer, inputs)

        def one_layer(xs: Any) -> Any:
            layer_factors, layer_lips, layer_inputs = xs
            return _batched_fit(layer_factors, layer_lips, plan, precond_lr, layer_inputs)

        new_factors, new_lips = jax.lax.map(
            one_layer,
            (
                [per_layer(f) for f in factors],
                [per_layer(lip) for lip in lipschitz],
                per_layer_inputs,
            ),
            batch_size=min(config.lax_map_batch_size, layers),
        )

        def flat(x: Any) -> Any:
            return jnp.reshape(x, (layers * blocks, *x.shape[2:]))

        return [flat(f) for f in new_factors], [flat(lip) for lip in new_lips]

    def _apply_all(factors, cache, applied, layouts, stacks):
        """``clip(P·m)`` per leaf, ``(S, *layer_shape)``. Unlike the fit, the product runs leaf by
        leaf: stacking would copy every factor into the stack on every step, which costs more
        than the one product per axis it batches (measured in benchmarks/RESULTS.md)."""
        del stacks
        directions = []
        for leaf_factors, leaf_cache, m, lay in zip(factors, cache, applied, layouts):
            blocks = lay.plan.to_blocks(m, OPS, stacked=True)
            if caching:
                y = precondition(list(leaf_cache), blocks, OPS, state_is_p=True)
            else:
                y = precondition(list(leaf_factors), blocks, OPS, state_is_p)
            directions.append(clip_update(lay.plan.from_blocks(y, OPS, stacked=True), options, OPS))
        return directions

    def _fit_inputs(key, count, index, plan, layers):
        blocks = layers * plan.num_blocks
        noise_key = leaf_key(key, count, index, NOISE)
        inputs: dict[str, Any] = {
            "noise": jax.random.normal(noise_key, (blocks, *plan.block_shape), q_dtype)
        }
        if options.fit.norm_bound == "subspace":
            keys = jax.random.split(leaf_key(key, count, index, NORM_PROBES), plan.order)
            inputs["norm_probes"] = [
                jax.random.normal(k, (blocks, SUBSPACE_PROBES, n), q_dtype)
                for k, n in zip(keys, plan.block_shape)
            ]
        return inputs

    def _maybe_balance(factors, key, count, index):
        if len(factors) < 2:
            return factors
        if config.balance_every is not None:
            now = count % config.balance_every == 0
        elif config.balance_probability > 0:
            now = (
                jax.random.uniform(leaf_key(key, count, index, BALANCE))
                < config.balance_probability
            )
        else:
            return factors
        return tuple(jnp.where(now, b, f) for b, f in zip(balance(factors, OPS), factors))

    def _newton_pairs(key, count, params, value_fn, layouts):
        leaves, treedef = jax.tree.flatten(params)
        probes = [
            jax.random.normal(leaf_key(key, count, i, NEWTON_PROBE), x.shape, x.dtype)
            for i, x in enumerate(leaves)
        ]
        _, hvp = jax.jvp(jax.grad(value_fn), (params,), (treedef.unflatten(probes),))
        hvps = treedef.flatten_up_to(hvp)

        def layered(x: Any, lay: LeafLayout) -> Any:
            return jnp.reshape(x.astype(q_dtype), (lay.layers, *lay.plan.shape))

        return (
            [layered(v, lay) for v, lay in zip(probes, layouts)],
            [layered(h, lay) for h, lay in zip(hvps, layouts)],
        )

    def _newton_init(state, factors, probes, hvps, layouts):
        """Newton type's automatic scale, ``(E v²)^¼ (max E h⁴)^(-1/8)``, on the first fit."""
        largest = jnp.max(jnp.stack([fourth_moment(h.astype(jnp.float32), OPS) for h in hvps]))
        second = jnp.mean(jnp.stack([jnp.mean(jnp.square(v.astype(jnp.float32))) for v in probes]))
        scale = jnp.where(
            state.needs_scale_init,
            scale_from_moments(largest, OPS, options.fit.damping, probe_second=second),
            1.0,
        )
        return _rescale(factors, scale, layouts, state_is_p)

    def _mask(plan: Plan, layers: int) -> Any:
        mask = plan.mask()
        if mask is None:
            return None
        return jnp.tile(jnp.asarray(mask, q_dtype), (layers,) + (1,) * plan.order)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _expand(flags: Any, like: Any) -> Any:
    """``(S,)`` flags reshaped to broadcast against ``(S, ...)``."""
    return jnp.reshape(flags, (-1,) + (1,) * (like.ndim - 1))


def _normalize(g: Any) -> Any:
    """Each layer divided by its L2 norm (left as is when the norm is 0)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=tuple(range(1, g.ndim))))
    norm = jnp.where(norm > 0, norm, 1.0)
    return g / _expand(norm, g).astype(g.dtype)


def _rescale(factors: list[Any], scale: Any, layouts: list[LeafLayout], state_is_p: bool) -> list:
    """Multiply the preconditioner of every leaf by ``scale`` (``Q``) or ``scale²`` (``P``),
    spread evenly over its factors."""
    if state_is_p:
        scale = scale * scale
    return [
        tuple(f * (scale ** (1.0 / lay.plan.order)).astype(f.dtype) for f in leaf)
        for leaf, lay in zip(factors, layouts)
    ]


__all__ = [
    "PRECONDITIONER_TYPES",
    "EngineConfig",
    "LeafLayout",
    "build",
    "leaf_layouts",
    "scanned_flags",
    "stacks_of",
]
