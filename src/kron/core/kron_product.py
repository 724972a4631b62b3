"""Kronecker-factored products (algorithm.md §0, §3).

Shapes: a tensor ``x`` is ``(B, n_1, ..., n_k)``. A factor for axis ``i`` is dense
``(B, n_i, n_i)`` or diagonal ``(B, n_i)``; its rank tells which (the plan fixed it, so this is
static metadata, never a value test). Everything is batched over ``B``. Contractions go through
``matmul`` on the mode-``i`` unfolding, so there is no einsum letter budget and any order works.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def is_dense(factor: Any) -> bool:
    """True for a dense ``(B, n, n)`` factor, False for a diagonal ``(B, n)`` one."""
    return len(factor.shape) == 3


def _unfold(x: Any, axis: int, ops: Any) -> tuple[Any, tuple[int, ...]]:
    """``x`` -> ``(B, N/n_i, n_i)`` with axis ``i`` last, plus the shape to fold back."""
    moved = ops.moveaxis(x, axis + 1, -1)
    shape = tuple(moved.shape)
    return ops.reshape(moved, (shape[0], -1, shape[-1])), shape


def _fold(y: Any, shape: tuple[int, ...], axis: int, ops: Any) -> Any:
    return ops.moveaxis(ops.reshape(y, shape), -1, axis + 1)


def along_axis(d: Any, axis: int, ndim: int, ops: Any) -> Any:
    """A ``(B, n)`` vector reshaped to broadcast along axis ``axis`` of a ``(B, ...)`` tensor."""
    shape = [d.shape[0]] + [1] * (ndim - 1)
    shape[axis + 1] = d.shape[1]
    return ops.reshape(d, tuple(shape))


def _sides(x: Any, axis: int) -> tuple[int, int, int]:
    """``(prod of axes before, n_axis, prod of axes after)``, batch axis excluded."""
    shape = tuple(x.shape[1:])
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])


def mode_product(
    factor: Any, x: Any, axis: int, ops: Any, transpose: bool = False, symmetric: bool = False
) -> Any:
    """``factor ×_axis x`` (``factorᵀ ×_axis x`` with ``transpose``). Shape of ``x`` is kept.

    With ``symmetric`` (``factor = factorᵀ``, as every ``P_i`` is) the orientation is chosen that
    needs no transposed copy of ``factor``: XLA:CPU materialises one for every ``x·factorᵀ``,
    while a strided BLAS call would not."""
    if not is_dense(factor):
        return x * along_axis(factor, axis, len(x.shape), ops)
    before, n, after = _sides(x, axis)
    batch = x.shape[0]
    # The first and last axes need no transposition: x is already (B, n, rest) or (B, rest, n).
    if before == 1:
        matrix = ops.mT(factor) if transpose and not symmetric else factor
        return ops.reshape(ops.matmul(matrix, ops.reshape(x, (batch, n, after))), x.shape)
    matrix = factor if transpose or symmetric else ops.mT(factor)
    if after == 1:
        return ops.reshape(ops.matmul(ops.reshape(x, (batch, before, n)), matrix), x.shape)
    unfolded, shape = _unfold(x, axis, ops)
    # Rows of the unfolding are vectors along `axis`: y = x·Mᵀ applies M, y = x·M applies Mᵀ.
    return _fold(ops.matmul(unfolded, matrix), shape, axis, ops)


def apply_factors(
    factors: Sequence[Any], x: Any, ops: Any, transpose: bool = False, symmetric: bool = False
) -> Any:
    """``(⊗ F_i) x`` (or ``(⊗ F_iᵀ) x``): one mode product per axis."""
    for axis, factor in enumerate(factors):
        x = mode_product(factor, x, axis, ops, transpose, symmetric)
    return x


def precondition(
    factors: Sequence[Any], x: Any, ops: Any, state_is_p: bool = False, symmetric: bool = True
) -> Any:
    """``P x`` (§3.1). With Q factors, ``P x = Qᵀ(Q x)``; when the factors are P itself (PRO4P,
    QUAD4P, or a cache from :func:`cache_preconditioner`), each is applied once: in whichever
    orientation needs no transpose when P is ``symmetric``, as itself otherwise (PRO4P's P_i
    are symmetric only to its Procrustes tolerance)."""
    if state_is_p:
        return apply_factors(factors, x, ops, symmetric=symmetric)
    return apply_factors(factors, apply_factors(factors, x, ops), ops, transpose=True)


def cache_preconditioner(factors: Sequence[Any], ops: Any) -> list[Any]:
    """``P_i = Q_iᵀ Q_i`` per factor, so that ``precondition(P, x, state_is_p=True)`` is one
    contraction per axis instead of two. Worth it when the preconditioner changes rarely."""
    return [ops.matmul(ops.mT(q), q) if is_dense(q) else q * q for q in factors]


def gram(x: Any, y: Any, axis: int, dense: bool, ops: Any) -> Any:
    """Partial contraction keeping ``axis`` (Γ_i of §0): ``(B, n, n)`` if ``dense`` else its
    diagonal ``(B, n)``; summed over every other axis."""
    before, n, after = _sides(x, axis)
    batch = x.shape[0]
    if not dense:
        return ops.sum(ops.reshape(x * y, (batch, before, n, after)), axis=(1, 3))
    if before == 1:
        xr, yr = ops.reshape(x, (batch, n, after)), ops.reshape(y, (batch, n, after))
        return ops.matmul(xr, ops.mT(yr))
    if after == 1:
        xr, yr = ops.reshape(x, (batch, before, n)), ops.reshape(y, (batch, before, n))
        return ops.matmul(ops.mT(xr), yr)
    xu, _ = _unfold(x, axis, ops)
    yu, _ = _unfold(y, axis, ops)
    return ops.matmul(ops.mT(xu), yu)


def solve_transpose(factors: Sequence[Any], v: Any, ops: Any) -> Any:
    """``Q^{-T} v`` for upper-triangular or diagonal factors (§3.3, EQ only)."""
    for axis, q in enumerate(factors):
        if not is_dense(q):
            v = v / along_axis(q, axis, len(v.shape), ops)
            continue
        unfolded, shape = _unfold(v, axis, ops)
        # Q_iᵀ X = V_(i) with V_(i) the (n, N/n) unfolding; Q_iᵀ is lower triangular. Solves run
        # in at least float32: half-precision triangular solves are inaccurate or unsupported.
        dtype = ops.dtype(v)
        lifted = ops.eps(dtype) > 1e-6 or ops.eps(ops.dtype(q)) > 1e-6
        lower = ops.mT(ops.astype(q, "float32") if lifted else q)
        rhs = ops.mT(ops.astype(unfolded, "float32") if lifted else unfolded)
        solved = ops.mT(ops.solve_lower(lower, rhs))
        v = _fold(ops.astype(solved, dtype) if lifted else solved, shape, axis, ops)
    return v
