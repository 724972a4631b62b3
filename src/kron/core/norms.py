"""Cheap lower bounds of the spectral norm ‖M‖₂ (algorithm.md §4.8).

Every estimate is ``‖M x‖`` for some unit vector ``x``, so it never exceeds ‖M‖₂. All functions take
``(B, n, n)`` and return ``(B,)``; a zero matrix gives 0. A row or column is selected with
``ops.take_rows`` (a gather by the argmax), which batches and traces in every framework.

The estimators work on ``M/max|M|``, as psgd_torch's do, so that no product overflows or
underflows whatever M's scale, but never form it: the vectors' products with M are divided
instead. ``M/max|M|`` would cost two passes over M and a temporary as large as it, per factor
per fit.

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
    """Rows scaled to unit norm; a zero row stays zero (divided by ``tiny``, not by 0)."""
    norms = ops.reshape(_norm_rows(x, ops), (*x.shape[:-1], 1))
    return x / ops.maximum(norms, ops.tiny(ops.dtype(x)))


def _scale(m: Any, ops: Any) -> Any:
    """``max|M|`` as a ``(B, 1, 1)`` column, 1 for a zero matrix."""
    return ops.reshape(_safe_scale(ops.max_abs(m, axis=(-2, -1)), ops), (-1, 1, 1))


def _times(rows: Any, m: Any, scale: Any, ops: Any) -> Any:
    """``rows · (M/scale)`` for ``(B, r, n)`` rows, dividing the product instead of M."""
    return ops.matmul(rows, m) / scale


def _times_transpose(rows: Any, m: Any, scale: Any, ops: Any) -> Any:
    """``rows · (M/scale)ᵀ``, formed as ``(M · rowsᵀ)ᵀ``: batched products copy a transposed
    matrix operand first (PyTorch's bfloat16 ones on the CPU, XLA:CPU's), while a transposed
    block of a few rows costs nothing."""
    return ops.mT(ops.matmul(m, ops.mT(rows))) / scale


def _dominant(norms: Any, m: Any, ops: Any) -> Any:
    """``(B,)`` index of the largest of ``norms`` (row or column norms of M). Norms of M itself
    overflow to inf (or underflow to 0) once M's entries pass about 1e19 (or fall below about
    1e-19) in float32, and argmax would then give index 0 whatever M is; there the index of the
    largest diagonal entry is taken instead, the dominant row of the PSD matrices the fit
    bounds (``M_ij² ≤ M_ii M_jj``)."""
    top = ops.max(norms, axis=-1)
    usable = ops.isfinite(top) & (top > 0)
    return ops.where(usable, ops.argmax(norms, -1), ops.argmax(ops.diagonal(m), -1))


def _top_row(m: Any, scale: Any, ops: Any) -> Any:
    """The row of largest Euclidean norm of ``M/scale``, as ``(B, 1, n)``."""
    return ops.take_rows(m, _dominant(_norm_rows(m, ops), m, ops)) / scale


def lb_rowcol(m: Any, ops: Any) -> Any:
    """General-matrix estimator: warm start at the dominant row or column, 1.5 power iterations."""
    scale = _scale(m, ops)
    col_norms, row_norms = ops.norm(m, axis=-2), ops.norm(m, axis=-1)
    # Column branch: c = M[:, j], x = cᵀM, estimate ‖x Mᵀ‖. Row branch: r = M[i, :], x = M rᵀ,
    # estimate ‖Mᵀ x‖. Both are computed and one is kept, so there is no branch on values.
    col = ops.take_rows(ops.mT(m), _dominant(col_norms, m, ops)) / scale
    x_col = _unit_rows(_times(col, m, scale, ops), ops)
    est_col = _norm_rows(_times_transpose(x_col, m, scale, ops), ops)[..., 0]
    row = ops.take_rows(m, _dominant(row_norms, m, ops)) / scale
    x_row = _unit_rows(_times_transpose(row, m, scale, ops), ops)
    est_row = _norm_rows(_times(x_row, m, scale, ops), ops)[..., 0]
    use_col = ops.max(col_norms, axis=-1) > ops.max(row_norms, axis=-1)
    return scale[:, 0, 0] * ops.where(use_col, est_col, est_row)


def lb_spd(m: Any, ops: Any) -> Any:
    """SPD estimator: one iteration from the top row, scaled by the largest diagonal entry (a
    matrix without a positive one, the zero matrix for SPD input, gives 0)."""
    s = ops.max(ops.diagonal(m), axis=-1)
    scale = ops.reshape(_safe_scale(s, ops), (-1, 1, 1))
    x = _unit_rows(_times(_top_row(m, scale, ops), m, scale, ops), ops)
    return ops.maximum(s, 0.0) * _norm_rows(_times(x, m, scale, ops), ops)[..., 0]


def lb_skew(m: Any, ops: Any) -> Any:
    """Skew-symmetric estimator (Procrustes' generator): :func:`lb_rowcol`'s row branch. For
    ``Mᵀ = −M`` a column is minus the row of the same index, so both branches give the same
    estimate and one suffices.

    Unlike the other estimators it works on M itself, not ``M/max|M|``, which saves the two
    reductions that find ``max|M|``: the vectors are normalised before each product, which is
    safe while M's entries stay between about 1e-19 and 1e18 (where float32 squares and sums
    them without underflow or overflow). The generators it gets, ``Q − Qᵀ`` of a factor, are far
    from either end."""
    top = _unit_rows(ops.take_rows(m, ops.argmax(_norm_rows(m, ops), -1)), ops)
    x = _unit_rows(ops.matmul(top, m), ops)
    return _norm_rows(ops.matmul(x, m), ops)[..., 0]


def lb_power(m: Any, ops: Any, iters: int = 2) -> Any:
    """``iters`` power iterations ``x ← x·M·Mᵀ`` from the top row, then ``‖x Mᵀ‖``: a tight
    bound for the symmetric matrices the fit passes (any unit ``x`` gives a valid bound)."""
    scale = _scale(m, ops)
    x = _unit_rows(_top_row(m, scale, ops), ops)
    for _ in range(iters):
        x = _unit_rows(_times_transpose(_times(x, m, scale, ops), m, scale, ops), ops)
    return scale[:, 0, 0] * _norm_rows(_times_transpose(x, m, scale, ops), ops)[..., 0]


def lb_subspace(m: Any, probes: Any, ops: Any, half_iters: int = 2) -> Any:
    """Randomized subspace iteration with ``probes`` ``(B, r, n)`` standard normal rows (r = 32 in
    psgd_torch). The probes are shifted towards the dominant row, which keeps the estimate good for
    large low-rank matrices."""
    scale = _scale(m, ops)
    top = _top_row(m, scale, ops)
    side = ops.sign(ops.sum(top * probes, axis=-1))
    side = ops.where(side == 0, ops.ones(side.shape, side), side)
    v = top + ops.reshape(side, (*side.shape, 1)) * probes
    for _ in range(half_iters):
        v = _unit_rows(_times(v, m, scale, ops), ops)
        v = _times(v, m, scale, ops)
    return scale[:, 0, 0] * ops.max(_norm_rows(v, ops), axis=-1)


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
