"""Shared helpers of the core tests: random matrices, explicit Kronecker products and fit loops."""

from __future__ import annotations

import math
from functools import reduce

import numpy as np

from kron.core import (
    FitOptions,
    LayoutOptions,
    fit,
    init_factors,
    init_lipschitz,
    make_plan,
)

ALL_GEOMETRIES = ("EQ", "QEQ", "Q0.5EQ1.5", "QUAD", "QEP", "PRO4P", "QUAD4P")
SPLIT_INVARIANT = ("EQ", "QEQ", "Q0.5EQ1.5", "QUAD")

# (shape, layout) pairs of the Newton convergence tests (algorithm.md §7.1).
CONVERGENCE_CASES = {
    "vector(5)": ((5,), LayoutOptions(max_skew=math.inf)),
    "matrix(5,7)": ((5, 7), LayoutOptions(max_skew=math.inf)),
    "order3(3,4,5)": ((3, 4, 5), LayoutOptions()),
    "diag_axis(10,3)": ((10, 3), LayoutOptions(max_size=5)),
}


def random_upper(rng: np.random.Generator, n: int) -> np.ndarray:
    """A well conditioned upper-triangular matrix with a positive diagonal."""
    return np.triu(0.3 * rng.standard_normal((n, n)), 1) + np.diag(rng.uniform(0.5, 2.0, n))


def as_matrix(factor: np.ndarray) -> np.ndarray:
    """One block's factor as an explicit matrix (a diagonal factor becomes ``diag(d)``)."""
    return factor if factor.ndim == 2 else np.diag(factor)


def kron_all(matrices) -> np.ndarray:
    """Row-major Kronecker product ``M_1 ⊗ … ⊗ M_k`` (``[[1]]`` for no factors)."""
    return reduce(np.kron, [as_matrix(m) for m in matrices], np.ones((1, 1)))


def explicit_p(factors, state_is_p: bool = False, block: int = 0) -> np.ndarray:
    """``P`` of block ``block`` as an explicit ``N×N`` matrix, from numpy factors."""
    mats = [as_matrix(f[block]) for f in factors]
    if state_is_p:
        return kron_all(mats)
    q = kron_all(mats)
    return q.T @ q


def relative_error(p: np.ndarray, h: np.ndarray) -> float:
    """``‖P H − I‖_F / √N``."""
    return float(np.linalg.norm(p @ h - np.eye(len(h))) / math.sqrt(len(h)))


def kron_hessian(rng: np.random.Generator, plan, cond: float = 10.0, indefinite_axis=None):
    """Per block axis a symmetric ``H_i`` (dense SPD, or diagonal where the plan has a diagonal
    factor); ``indefinite_axis`` flips the sign of half its eigenvalues. Returns the list of
    ``H_i`` (matrices or vectors) and the explicit ``H``."""
    factors = []
    for axis, (n, dense) in enumerate(zip(plan.block_shape, plan.dense)):
        signs = np.ones(n)
        if axis == indefinite_axis:
            signs[::2] = -1.0
        if dense:
            u, _ = np.linalg.qr(rng.standard_normal((n, n)))
            factors.append((u * (signs * np.geomspace(1.0, cond, n))) @ u.T)
        else:
            factors.append(signs * rng.uniform(1.0, cond, n))
    return factors, kron_all(factors)


def apply_hessian(h_factors, v: np.ndarray) -> np.ndarray:
    """``(⊗H_i) v`` for ``v`` of shape ``(B, *block_shape)`` (explicit, via tensordot)."""
    out = v
    for axis, h in enumerate(h_factors):
        m = as_matrix(h)
        out = np.moveaxis(np.tensordot(m, out, axes=([1], [axis + 1])), 0, axis + 1)
    return out


