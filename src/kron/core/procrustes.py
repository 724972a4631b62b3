"""Online orthogonal Procrustes steps (algorithm.md §4.3.1-4.3.2).

A left rotation ``U Q`` leaves ``P = QᵀQ`` unchanged, so geometries that assume a symmetric
``Q`` (Q0.5EQ1.5, PRO4P) rotate ``Q`` back towards its symmetric polar factor after every update.
Each step maximises ``tr(U Q)`` along the skew generator ``R = Qᵀ − Q`` with a truncated
exponential.
Shapes: ``(B, n, n)`` in and out.
"""

from __future__ import annotations

from typing import Any

from kron.core.norms import lb_skew


def _column(x: Any, ops: Any) -> Any:
    return ops.reshape(x, (-1, 1, 1))


def _generator(q: Any, ops: Any) -> tuple[Any, Any, Any]:
    """The normalised skew generator ``R = (Qᵀ − Q)/c`` (``c`` a lower bound of ``‖Qᵀ − Q‖₂``)
    in Q's dtype, ``tr(RQ)``, and the dtype of the trace: Q's, at least float32.

    R, c and the trace are formed in at least float32 and only the products run in Q's dtype
    (bfloat16 products take about half the time of float32 ones on CPUs and GPUs that have
    them). The trace sets the step size and is small when Q is nearly symmetric; it is taken in
    the closed form ``tr(RQ) = (‖Q‖²_F − tr(Q²))/c = c‖R‖²_F/2``, which has no cancellation,
    where summing the diagonal of ``RQ`` would subtract two nearly equal numbers. c is formed
    wide too: in bfloat16 the estimate can start from another row and come out several percent
    off, and the capped step ``a·R`` scales with ``1/c``.
    """
    wide = q if ops.eps(ops.dtype(q)) <= 1e-6 else ops.astype(q, "float32")
    # (Q − Qᵀ)/(−c) keeps Q's memory layout, which Qᵀ − Q would take from Qᵀ.
    r = wide - ops.mT(wide)
    c = lb_skew(r, ops) + ops.tiny(ops.dtype(wide))
    r = r / _column(-c, ops)
    norm = ops.norm(r, axis=(-2, -1))
    return ops.astype(r, ops.dtype(q)), 0.5 * c * norm * norm, ops.dtype(wide)


def _trace(x: Any, dtype: Any, ops: Any) -> Any:
    """``tr(x)`` summed in ``dtype``."""
    return ops.sum(ops.astype(ops.diagonal(x), dtype), axis=-1)


def _in_dtype_of(a: Any, q: Any, ops: Any) -> Any:
    """A ``(B,)`` step size as a ``(B, 1, 1)`` column in Q's dtype."""
    return _column(ops.astype(a, ops.dtype(q)), ops)


def procrustes_step2(q: Any, ops: Any, max_step: float = 0.125) -> Any:
    """Second-order step ``Q ← (I + aR + (aR)²/2) Q`` with ``a ≤ max_step``."""
    r, t1, wide = _generator(q, ops)
    rq = ops.matmul(r, q)
    rrq = ops.matmul(r, rq)
    t2 = _trace(rrq, wide, ops)
    # a maximises tr(Q) + a·t1 + a²·t2/2; only a concave (t2 < 0) model has a finite maximiser.
    safe_t2 = ops.where(t2 < 0, t2, -ops.ones(t2.shape, t2))
    a = ops.where(t2 < 0, ops.minimum(-t1 / safe_t2, max_step), max_step * ops.ones(t2.shape, t2))
    rotated = ops.addcmul(q, _in_dtype_of(a, q, ops), rq, into=rq)
    return ops.addcmul(rotated, _in_dtype_of(a * a / 2, q, ops), rrq, into=rrq)


def procrustes_step3(q: Any, ops: Any, max_step: float = 1.0 / 3.0) -> Any:
    """Third-order step ``Q ← (I + aR + (aR)²/2 + (aR)³/8) Q``, taken only when ``t1 > 0`` and
    ``t3 < 0``; ``a`` is the larger root of ``t1 + a·t2 + (3/8)a²·t3 = 0``, at most ``max_step``."""
    r, t1, wide = _generator(q, ops)
    rq = ops.matmul(r, q)
    rrq = ops.matmul(r, rq)
    rrrq = ops.matmul(r, rrq)
    t2, t3 = _trace(rrq, wide, ops), _trace(rrrq, wide, ops)
    ok = (t1 > 0) & (t3 < 0)
    safe_t3 = ops.where(ok, t3, -ops.ones(t3.shape, t3))
    disc = ops.maximum(t2 * t2 - 1.5 * t1 * safe_t3, 0.0)
    # The larger root (−t2 − √disc)/(0.75·t3), written 2·t1/(√disc − t2) where t2 ≤ 0 (always,
    # for a Q near SPD: R² is negative semidefinite): near symmetry t1·t3 is tiny, √disc ≈ |t2|,
    # and the first form cancels to 0 in float32 while the second keeps its digits.
    root = ops.sqrt(disc)
    stable = 2.0 * t1 / ops.maximum(root - t2, ops.tiny(ops.dtype(root)))
    a = ops.where(t2 <= 0, stable, (-t2 - root) / (0.75 * safe_t3))
    a = ops.minimum(a, max_step)
    a = ops.where(ok, a, ops.zeros(a.shape, a))
    half, quarter = _in_dtype_of(a / 2, q, ops), _in_dtype_of(a / 4, q, ops)
    inner = ops.addcmul(rrq, quarter, rrrq, into=rrrq)
    inner = ops.addcmul(rq, half, inner, into=inner)
    return ops.addcmul(q, _in_dtype_of(a, q, ops), inner, into=inner)


def procrustes_repeat3(q: Any, ops: Any, max_steps: int = 10, tol: float = 1e-3) -> Any:
    """Up to ``max_steps`` third-order steps, each skipped once ``max|Qᵀ − Q| < tol·max|Q|``
    (a mask, not a loop exit, so the op count is static)."""
    for _ in range(max_steps):
        asym = ops.max_abs(ops.mT(q) - q, axis=(-2, -1))
        done = asym < tol * ops.max_abs(q, axis=(-2, -1))
        q = ops.where(_column(done, ops), q, procrustes_step3(q, ops))
    return q
