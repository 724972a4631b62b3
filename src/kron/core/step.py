"""One parameter's whole Kron step, composed from the pieces (algorithm.md §6.1).

``momentum → (fit P) → y = P·m → (fit P) → clip``. Front ends decide *whether* to fit on this step
(``do_fit`` is a Python bool: the host decides in PyTorch and NumPy, ``lax.cond``/``ops.cond`` picks
one of two traced branches in JAX and Keras) and own the RNG; this module owns the arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kron.core.clipping import clip_elementwise, clip_rms, soft_clip
from kron.core.finite import nonzero_rows
from kron.core.fitting import FitOptions, fit
from kron.core.kron_product import cache_preconditioner, precondition
from kron.core.layout import LayoutOptions, Plan

MOMENTUM_RULES = ("running_mean", "debiased_ema")


class TensorState(NamedTuple):
    """Optimizer state of one parameter.

    Attributes:
      factors: ``Q_i`` (``P_i`` for PRO4P/QUAD4P), each ``(B, n_i, n_i)`` or ``(B, n_i)``.
      lipschitz: ``L_i``, each ``(B,)``.
      momentum: the momentum buffers of the ``S`` stacked parameters, ``(S, *shape)``.
      cache: ``P_i = Q_iᵀQ_i`` of the current factors when ``StepOptions.cache`` is on, else ``()``.
    """

    factors: tuple[Any, ...]
    lipschitz: tuple[Any, ...]
    momentum: Any
    cache: tuple[Any, ...] = ()


@dataclass(frozen=True)
class StepOptions:
    """Static options of a step. Defaults follow psgd_torch's KronWhiten (gradient whitening,
    Q0.5EQ1.5, RMS ≤ 2 and entries ≤ 10), with momentum 0.9 and the power-iteration norm bound.

    Attributes:
      layout, fit: :class:`LayoutOptions`, :class:`FitOptions`.
      beta: momentum β; 0 disables momentum (``y = P g``). Default 0.9.
      momentum_rule: ``"running_mean"``: ``β_t = min(t/(t+1), β)``, ``m ← β_t m + (1-β_t) g``
        (psgd_torch); ``"debiased_ema"``: the EMA ``β m + (1-β) g`` divided by ``1-β^t``
        (kron_torch, psgd_jax, heavyball), kept already divided (see :func:`update_momentum`).
        Default ``"running_mean"``.
      whiten_momentum: fit P on the momentum (kron_torch's ``momentum_into_precond_update``) rather
        than on the raw gradient. Default False.
      precondition_momentum: apply P to the momentum (True) or to the raw gradient (heavyball's
        ``exp_avg_input=False``). Default True.
      cache: keep ``P_i = Q_iᵀQ_i`` so that applying P costs one contraction per axis instead of
        two; it is refreshed after every fit (heavyball's ``cached``). Default False.
      fit_before_apply: fit P before applying it (kron_torch; uses the sample twice) instead of
        after (unbiased). Default True.
      clip_rms: per-tensor RMS cap of ``y``, or None. Default 2.0.
      clip_max: elementwise cap of ``y``, or None. Default 10.0.
      soft_clip: apply the trust-region soft clip before the caps. Default False.
    """

    layout: LayoutOptions = field(default_factory=LayoutOptions)
    fit: FitOptions = field(default_factory=FitOptions)
    beta: float = 0.9
    momentum_rule: str = "running_mean"
    whiten_momentum: bool = False
    precondition_momentum: bool = True
    cache: bool = False
    fit_before_apply: bool = True
    clip_rms: float | None = 2.0
    clip_max: float | None = 10.0
    soft_clip: bool = False

    def __post_init__(self) -> None:
        if self.momentum_rule not in MOMENTUM_RULES:
            raise ValueError(
                f"Unknown momentum_rule {self.momentum_rule!r}; accepted: "
                f"{', '.join(MOMENTUM_RULES)}."
            )
        # The running mean's weight is min(t/(t+1), beta): beta = 1 averages every gradient (as
        # psgdax allows); the EMA's bias correction 1/(1 - beta^t) would divide by zero.
        if self.momentum_rule == "running_mean" and not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"momentum beta must be in [0, 1]; got {self.beta!r}.")
        if self.momentum_rule != "running_mean" and not 0.0 <= self.beta < 1.0:
            raise ValueError(f"momentum beta must be in [0, 1); got {self.beta!r}.")
        for name in ("clip_rms", "clip_max"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or None; got {value!r}.")


def update_momentum(
    momentum: Any,
    grad: Any,
    count: Any,
    beta: float,
    rule: str,
    ops: Any,
    in_place: bool = False,
) -> Any:
    """The new momentum, which is both stored and used; ``count`` is the number of earlier
    updates (a number, or a floating-point array that broadcasts against ``grad``; an integer
    array would leave the weights' precision to the backend: float32 in PyTorch).

    Both rules are one interpolation ``m ← m + w_t (g - m)``. The running mean has
    ``w_t = 1 - min(t/(t+1), β)``. The debiased EMA keeps ``m̂_t = m_t / (1-β^t)`` rather than
    the EMA ``m_t = β m_{t-1} + (1-β) g``: then ``m̂_t = m̂_{t-1} + w_t (g - m̂_{t-1})`` with
    ``w_t = (1-β) / (1-β^t)``, so using it needs no division pass.

    Weights are computed in the precision of ``count`` and cast to ``grad``'s dtype, so a float32
    counter never promotes bfloat16 momentum. With ``in_place`` the old momentum may be
    overwritten (see ``Ops.lerp``)."""
    if rule == "running_mean":
        weight = 1.0 - ops.minimum(count / (count + 1.0), beta)
    else:
        weight = (1.0 - beta) / (1.0 - beta ** (count + 1.0))
    if type(weight) is not float:  # a NumPy scalar or an array would promote float32 momentum
        weight = ops.astype(weight, ops.dtype(grad))
    return ops.lerp(momentum, grad, weight, in_place=in_place)


def _blocks_of(flags: Any, num_blocks: int, ops: Any) -> Any:
    """``(S·B,)`` booleans from ``(S,)`` per-parameter ``flags``: each parameter's flag for each
    of its ``num_blocks`` blocks."""
    return ops.reshape(ops.reshape(flags, (-1, 1)) & ops.ones((1, num_blocks), flags), (-1,))


def select_state(
    ok: Any, new: TensorState, old: TensorState, num_blocks: int, ops: Any
) -> TensorState:
    """``new`` where ``ok`` (``(S,)`` booleans, one per stacked parameter) holds, else ``old``: how
    front ends leave a parameter's state untouched when its gradient was not finite. When ``old``
    has no cache the result has none either (``kron_step`` rebuilds it from the kept factors).
    An entry the step left as it was (the same object, as factors are on a step without a fit)
    is returned without a select."""

    def pick(flags: Any, a: Any, b: Any) -> Any:
        if a is b:
            return a
        return ops.where(ops.reshape(flags, (-1,) + (1,) * (len(a.shape) - 1)), a, b)

    per_block = _blocks_of(ok, num_blocks, ops)
    return TensorState(
        tuple(pick(per_block, a, b) for a, b in zip(new.factors, old.factors)),
        tuple(pick(per_block, a, b) for a, b in zip(new.lipschitz, old.lipschitz)),
        pick(ok, new.momentum, old.momentum),
        tuple(pick(per_block, a, b) for a, b in zip(new.cache, old.cache)) if old.cache else (),
    )


def clip_update(y: Any, options: StepOptions, ops: Any) -> Any:
    """The clips of ``options``: soft clip, RMS cap, elementwise cap. ``y`` is ``(S, *shape)``."""
    if options.soft_clip:
        y = soft_clip(y, ops)
    if options.clip_rms is not None:
        y = clip_rms(y, options.clip_rms, ops)
    if options.clip_max is not None:
        y = clip_elementwise(y, options.clip_max, ops)
    return y


def kron_step(
    state: TensorState,
    grad: Any,
    count: Any,
    noise: Any,
    *,
    plan: Plan,
    options: StepOptions,
    precond_lr: Any,
    do_fit: bool,
    ops: Any,
    mask: Any = None,
    probe: Any = None,
    hvp: Any = None,
    norm_probes: Sequence[Any] | None = None,
    donate_momentum: bool = False,
) -> tuple[Any, TensorState]:
    """One step for ``S ≥ 1`` stacked parameters of one plan; returns ``(y, new state)`` with ``y``
    the clipped preconditioned directions ``(S, *plan.shape)`` (the caller applies ``θ ← θ - η·y``).
    With ``plan.num_blocks = b`` blocks per parameter, factors hold ``S·b`` blocks, parameter ``s``
    owning blocks ``s·b … (s+1)·b - 1``.

    The gradient and momentum may be in a wider dtype than the factors (float32 with bfloat16
    factors): the momentum is averaged in theirs, the products run in the factors' dtype, and
    ``y`` comes out in the factors' dtype.

    Args:
      grad: the gradients, ``(S, *plan.shape)``.
      count: momentum updates taken so far: a number, or a floating-point array that
        broadcasts against ``grad`` (``(S, 1, …, 1)``, one count per stacked parameter); see
        :func:`update_momentum`.
      noise: standard normal in the blocked layout ``(S·B, *plan.block_shape)``.
      do_fit: update the preconditioner on this step.
      probe, hvp: Newton type: the probe ``v`` and ``H v`` in the blocked layout; when given, P is
        fitted on this pair instead of on the gradient.
      mask, norm_probes: see :func:`kron.core.fitting.fit`.
      donate_momentum: the caller will not use ``state.momentum`` again (it will not restore it
        for a non-finite gradient), so a backend that can may update it in place; the new
        state's momentum is then the same object.
    """
    if (probe is None) != (hvp is None):
        raise ValueError("Newton-type steps need both probe and hvp; got only one of them.")
    factors, lipschitz, cache = list(state.factors), list(state.lipschitz), list(state.cache)
    momentum = state.momentum
    if options.beta > 0:
        momentum = update_momentum(
            momentum, grad, count, options.beta, options.momentum_rule, ops, donate_momentum
        )
    averaged = momentum if options.beta > 0 else grad
    used = averaged if options.precondition_momentum else grad
    use_cache = options.cache and not options.fit.state_is_p
    factor_dtype = ops.dtype(factors[0])  # what meets a factor in a product is cast to it

    def refit() -> None:
        nonlocal factors, lipschitz, cache
        if hvp is not None:
            target = hvp
        else:
            source = averaged if options.whiten_momentum else grad
            target = plan.to_blocks(source, ops, stacked=True)
        factors, lipschitz = fit(
            factors,
            lipschitz,
            ops.astype(target, factor_dtype),
            noise,
            lr=precond_lr,
            options=options.fit,
            ops=ops,
            probe=probe,
            mask=mask,
            norm_probes=norm_probes,
            cache=cache if use_cache else None,
            informative=_blocks_of(nonzero_rows(grad, ops), plan.num_blocks, ops),
        )
        cache = cache_preconditioner(factors, ops) if use_cache else []

    if use_cache and not cache:
        # Before the fit, which reads P through the cache: a fit with and without one rounds
        # differently in bfloat16, and a parameter's result must not depend on whether a newly
        # stacked neighbour (or a fresh state) left the caller without a cache.
        cache = cache_preconditioner(factors, ops)
    if do_fit and options.fit_before_apply:
        refit()
    blocks = ops.astype(plan.to_blocks(used, ops, stacked=True), factor_dtype)
    if use_cache:
        y = precondition(cache, blocks, ops, state_is_p=True)
    else:
        y = precondition(factors, blocks, ops, options.fit.state_is_p, options.fit.symmetric_p)
    if do_fit and not options.fit_before_apply:
        refit()
    y = clip_update(plan.from_blocks(y, ops, stacked=True), options, ops)
    return y, TensorState(tuple(factors), tuple(lipschitz), momentum, tuple(cache))
