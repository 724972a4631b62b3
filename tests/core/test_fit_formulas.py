"""Single fit steps against the formulas of algorithm.md §4.7 (and §4.3.1's Procrustes step),
written out here with NumPy one matrix at a time, float64.

The invariants of test_invariants.py hold at a fixed point; a wrong step size, a product on the
wrong side or a missing term of ``ell`` can keep the fixed point and pass them. These tests pin
each step: an unbalanced, non-symmetric start (so that balancing, symmetrisation and the side of
each product matter), a dense and a diagonal axis, and three steps of shrinking inputs so that
the Lipschitz estimate's moving average, not its fresh value, sets the step size.
"""

from __future__ import annotations

import numpy as np
import pytest

from kron.core import FitOptions, fit, get_ops, make_plan, procrustes_step2
from kron.core.norms import lb_skew, norm_lower_bound
from kron.core.procrustes import procrustes_repeat3, procrustes_step3

NP = get_ops("numpy")
GEOMETRIES = ("EQ", "QEQ", "Q0.5EQ1.5", "QUAD", "QEP", "PRO4P", "QUAD4P")
BETA_LIPSCHITZ, PRECOND_LR = 0.9, 0.3
SHAPE = (4, 6)  # axis 0 dense, axis 1 diagonal
SIZE = 24


def _bound(m: np.ndarray) -> float:
    """The library's norm bound of a symmetric matrix (tested in test_ranges.py), floored by
    the largest diagonal entry as the fit floors it."""
    return max(float(norm_lower_bound(m[None], "power", NP)[0]), float(np.diag(m).max()))


def _gram(x: np.ndarray, axis: int) -> np.ndarray:
    """Γ_i(x, x) of a (4, 6) tensor: the contraction over the other axis."""
    return x @ x.T if axis == 0 else x.T @ x


def _mode(m: np.ndarray, x: np.ndarray, axis: int) -> np.ndarray:
    """``m ×_axis x``."""
    return m @ x if axis == 0 else x @ m.T


