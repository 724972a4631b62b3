"""Kronecker products against explicit matrices (algorithm.md §0, §3, §7.8)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kron.core import (
    LayoutOptions,
    apply_factors,
    cache_preconditioner,
    get_ops,
    gram,
    make_plan,
    mode_product,
    precondition,
    solve_transpose,
)

from ._core_helpers import as_matrix, kron_all, random_upper

SIZES = (3, 2, 4, 2)  # axis sizes used for orders 1..4
B = 2  # batch of independent blocks


def layouts(max_order: int = 4) -> list:
    """Every dense (D) / diagonal (d) combination for orders 0..max_order."""
    return [
        pytest.param(
            SIZES[:order], dense, id=f"{order}d-" + "".join("D" if d else "d" for d in dense)
        )
        for order in range(max_order + 1)
        for dense in itertools.product((True, False), repeat=order)
    ]


def random_factors(rng, block_shape, dense, batch=B, upper=False):
    out = []
    for n, d in zip(block_shape, dense):
        if not d:
            out.append(rng.uniform(0.5, 2.0, (batch, n)))
        elif upper:
            out.append(np.stack([random_upper(rng, n) for _ in range(batch)]))
        else:
            out.append(rng.standard_normal((batch, n, n)))
    return out


def explicit_precondition(factors, x: np.ndarray, state_is_p: bool = False) -> np.ndarray:
    """``(⊗Q_i)ᵀ(⊗Q_i) vec(x)`` per block, row-major vec (``⊗P_i vec(x)`` with ``state_is_p``)."""
    out = np.empty_like(x)
    for b in range(x.shape[0]):
        q = kron_all([f[b] for f in factors])
        p = q if state_is_p else q.T @ q
        out[b] = (p @ x[b].reshape(-1)).reshape(x.shape[1:])
    return out


@pytest.mark.parametrize(("shape", "dense"), layouts())
def test_precondition_matches_explicit_kron(backend, rng, shape, dense):
    factors = random_factors(rng, shape, dense)
    x = rng.standard_normal((B, *shape))
    got = precondition([backend.array(f) for f in factors], backend.array(x), backend.ops)
    np.testing.assert_allclose(
        backend.numpy(got), explicit_precondition(factors, x), rtol=1e-12, atol=1e-12
    )
    # Applying Q once is the plain Kronecker product (⊗Q_i) vec(x).
    once = apply_factors([backend.array(f) for f in factors], backend.array(x), backend.ops)
    np.testing.assert_allclose(
        backend.numpy(once), explicit_precondition(factors, x, True), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize(("shape", "dense"), layouts())
def test_cached_preconditioner_equals_two_sided(backend, rng, shape, dense):
    factors = [backend.array(f) for f in random_factors(rng, shape, dense)]
    x = backend.array(rng.standard_normal((B, *shape)))
    two_sided = precondition(factors, x, backend.ops)
    cache = cache_preconditioner(factors, backend.ops)
    for f, c in zip(factors, cache):
        assert tuple(c.shape) == tuple(f.shape)  # diagonal factors stay diagonal
    cached = precondition(cache, x, backend.ops, state_is_p=True)
    np.testing.assert_allclose(
        backend.numpy(cached), backend.numpy(two_sided), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize(("shape", "dense"), layouts())
def test_solve_transpose_inverts_qt(backend, rng, shape, dense):
    """Invariant 8: B = Q^{-T} v satisfies Qᵀ B = v, for upper-triangular/diagonal factors."""
    factors = random_factors(rng, shape, dense, upper=True)
    v = rng.standard_normal((B, *shape))
    qs = [backend.array(f) for f in factors]
    solved = solve_transpose(qs, backend.array(v), backend.ops)
    back = apply_factors(qs, solved, backend.ops, transpose=True)
    np.testing.assert_allclose(backend.numpy(back), v, rtol=1e-11, atol=1e-11)
    # And against the explicit dense solve.
    for b in range(B):
        q = kron_all([f[b] for f in factors])
        expected = np.linalg.solve(q.T, v[b].reshape(-1))
        np.testing.assert_allclose(
            backend.numpy(solved)[b].reshape(-1), expected, rtol=1e-11, atol=1e-11
        )


def explicit_gram(x: np.ndarray, y: np.ndarray, axis: int) -> np.ndarray:
    """Partial trace over every axis but ``axis`` of ``vec(x) vec(y)ᵀ``."""
    shape = x.shape
    outer = np.outer(x.reshape(-1), y.reshape(-1)).reshape(shape + shape)
    n = shape[axis]
    out = np.zeros((n, n))
    others = [range(m) if i != axis else [None] for i, m in enumerate(shape)]
    for rest in itertools.product(*others):
        for a in range(n):
            for c in range(n):
                left = tuple(a if r is None else r for r in rest)
                right = tuple(c if r is None else r for r in rest)
                out[a, c] += outer[left + right]
    return out


@pytest.mark.parametrize("shape", [(4,), (3, 2), (2, 3, 4), (2, 1, 3, 2)])
def test_gram_is_partial_trace(backend, rng, shape):
    x, y = rng.standard_normal((B, *shape)), rng.standard_normal((B, *shape))
    for axis in range(len(shape)):
        dense = gram(backend.array(x), backend.array(y), axis, True, backend.ops)
        diag = gram(backend.array(x), backend.array(y), axis, False, backend.ops)
        for b in range(B):
            expected = explicit_gram(x[b], y[b], axis)
            np.testing.assert_allclose(backend.numpy(dense)[b], expected, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(
                backend.numpy(diag)[b], np.diag(expected), rtol=1e-12, atol=1e-12
            )


# --------------------------------------------------------------------------------------------
# Blocked and merged layouts: per block, the same explicit product.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "options"),
    [
        ((20, 6), LayoutOptions(block_size=8)),
        ((9, 1, 9), LayoutOptions(block_size=4, max_skew=0.5)),
        ((2, 3, 4), LayoutOptions(merge_dims=True)),
        ((2, 3, 4, 5), LayoutOptions(merge_dims=True, block_size=4)),
    ],
)
def test_precondition_blocked_and_merged(backend, rng, shape, options):
    plan = make_plan(shape, options)
    factors = random_factors(rng, plan.block_shape, plan.dense, batch=plan.num_blocks)
    g = rng.standard_normal(shape)
    ops = backend.ops
    blocks = plan.to_blocks(backend.array(g), ops)
    out = precondition([backend.array(f) for f in factors], blocks, ops)
    expected_blocks = explicit_precondition(factors, backend.numpy(blocks))
    np.testing.assert_allclose(backend.numpy(out), expected_blocks, rtol=1e-12, atol=1e-12)
    # Back in the parameter shape, block b's output sits where its input came from.
    full = backend.numpy(plan.from_blocks(out, ops))
    assert full.shape == shape
    reference = plan.from_blocks(expected_blocks, get_ops("numpy"))
    np.testing.assert_allclose(full, reference, rtol=1e-12, atol=1e-12)
    if len(plan.work_shape) == 2 and plan.num_blocks == 1:
        # merged, unblocked: equals Q_1ᵀQ_1 G Q_2ᵀQ_2 on the 2-D view
        q1, q2 = (as_matrix(f[0]) for f in factors)
        view = g.reshape(plan.work_shape)
        np.testing.assert_allclose(
            full.reshape(plan.work_shape), q1.T @ q1 @ view @ (q2.T @ q2).T, rtol=1e-12, atol=1e-12
        )


# --------------------------------------------------------------------------------------------
# Many axes: no einsum letter budget.
# --------------------------------------------------------------------------------------------
def sequential_mode_products(factors, x: np.ndarray, transpose: bool = False) -> np.ndarray:
    """Independent reference: one ``tensordot`` per axis, per block."""
    out = np.array(x)
    for axis, f in enumerate(factors):
        for b in range(x.shape[0]):
            m = as_matrix(f[b])
            m = m.T if transpose else m
            out[b] = np.moveaxis(np.tensordot(m, out[b], axes=([1], [axis])), 0, axis)
    return out


def test_fourteen_axes_explicit(backend, rng):
    shape = (2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 1, 2)  # 14 axes, N = 128
    dense = tuple(i % 3 != 2 for i in range(14))
    factors = random_factors(rng, shape, dense, upper=True)
    x = rng.standard_normal((B, *shape))
    qs = [backend.array(f) for f in factors]
    got = precondition(qs, backend.array(x), backend.ops)
    np.testing.assert_allclose(
        backend.numpy(got), explicit_precondition(factors, x), rtol=1e-11, atol=1e-11
    )
    back = apply_factors(
        qs, solve_transpose(qs, backend.array(x), backend.ops), backend.ops, transpose=True
    )
    np.testing.assert_allclose(backend.numpy(back), x, rtol=1e-10, atol=1e-10)
    for axis in (0, 7, 13):
        got = gram(backend.array(x), backend.array(x), axis, True, backend.ops)
        unfold = np.moveaxis(x, axis + 1, 1).reshape(B, shape[axis], -1)
        np.testing.assert_allclose(
            backend.numpy(got), unfold @ unfold.transpose(0, 2, 1), rtol=1e-12, atol=1e-12
        )


def test_sixteen_axes_against_tensordot(backend, rng):
    shape = (2,) * 16  # N = 65536, far beyond 13 or 26 einsum letters
    dense = tuple(i % 2 == 0 for i in range(16))
    factors = random_factors(rng, shape, dense, batch=1)
    x = rng.standard_normal((1, *shape))
    got = precondition([backend.array(f) for f in factors], backend.array(x), backend.ops)
    expected = sequential_mode_products(factors, sequential_mode_products(factors, x), True)
    np.testing.assert_allclose(backend.numpy(got), expected, rtol=1e-11, atol=1e-11)


def test_mode_product_acts_on_one_axis(backend, rng):
    x = rng.standard_normal((B, 3, 4, 5))
    m = rng.standard_normal((B, 4, 4))
    got = backend.numpy(mode_product(backend.array(m), backend.array(x), 1, backend.ops))
    np.testing.assert_allclose(got, np.einsum("bij,bajc->baic", m, x), rtol=1e-12)
    got_t = backend.numpy(
        mode_product(backend.array(m), backend.array(x), 1, backend.ops, transpose=True)
    )
    np.testing.assert_allclose(got_t, np.einsum("bji,bajc->baic", m, x), rtol=1e-12)
