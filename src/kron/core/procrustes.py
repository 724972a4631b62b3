"""Online orthogonal Procrustes steps (algorithm.md §4.3.1-4.3.2).

A left rotation ``U Q`` leaves ``P = QᵀQ`` unchanged, so geometries that assume a symmetric
``Q`` (Q0.5EQ1.5, PRO4P) rotate ``Q`` back towards its symmetric polar factor after every update.
Each step maximises ``tr(U Q)`` along the skew generator ``R = Qᵀ − Q`` with a truncated
exponential.
Shapes: ``(B, n, n)`` in and out.
"""

from __future__ import annotations

from typing import Any

from kron.core.norms import lb_rowcol


def _trace(x: Any, ops: Any) -> Any:
    return ops.sum(ops.diagonal(x), axis=-1)


def _column(x: Any, ops: Any) -> Any:
    return ops.reshape(x, (-1, 1, 1))


def _generator(q: Any, ops: Any) -> tuple[Any, Any, Any]:
    """Normalised skew generator R (‖R‖ ≈ 1), RQ and RRQ."""
    r = ops.mT(q) - q
    r = r / _column(lb_rowcol(r, ops) + ops.tiny(ops.dtype(q)), ops)
    rq = ops.matmul(r, q)
    return r, rq, ops.matmul(r, rq)


def _in_float32(step: Any) -> Any:
    """Run a step in at least float32 (its traces decide the step size, and half precision
    cannot resolve them), returning the input dtype."""

    def lifted(q: Any, ops: Any, *args: Any) -> Any:
        dtype = ops.dtype(q)
        if ops.eps(dtype) <= 1e-6:
            return step(q, ops, *args)
        return ops.astype(step(ops.astype(q, "float32"), ops, *args), dtype)

    lifted.__doc__, lifted.__name__ = step.__doc__, step.__name__
    return lifted


@_in_float32
def procrustes_step2(q: Any, ops: Any, max_step: float = 0.125) -> Any:
    """Second-order step ``Q ← (I + aR + (aR)²/2) Q`` with ``a ≤ max_step``."""
    _, rq, rrq = _generator(q, ops)
    t1, t2 = _trace(rq, ops), _trace(rrq, ops)
    # a maximises tr(Q) + a·t1 + a²·t2/2; only a concave (t2 < 0) model has a finite maximiser.
    safe_t2 = ops.where(t2 < 0, t2, -ops.ones(t2.shape, t2))
    a = ops.where(t2 < 0, ops.minimum(-t1 / safe_t2, max_step), max_step * ops.ones(t2.shape, t2))
    a = _column(a, ops)
    return q + a * rq + (a * a / 2) * rrq


@_in_float32
def procrustes_step3(q: Any, ops: Any, max_step: float = 1.0 / 3.0) -> Any:
    """Third-order step ``Q ← (I + aR + (aR)²/2 + (aR)³/8) Q``, taken only when ``t1 > 0`` and
    ``t3 < 0``; ``a`` is the larger root of ``t1 + a·t2 + (3/8)a²·t3 = 0``, at most ``max_step``."""
    r, rq, rrq = _generator(q, ops)
    rrrq = ops.matmul(r, rrq)
    t1, t2, t3 = _trace(rq, ops), _trace(rrq, ops), _trace(rrrq, ops)
    ok = (t1 > 0) & (t3 < 0)
    safe_t3 = ops.where(ok, t3, -ops.ones(t3.shape, t3))
    disc = ops.maximum(t2 * t2 - 1.5 * t1 * safe_t3, 0.0)
    a = ops.minimum((-t2 - ops.sqrt(disc)) / (0.75 * safe_t3), max_step)
    a = _column(ops.where(ok, a, ops.zeros(a.shape, a)), ops)
    return q + a * (rq + (a / 2) * (rrq + (a / 4) * rrrq))


def procrustes_repeat3(q: Any, ops: Any, max_steps: int = 10, tol: float = 1e-3) -> Any:
    """Up to ``max_steps`` third-order steps, each skipped once ``max|Qᵀ − Q| < tol·max|Q|``
    (a mask, not a loop exit, so the op count is static)."""
    for _ in range(max_steps):
        asym = ops.max(ops.abs(ops.mT(q) - q), axis=(-2, -1))
        done = asym < tol * ops.max(ops.abs(q), axis=(-2, -1))
        q = ops.where(_column(done, ops), q, procrustes_step3(q, ops))
    return q