def _apply(factors: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    return _mode(factors[1], _mode(factors[0], x, 0), 1)


def _balanced(factors: list[np.ndarray]) -> list[np.ndarray]:
    """§4.5: both factors rescaled to the geometric mean of their largest entries."""
    largest = [np.abs(f).max() for f in factors]
    mean = np.sqrt(np.prod(largest))
    return [f * mean / m for f, m in zip(factors, largest)]


def _terms(geometry, factors, x, v, axis, newton):
    """(T1, T2) of §4.7 for ``axis``: ``x`` is the input (gradient or H·v), ``v`` the noise or
    the probe."""
    count = SIZE / factors[axis].shape[0]
    q = factors[axis]
    if geometry == "EQ":
        # A = Q h, B = Q^{-T} v
        b = np.linalg.solve(factors[0].T, v) @ np.linalg.inv(factors[1])
        return _gram(_apply(factors, x), axis), _gram(b, axis)
    if geometry in ("PRO4P", "QUAD4P"):  # the state is P
        a = _apply(factors, x)
    else:
        a = _apply([f.T for f in factors], _apply(factors, x))
    if geometry == "QEP":  # T1 = Γ(Q_i a), T2 = Γ(Q_i v) or (N/n_i) Q_i Q_iᵀ
        t2 = _gram(_mode(q, v, axis), axis) if newton else count * q @ q.T
        return _gram(_mode(q, a, axis), axis), t2
    return _gram(a, axis), _gram(v, axis) if newton else count * np.eye(q.shape[0])


def _dense_update(geometry, q, step, g):
    if geometry == "EQ":
        return q - step * np.triu(g) @ q
    if geometry == "QEQ":
        return q - step * q @ g
    if geometry in ("QUAD", "QUAD4P"):
        half = np.eye(len(q)) - (step / 2 if geometry == "QUAD" else step) * g
        new = half @ q @ half
        return (new + new.T) / 2
    new = q - step * g @ q  # Q0.5EQ1.5, QEP, PRO4P
    if geometry == "Q0.5EQ1.5":
        return procrustes_step2(new[None], NP)[0]
    if geometry == "PRO4P":
        return procrustes_repeat3(new[None], NP)[0]
    return new


def _diagonal_update(geometry, d, step, g):
    if geometry == "QUAD":
        return d * (1 - step * g / 2) ** 2
    if geometry == "QUAD4P":
        return d * (1 - step * g) ** 2
    return d * (1 - step * g)


def reference_fit(geometry, factors, lipschitz, x, v, newton):
    """One fit of §4.7's table; ``factors`` are [dense (4, 4), diagonal (6,)]."""
    square = [factors[0], np.diag(factors[1])]
    if geometry == "QEP":  # §4.5: QEP balances before every update
        square = _balanced(square)
    new_factors, new_lipschitz = [], []
    for axis, dense in enumerate((True, False)):
        t1, t2 = _terms(geometry, square, x, v, axis, newton)
        if not dense:
            t1, t2 = np.diag(np.diag(t1)), np.diag(np.diag(t2))
        if newton or geometry in ("EQ", "QEP"):
            ell = _bound(t1 + t2)
        else:  # whitening with T2 = (N/n_i)·I: ‖T1‖ + N/n_i
            ell = _bound(t1) + SIZE / len(t1)
        lipschitz_now = max(BETA_LIPSCHITZ * lipschitz[axis] + (1 - BETA_LIPSCHITZ) * ell, ell)
        step = PRECOND_LR / lipschitz_now
        if dense:
            new = _dense_update(geometry, square[0], step, t1 - t2)
        else:
            new = _diagonal_update(geometry, np.diag(square[1]), step, np.diag(t1 - t2))
        new_factors.append(new)
        new_lipschitz.append(lipschitz_now)
    return new_factors, new_lipschitz


@pytest.mark.parametrize("newton", [False, True], ids=["whitening", "newton"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_three_fits_follow_the_table(geometry, newton):
    rng = np.random.default_rng(1)
    assert make_plan(SHAPE).dense == (True, False)
    start = np.eye(4) + 0.2 * rng.standard_normal((4, 4))
    if geometry == "EQ":
        start = np.triu(start)
    if geometry in ("QUAD", "QUAD4P"):
        start = (start + start.T) / 2
    # Unbalanced: the dense factor's entries are about 12 times the diagonal's.
    expected = [3.0 * start, 0.25 * rng.uniform(0.5, 2.0, 6)]
    expected_lipschitz = [0.0, 0.0]
    options = FitOptions(
        geometry=geometry, damping=0.0, damping_rule="absolute", beta_lipschitz=BETA_LIPSCHITZ
    )
    factors = [expected[0][None], expected[1][None]]
    lipschitz = [np.zeros(1), np.zeros(1)]
    for step, scale in enumerate((1.0, 0.5, 0.25)):  # shrinking: the average of L binds
        x = scale * rng.standard_normal(SHAPE)
        probe = rng.standard_normal(SHAPE)
        noise = rng.standard_normal(SHAPE)
        expected, expected_lipschitz = reference_fit(
            geometry, expected, expected_lipschitz, x, probe if newton else noise, newton
        )
        factors, lipschitz = fit(
            factors,
            lipschitz,
            x[None],
            noise[None],
            lr=PRECOND_LR,
            options=options,
            ops=NP,
            probe=probe[None] if newton else None,
        )
        for ours, theirs in zip(factors, expected):
            np.testing.assert_allclose(ours[0], theirs, rtol=1e-10, atol=1e-12, err_msg=step)
        np.testing.assert_allclose([lip[0] for lip in lipschitz], expected_lipschitz, rtol=1e-10)


@pytest.mark.parametrize("angle", [0.05, 0.3])
def test_procrustes_step3_is_the_second_order_rotation(angle):
    """§4.3.1: ``Q + a(RQ + a/2(R²Q + a/4·R³Q))`` with ``R = (Qᵀ - Q)/‖Qᵀ - Q‖`` and ``a`` the
    larger root of ``t1 + a·t2 + (3/8)a²·t3 = 0`` (``t_k = tr(R^k Q)``), capped at 1/3; here a
    rotation by ``angle`` of a symmetric positive matrix, where the root is below the cap."""
    rng = np.random.default_rng(2)
    skew = rng.standard_normal((5, 5))
    skew = (skew - skew.T) * angle / np.linalg.norm(skew - skew.T, 2)
    values, vectors = np.linalg.eig(skew)
    rotation = np.real(vectors @ np.diag(np.exp(values)) @ np.linalg.inv(vectors))
    a = rng.standard_normal((5, 5))
    q = rotation @ (a @ a.T / 5 + 0.5 * np.eye(5))
    r = q.T - q
    r = r / float(lb_skew(r[None], NP)[0])
    rq = r @ q
    rrq = r @ rq
    rrrq = r @ rrq
    t1, t2, t3 = np.trace(rq), np.trace(rrq), np.trace(rrrq)
    assert t1 > 0 and t3 < 0
    root = (-t2 - np.sqrt(t2**2 - 1.5 * t1 * t3)) / (0.75 * t3)
    assert root < 1 / 3  # the root, not the cap
    expected = q + root * (rq + root / 2 * (rrq + root / 4 * rrrq))
    np.testing.assert_allclose(procrustes_step3(q[None], NP)[0], expected, rtol=1e-10, atol=1e-13)
