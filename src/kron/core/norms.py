"""Cheap lower bounds of the spectral norm ‖M‖₂ (algorithm.md §4.8).

Every estimate is ``‖M x‖`` for some unit vector ``x``, so it never exceeds ‖M‖₂. All functions take
``(B, n, n)`` and return ``(B,)``; a zero matrix gives 0. A row or column is selected with
``ops.take_rows`` (a gather by the argmax), which batches and traces in every framework.

================  ====================================================  ===========================
method            estimator                                             source
================  ====================================================  ===========================
``"rowcol"``      1.5 power iterations from the dominant row or column  §4.8.1, psgd_torch 2024
``"spd"``         one iteration from the dominant row, SPD input        §4.8.3, psgd_torch 2025
``"power"``       ``iters`` power iterations on MᵀM from the top row    §4.8.5, heavyball
``"subspace"``    randomized subspace iteration, needs ``probes``       §4.8.4, psgd_torch 2025-09
================  ====================================================  ===========================

:func:`lb_skew` is the Procrustes rotation's own (§4.3.1), not a choice of the fit.
"""

from __future__ import annotations

from typing import Any

NORM_BOUNDS = ("rowcol", "spd", "power", "subspace")


def _safe_scale(s: Any, ops: Any) -> Any:
    return ops.where(s > 0, s, ops.ones(s.shape, s))


def _norm_rows(x: Any, ops: Any) -> Any:
    return ops.norm(x, axis=-1)


def _unit_rows(x: Any, ops: Any) -> Any:
    norms = ops.reshape(_norm_rows(x, ops), (*x.shape[:-1], 1))
    return x / _safe_scale(norms, ops)


def _times_transpose(rows: Any, m: Any, ops: Any) -> Any:
    """``rows · Mᵀ`` for ``(B, r, n)`` rows, formed as ``(M · rowsᵀ)ᵀ``: batched products copy a
    transposed matrix operand first (PyTorch's bfloat16 ones on the CPU, XLA:CPU's), while a
    transposed block of a few rows costs nothing."""
    return ops.mT(ops.matmul(m, ops.mT(rows)))


def _top_row(m: Any, ops: Any) -> Any:
    """The row of largest Euclidean norm, as ``(B, 1, n)``."""
    return ops.take_rows(m, ops.argmax(_norm_rows(m, ops), -1))


def lb_rowcol(m: Any, ops: Any) -> Any:
    """General-matrix estimator: warm start at the dominant row or column, 1.5 power iterations."""
    s = ops.max(ops.abs(m), axis=(-2, -1))
    m = m / ops.reshape(_safe_scale(s, ops), (-1, 1, 1))
    sq = m * m
    col_energy, row_energy = ops.sum(sq, axis=-2), ops.sum(sq, axis=-1)
    # Column branch: c = M[:, j], x = cᵀM, estimate ‖x Mᵀ‖. Row branch: r = M[i, :], x = M rᵀ,
    # estimate ‖Mᵀ x‖. Both are computed and one is kept, so there is no branch on values.
    col = ops.take_rows(ops.mT(m), ops.argmax(col_energy, -1))
    x_col = _unit_rows(ops.matmul(col, m), ops)
    est_col = _norm_rows(_times_transpose(x_col, m, ops), ops)[..., 0]
    row = ops.take_rows(m, ops.argmax(row_energy, -1))
    x_row = _unit_rows(_times_transpose(row, m, ops), ops)
    est_row = _norm_rows(ops.matmul(x_row, m), ops)[..., 0]
    use_col = ops.max(col_energy, axis=-1) > ops.max(row_energy, axis=-1)
    return s * ops.where(use_col, est_col, est_row)


def lb_spd(m: Any, ops: Any) -> Any:
    """SPD estimator: scale by the largest diagonal entry, one iteration from the top row."""
    s = ops.max(ops.diagonal(m), axis=-1)
    m = m / ops.reshape(_safe_scale(s, ops), (-1, 1, 1))
    x = _unit_rows(ops.matmul(_top_row(m, ops), m), ops)
    return ops.maximum(s, 0.0) * _norm_rows(ops.matmul(x, m), ops)[..., 0]


def lb_skew(m: Any, ops: Any) -> Any:
    """Skew-symmetric estimator (Procrustes' generator): :func:`lb_rowcol`'s row branch. For
    ``Mᵀ = −M`` a column is minus the row of the same index, so both branches give the same
    estimate and one suffices.

    Unlike the other estimators it does not divide M by ``max|M|`` first, which costs a pass and
    a temporary as large as M: only the vectors are normalised, before each product, which is
    safe while M's entries stay below about 1e18 (float32's overflow, squared and summed). The
    generators it gets, ``Q − Qᵀ`` of a factor, are far from that."""
    top = _unit_rows(_top_row(m, ops), ops)
    x = _unit_rows(ops.matmul(top, m), ops)
    return _norm_rows(ops.matmul(x, m), ops)[..., 0]


def lb_power(m: Any, ops: Any, iters: int = 2) -> Any:
    """``iters`` power iterations ``x ← x·M·Mᵀ`` from the top row, then ``‖x Mᵀ‖``: a tight
    bound for the symmetric matrices the fit passes (any unit ``x`` gives a valid bound)."""
    s = ops.max(ops.abs(m), axis=(-2, -1))
    m = m / ops.reshape(_safe_scale(s, ops), (-1, 1, 1))
    x = _unit_rows(_top_row(m, ops), ops)
    for _ in range(iters):
        x = _unit_rows(_times_transpose(ops.matmul(x, m), m, ops), ops)
    return s * _norm_rows(_times_transpose(x, m, ops), ops)[..., 0]


def lb_subspace(m: Any, probes: Any, ops: Any, half_iters: int = 2) -> Any:
    """Randomized subspace iteration with ``probes`` ``(B, r, n)`` standard normal rows (r = 32 in
    psgd_torch). The probes are shifted towards the dominant row, which keeps the estimate good for
    large low-rank matrices."""
    s = ops.max(ops.abs(m), axis=(-2, -1))
    m = m / ops.reshape(_safe_scale(s, ops), (-1, 1, 1))
    top = _top_row(m, ops)
    side = ops.sign(ops.sum(top * probes, axis=-1))
    side = ops.where(side == 0, ops.ones(side.shape, side), side)
    v = top + ops.reshape(side, (*side.shape, 1)) * probes
    for _ in range(half_iters):
        v = _unit_rows(ops.matmul(v, m), ops)
        v = ops.matmul(v, m)
    return s * ops.max(_norm_rows(v, ops), axis=-1)


def norm_lower_bound(m: Any, method: str, ops: Any, probes: Any = None) -> Any:
    """Dispatch on ``method`` (one of :data:`NORM_BOUNDS`)."""
    if method == "rowcol":
        return lb_rowcol(m, ops)
    if method == "spd":
        return lb_spd(m, ops)
    if method == "power":
        return lb_power(m, ops)
    if method == "subspace":
        if probes is None:
            raise ValueError("norm bound 'subspace' needs probes of shape (B, r, n).")
        return lb_subspace(m, probes, ops)
    raise ValueError(f"Unknown norm bound {method!r}; accepted: {', '.join(NORM_BOUNDS)}.")
