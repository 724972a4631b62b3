"""Fitting the preconditioner: one update of every factor from one pair (algorithm.md §4-5).

Two types of pair (§1.1):

* **whitening** (``probe is None``): ``x`` is a gradient-like tensor; the auxiliary variable is
  integrated out except in EQ, which uses ``noise`` both to damp ``x`` and as the explicit ``v``;
* **Newton** (``probe`` given): ``x`` is the Hessian-vector product ``h = H v`` and ``probe`` is
  ``v``; ``noise`` only damps ``h``.

Seven geometries, each a different local coordinate system for the same criterion (§1.2, §4.7):
EQ, QEQ, Q0.5EQ1.5, QUAD, QEP, and PRO4P / QUAD4P whose state is ``P`` itself.

Shapes: ``x``, ``noise``, ``probe`` and ``mask`` are ``(B, *block_shape)``; factors are
``(B, n, n)`` or ``(B, n)``; Lipschitz estimates are ``(B,)``. Functions return new arrays and
never write in place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kron.core.finite import finite_rows
from kron.core.kron_product import (
    apply_factors,
    gram,
    is_dense,
    mode_product,
    precondition,
    solve_transpose,
)
from kron.core.norms import NORM_BOUNDS, norm_lower_bound
from kron.core.procrustes import procrustes_repeat3, procrustes_step2

GEOMETRIES = ("EQ", "QEQ", "Q0.5EQ1.5", "QUAD", "QEP", "PRO4P", "QUAD4P")
GEOMETRY_ALIASES = {"Q0p5EQ1p5": "Q0.5EQ1.5", "QE": "QEQ"}
STATE_IS_P = frozenset({"PRO4P", "QUAD4P"})
DAMPING_RULES = ("elementwise", "mean_abs", "absolute")


def canonical_geometry(name: str) -> str:
    """The canonical spelling of a geometry name; ``ValueError`` listing the accepted ones."""
    name = GEOMETRY_ALIASES.get(name, name) if isinstance(name, str) else name
    if name not in GEOMETRIES:
        accepted = ", ".join(GEOMETRIES + tuple(GEOMETRY_ALIASES))
        raise ValueError(f"Unknown preconditioner_mode (geometry) {name!r}; accepted: {accepted}.")
    return name


@dataclass(frozen=True)
class FitOptions:
    """Static options of the preconditioner fit.

    Attributes:
      geometry: one of :data:`GEOMETRIES` (aliases in :data:`GEOMETRY_ALIASES`). Default
        ``"Q0.5EQ1.5"``, psgd_torch's default since 2025-09.
      beta_lipschitz: β_L of the "EMA, never below the current value" normaliser (§4.0). ``0``
        gives kron_torch's per-step normaliser. Default 0.9.
      damping: δ, the absolute damping of the ``"elementwise"`` and ``"absolute"`` rules.
        Default 1e-9.
      damping_rule: ``"elementwise"``: ``x + (δ + eps·|x|)·ξ`` (psgd_torch, heavyball);
        ``"mean_abs"``: ``x + √eps_f32·mean|x|·ξ`` (kron_torch, psgd_jax); ``"absolute"``:
        ``x + δ·ξ`` (eformer's ``noise_scale``; δ = 0 fits on ``x`` itself). Default elementwise.
      norm_bound: spectral-norm lower bound for dense factors, one of
        :data:`kron.core.norms.NORM_BOUNDS`. Default ``"power"``.
      normalizer_floor: the step is ``μ / max(L, floor)``. Default 0 (the dtype's ``tiny``).
    """

    geometry: str = "Q0.5EQ1.5"
    beta_lipschitz: float = 0.9
    damping: float = 1e-9
    damping_rule: str = "elementwise"
    norm_bound: str = "power"
    normalizer_floor: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "geometry", canonical_geometry(self.geometry))
        if not 0.0 <= self.beta_lipschitz < 1.0:
            raise ValueError(f"beta_lipschitz must be in [0, 1); got {self.beta_lipschitz!r}.")
        if not (self.damping >= 0.0 and math.isfinite(self.damping)):
            raise ValueError(f"damping must be finite and >= 0; got {self.damping!r}.")
        if self.damping_rule not in DAMPING_RULES:
            raise ValueError(
                f"Unknown damping_rule {self.damping_rule!r}; accepted: {', '.join(DAMPING_RULES)}."
            )
        if self.norm_bound not in NORM_BOUNDS:
            raise ValueError(
                f"Unknown norm_bound {self.norm_bound!r}; accepted: {', '.join(NORM_BOUNDS)}."
            )
        if not self.normalizer_floor >= 0.0:
            raise ValueError(f"normalizer_floor must be >= 0; got {self.normalizer_floor!r}.")

    @property
    def state_is_p(self) -> bool:
        return self.geometry in STATE_IS_P

    @property
    def symmetric_p(self) -> bool:
        """Whether the P_i this geometry keeps (``state_is_p``) are exactly symmetric, so either
        orientation applies them: QUAD4P symmetrises every fit, PRO4P's Procrustes steps stop
        at an asymmetry of 1e-3·max|P_i|."""
        return self.geometry != "PRO4P"


def damp(x: Any, noise: Any, options: FitOptions, ops: Any, mask: Any = None) -> Any:
    """Add damping noise to ``x`` (§5.1). ``noise`` is standard normal, shaped like ``x``; the
    ``"mean_abs"`` rule averages ``|x|`` over the real (unmasked) entries of each block."""
    if options.damping_rule == "mean_abs":
        axes = tuple(range(1, len(x.shape)))
        total = ops.sum(ops.abs(x), axis=axes, keepdims=True)
        count = math.prod(x.shape[1:]) if mask is None else ops.sum(mask, axis=axes, keepdims=True)
        return x + math.sqrt(1.1920928955078125e-07) * (total / count) * noise
    if options.damping_rule == "absolute":
        return x + options.damping * noise
    return ops.addcmul(x, options.damping + ops.eps(ops.dtype(x)) * ops.abs(x), noise)


def lipschitz_update(lipschitz: Any, ell: Any, beta: float, ops: Any) -> Any:
    """``L ← max(β L + (1-β) ell, ell)``: an EMA that never falls below the current estimate."""
    return ops.maximum(beta * lipschitz + (1.0 - beta) * ell, ell)


def _finite_blocks(factor: Any, ops: Any) -> Any:
    """``(B,)``: whether each block of a factor is finite (:func:`kron.core.finite_rows`). Not a
    sum, which is as cheap but overflows on finite entries: a float16 diagonal factor of 70 000
    entries near 1 sums past 65 504 and would never be updated."""
    return finite_rows(factor, ops)


def _per_block(value: Any, factor: Any, ops: Any) -> Any:
    """A ``(B,)`` value reshaped to broadcast against ``factor``."""
    return ops.reshape(value, (-1,) + (1,) * (len(factor.shape) - 1))


def balance(factors: Sequence[Any], ops: Any, mask: Any = None) -> list[Any]:
    """Rescale factors to equal max-abs norms without changing ``⊗Q_i`` (§5.3). With ``mask``
    (1 on real entries, 0 on padding, like the blocks) the norms are taken over the real rows
    and columns only: the padded diagonal stays at its initial value, and QEP, which balances
    before every fit and is not invariant to the split, would otherwise depend on padding."""
    if len(factors) < 2:
        return list(factors)

    def real_part(f: Any, axis: int) -> Any:
        if mask is None:
            return f
        others = tuple(a for a in range(1, len(mask.shape)) if a != axis + 1)
        real = ops.max(mask, axis=others) if others else mask
        if not is_dense(f):
            return f * real
        n = real.shape[-1]
        return f * ops.reshape(real, (-1, n, 1)) * ops.reshape(real, (-1, 1, n))

    log_norms = [
        ops.log(
            ops.maximum(
                ops.max_abs(real_part(f, i), tuple(range(1, len(f.shape)))),
                ops.tiny(ops.dtype(f)),
            )
        )
        for i, f in enumerate(factors)
    ]
    log_mean = sum(log_norms) / len(factors)
    return [f * _per_block(ops.exp(log_mean - ln), f, ops) for f, ln in zip(factors, log_norms)]


def _whitening_count(mask: Any, axis: int, shape: tuple[int, ...], ops: Any) -> Any:
    """``E Γ_i(v, v)`` for ``v ~ N(0, I)`` on the unpadded entries: the scalar ``N/n_i``, or a
    ``(B, n_i)`` vector of per-index counts when ``mask`` marks padding."""
    if mask is None:
        return math.prod(shape) / shape[axis]
    return gram(mask, mask, axis, False, ops)


def _scale_columns(q: Any, count: Any, ops: Any) -> Any:
    """``q · diag(count)`` for ``count`` a number or ``(B, n)``."""
    if isinstance(count, (int, float)):
        return count * q
    return q * ops.reshape(count, (count.shape[0], 1, count.shape[-1]))


def _bound(m: Any, dense: bool, options: FitOptions, ops: Any, probes: Any) -> Any:
    """A lower bound of ‖M‖₂ for the PSD matrices the fit normalises by (diagonal: the largest
    entry). The largest diagonal entry is one too, and a floor under the estimate: near the top of
    float32's range XLA:CPU divides by ``max|M|`` through its reciprocal, a subnormal it flushes
    to zero, and the estimate collapses to 0, which would make the step μ/L enormous.

    A float16 M is estimated in float32: its norm exceeds its largest entry up to n-fold (and
    the power estimator squares it), so the estimate overflowed float16's range (65504) for
    matrices whose every entry fits, and came out 0 or NaN."""
    if not dense:
        return ops.max(m, axis=-1)
    if ops.tiny(ops.dtype(m)) > 1e-30:  # float16's narrow exponent range (bfloat16 has float32's)
        m = ops.astype(m, "float32")
        probes = None if probes is None else ops.astype(probes, "float32")
    estimate = norm_lower_bound(m, options.norm_bound, ops, probes)
    return ops.maximum(estimate, ops.max(ops.diagonal(m), axis=-1))


def _minus_scaled(q: Any, s: Any, product: Any, ops: Any) -> Any:
    """``q − s·product``, written into ``product``, a fresh temporary."""
    return ops.addcmul(q, -s, product, into=product)


def _update_dense(geometry: str, q: Any, g: Any, s: Any, ops: Any) -> Any:
    mm = ops.matmul
    if geometry == "EQ":
        return _minus_scaled(q, s, mm(ops.triu(g), q), ops)
    if geometry == "QEQ":
        return _minus_scaled(q, s, mm(q, g), ops)
    if geometry in ("Q0.5EQ1.5", "QEP", "PRO4P"):
        q = _minus_scaled(q, s, mm(g, q), ops)
        if geometry == "Q0.5EQ1.5":
            return procrustes_step2(q, ops)
        return procrustes_repeat3(q, ops) if geometry == "PRO4P" else q
    half = 0.5 * s if geometry == "QUAD" else s  # QUAD4P takes the full step on P
    q = _minus_scaled(q, half, mm(g, q), ops)
    q = _minus_scaled(q, half, mm(q, g), ops)
    return 0.5 * (q + ops.mT(q))


def _update_diagonal(geometry: str, q: Any, g: Any, s: Any) -> Any:
    if geometry == "QUAD":
        return q * (1.0 - 0.5 * s * g) ** 2
    if geometry == "QUAD4P":
        return q * (1.0 - s * g) ** 2
    return q * (1.0 - s * g)


def fit(
    factors: Sequence[Any],
    lipschitz: Sequence[Any],
    x: Any,
    noise: Any,
    *,
    lr: Any,
    options: FitOptions,
    ops: Any,
    probe: Any = None,
    mask: Any = None,
    norm_probes: Sequence[Any] | None = None,
    cache: Sequence[Any] | None = None,
    informative: Any = None,
) -> tuple[list[Any], list[Any]]:
    """One preconditioner update (§4.0). Returns ``(factors, lipschitz)``.

    Args:
      factors: ``Q_i`` (``P_i`` for PRO4P/QUAD4P), each ``(B, n_i, n_i)`` or ``(B, n_i)``.
      lipschitz: ``L_i``, each ``(B,)``.
      x: the gradient-like tensor (whitening) or ``h = H·probe`` (Newton), ``(B, *block_shape)``.
      noise: standard normal like ``x``; damps ``x`` (and is EQ-whitening's ``v``).
      lr: μ, the preconditioner learning rate (float or scalar array).
      options: :class:`FitOptions`.
      probe: Newton type only: the ``v`` of ``h = H v``.
      mask: 1 on real entries, 0 on padding, like ``x``; ``None`` when nothing is padded.
      norm_probes: per factor, ``(B, r, n_i)`` normals for the ``"subspace"`` norm bound.
      cache: ``P_i = Q_iᵀQ_i`` of these factors, when the caller keeps it: ``P·x`` then takes one
        product per axis instead of two. Ignored by EQ, which does not form ``P·x``.
      informative: ``(B,)`` booleans, the blocks of parameters whose gradient this step has an
        entry other than zero (:func:`kron.core.kron_step` passes them); the others keep their
        factor and estimate. None: every block is fitted.
    """
    geometry = options.geometry
    newton = probe is not None
    x = damp(x, noise, options, ops, mask)
    if mask is not None:
        x, noise = x * mask, noise * mask
        probe = None if probe is None else probe * mask
    factors = balance(factors, ops, mask) if geometry == "QEP" else list(factors)
    shape = tuple(x.shape[1:])
    if geometry == "EQ":
        left = apply_factors(factors, x, ops)
        right = solve_transpose(factors, probe if newton else noise, ops)
    elif cache:
        left = precondition(cache, x, ops, state_is_p=True)
    else:
        left = precondition(factors, x, ops, options.state_is_p, options.symmetric_p)
    floor = max(options.normalizer_floor, ops.tiny(ops.dtype(x)))
    new_factors, new_lipschitz = [], []
    for i, (q, old_lip) in enumerate(zip(factors, lipschitz)):
        dense = is_dense(q)
        probes = None if norm_probes is None else norm_probes[i]
        if geometry == "EQ":
            t1, t2 = gram(left, left, i, dense, ops), gram(right, right, i, dense, ops)
            ell = _bound(t1 + t2, dense, options, ops, probes)
            g = t1 - t2
        elif geometry == "QEP":
            xi = mode_product(q, left, i, ops)
            t1 = gram(xi, xi, i, dense, ops)
            if newton:
                vi = mode_product(q, probe, i, ops)
                t2 = gram(vi, vi, i, dense, ops)
            else:
                count = _whitening_count(mask, i, shape, ops)
                t2 = (
                    ops.matmul(_scale_columns(q, count, ops), ops.mT(q)) if dense else count * q * q
                )
            ell = _bound(t1 + t2, dense, options, ops, probes)
            g = t1 - t2
        else:
            t1 = gram(left, left, i, dense, ops)
            if newton:
                t2 = gram(probe, probe, i, dense, ops)
                ell = _bound(t1 + t2, dense, options, ops, probes)
                g = t1 - t2
            else:
                # The auxiliary term is E vvᵀ = diag(count), so it is subtracted on the diagonal.
                count = _whitening_count(mask, i, shape, ops)
                bound = _bound(t1, dense, options, ops, probes)
                # In the bound's dtype: a float16 bound comes back in float32.
                biggest = (
                    count
                    if isinstance(count, float)
                    else ops.astype(ops.max(count, axis=-1), ops.dtype(bound))
                )
                ell = bound + biggest
                g = ops.add_diagonal(t1, -count, into=t1) if dense else t1 - count
        # The estimate keeps its stored dtype, so a state's dtypes never change in a step. A
        # narrower bound (bfloat16 factors, float32 L) is widened first: TensorFlow does not
        # promote mixed dtypes.
        if ops.eps(ops.dtype(ell)) > ops.eps(ops.dtype(old_lip)):
            ell = ops.astype(ell, ops.dtype(old_lip))
        lip = ops.astype(
            lipschitz_update(old_lip, ell, options.beta_lipschitz, ops), ops.dtype(old_lip)
        )
        # L is kept in at least float32; the step is applied in the factor's own dtype.
        step = ops.astype(_per_block(lr / ops.maximum(lip, floor), q, ops), ops.dtype(q))
        updated = (
            _update_dense(geometry, q, g, step, ops)
            if dense
            else _update_diagonal(geometry, q, g, step)
        )
        # Wider inputs (a float64 μ, a float32 x) must not change the factor's dtype.
        updated = ops.astype(updated, ops.dtype(q))
        # A parameter whose gradient is all zeros (one the loss did not use) keeps its
        # factors: fitted on the damping noise alone, or on a decaying momentum, P would grow
        # as fast as the momentum shrinks and keep the update at the clip's size for as long.
        # A block whose fit overflowed (a finite float32 gradient near 1e19 squares past the
        # range) keeps its factor and estimate: an inf L would freeze the factor for good, and a
        # NaN factor would reach the parameters.
        ok = _finite_blocks(updated, ops) & ops.isfinite(lip)
        if informative is not None:
            ok = ok & informative
        new_factors.append(ops.where(_per_block(ok, q, ops), updated, q, into=updated))
        new_lipschitz.append(ops.where(ok, lip, old_lip))
    return new_factors, new_lipschitz


__all__ = [
    "DAMPING_RULES",
    "GEOMETRIES",
    "GEOMETRY_ALIASES",
    "STATE_IS_P",
    "FitOptions",
    "balance",
    "canonical_geometry",
    "damp",
    "fit",
    "lipschitz_update",
]
