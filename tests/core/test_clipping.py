"""The clips and gradient corrections of ``kron.core.clipping`` that name a peer's function:
``soft_clip`` is heavyball's ``trust_region_clip_``, ``mars_correction`` heavyball's
``mars_correction``, each with its math as heavyball computes it."""

from __future__ import annotations

import numpy as np

from kron.core import mars_correction, soft_clip


def _trust_region(x: np.ndarray, scale: float = 1.5, lerp: float = 0.9) -> np.ndarray:
    """heavyball 1.5's ``_compilable_trust_region_clip_`` (utils.py), line by line."""
    x = x / scale
    tanh = np.tanh(x)
    x = np.copysign(np.log1p(np.abs(x)), tanh) * (1 - lerp) + tanh * lerp
    return np.clip(x * scale, -2.0, 2.0)


def test_soft_clip_is_heavyballs_trust_region_clip_with_its_clamp_at_two(backend):
    """heavyball's trust region ends with ``clamp(-2, 2)``: the log term grows without bound,
    so an entry of 1e6 came out at 3.36 without the clamp."""
    y = np.array([[[-1e6, -30.0, -2.5, -0.3, 0.0], [0.3, 1.0, 2.5, 30.0, 1e6]]])
    for scale in (1.5, 0.5, 4.0):  # the bound is ±2 whatever the scale, as in heavyball
        clipped = backend.numpy(soft_clip(backend.array(y), backend.ops, scale=scale))
        np.testing.assert_allclose(clipped, _trust_region(y, scale), rtol=1e-12, atol=1e-15)
        assert np.abs(clipped).max() <= 2.0
    big = backend.numpy(soft_clip(backend.array(np.array([[1e6, -1e6]])), backend.ops))
    np.testing.assert_array_equal(big, [[2.0, -2.0]])


def test_mars_correction_is_not_rescaled(backend):
    """heavyball's ``mars_correction`` is ``g + γ·β/(1-β)·(g - g_prev)`` and nothing more: a
    corrected gradient of norm far above 1 is kept as it is (the unit-norm cap is gone)."""
    rng = np.random.default_rng(0)
    grad, previous = 10.0 * rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))
    beta, gamma = 0.9, 0.0025
    corrected = backend.numpy(
        mars_correction(backend.array(grad), backend.array(previous), beta, gamma, backend.ops)
    )
    expected = grad + gamma * beta / (1 - beta) * (grad - previous)
    np.testing.assert_allclose(corrected, expected, rtol=1e-12)
    assert np.linalg.norm(corrected[0]) > 10.0