def newton_fit(
    backend,
    geometry,
    shape,
    layout,
    *,
    steps,
    lr0,
    seed=0,
    indefinite_axis=None,
    norm_bound="power",
):
    """Newton-type fitting of ``h = H v`` (fresh ``v`` each step), μ_t = lr0·(1 − t/steps).
    Returns ``(numpy factors, H)``."""
    ops = backend.ops
    rng = np.random.default_rng(seed)
    plan = make_plan(shape, layout)
    h_factors, h = kron_hessian(rng, plan, indefinite_axis=indefinite_axis)
    options = FitOptions(geometry=geometry, damping=0.0, norm_bound=norm_bound)
    like = backend.array(np.zeros(1))
    factors = init_factors(plan, 1.0, like, ops, options.state_is_p)
    lipschitz = init_lipschitz(plan, like, ops)
    for t in range(steps):
        v = rng.standard_normal((1, *plan.block_shape))
        noise = rng.standard_normal(v.shape)
        factors, lipschitz = fit(
            factors,
            lipschitz,
            backend.array(apply_hessian(h_factors, v)),
            backend.array(noise),
            lr=lr0 * (1.0 - t / steps),
            options=options,
            ops=ops,
            probe=backend.array(v),
        )
    return [backend.numpy(f) for f in factors], h


def whitening_fit(backend, geometry, shape, layout, *, steps, lr0, seed=0):
    """Whitening-type fitting on ``g = H v``; returns ``(numpy factors, H)``."""
    ops = backend.ops
    rng = np.random.default_rng(seed)
    plan = make_plan(shape, layout)
    h_factors, h = kron_hessian(rng, plan, cond=4.0)
    options = FitOptions(geometry=geometry, damping=0.0)
    like = backend.array(np.zeros(1))
    factors = init_factors(plan, 1.0, like, ops, options.state_is_p)
    lipschitz = init_lipschitz(plan, like, ops)
    for t in range(steps):
        g = apply_hessian(h_factors, rng.standard_normal((1, *plan.block_shape)))
        noise = rng.standard_normal(g.shape)
        factors, lipschitz = fit(
            factors,
            lipschitz,
            backend.array(g),
            backend.array(noise),
            lr=lr0 * (1.0 - t / steps),
            options=options,
            ops=ops,
        )
    return [backend.numpy(f) for f in factors], h


def fit_trajectory(
    backend,
    factors,
    lipschitz,
    xs,
    noises,
    *,
    options,
    lrs,
    probes=None,
    mask=None,
    norm_probes=None,
    lipschitz_history=None,
):
    """Run ``fit`` over the given inputs (numpy arrays); returns the numpy factors after every
    step and the final Lipschitz estimates (every step's are appended to ``lipschitz_history``
    when it is a list). ``norm_probes[t]`` is the per-factor probe list of step ``t``."""
    ops = backend.ops
    factors = [backend.array(f) for f in factors]
    lipschitz = [backend.array(lip) for lip in lipschitz]
    mask = None if mask is None else backend.array(mask)
    history = []
    for t, (x, noise) in enumerate(zip(xs, noises)):
        probe = None if probes is None else backend.array(probes[t])
        step_probes = None if norm_probes is None else [backend.array(r) for r in norm_probes[t]]
        factors, lipschitz = fit(
            factors,
            lipschitz,
            backend.array(x),
            backend.array(noise),
            lr=lrs[t],
            options=options,
            ops=ops,
            probe=probe,
            mask=mask,
            norm_probes=step_probes,
        )
        history.append([backend.numpy(f) for f in factors])
        if lipschitz_history is not None:
            lipschitz_history.append([backend.numpy(lip) for lip in lipschitz])
    return history, [backend.numpy(lip) for lip in lipschitz]


def batched_p(factors, state_is_p: bool = False) -> np.ndarray:
    """Explicit ``P`` of every block, ``(B, N, N)`` (vectorised over blocks)."""
    batch = factors[0].shape[0]
    q = np.ones((batch, 1, 1))
    for f in factors:
        m = f if f.ndim == 3 else f[:, :, None] * np.eye(f.shape[1])
        q = np.einsum("bij,bkl->bikjl", q, m).reshape(
            batch, q.shape[1] * m.shape[1], q.shape[2] * m.shape[2]
        )
    return q if state_is_p else np.matmul(q.transpose(0, 2, 1), q)
