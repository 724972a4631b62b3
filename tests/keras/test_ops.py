"""The ``keras`` ops backend gives the NumPy backend's results on the active Keras backend."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kron.core import (
    FitOptions,
    LayoutOptions,
    StepOptions,
    TensorState,
    get_ops,
    init_factors,
    init_lipschitz,
    kron_step,
    make_plan,
)

from ._helpers import to_numpy

NP, KO = get_ops("numpy"), get_ops("keras")


def _k(x):
    return keras.ops.convert_to_tensor(x)


def test_primitives_match_numpy() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 4)).astype(np.float32)
    lower = np.tril(x) + 4 * np.eye(4, dtype=np.float32)
    rhs = rng.standard_normal((2, 4, 3)).astype(np.float32)
    cases = {
        "matmul": lambda o, a: o.matmul(a, o.mT(a)),
        "triu": lambda o, a: o.triu(a),
        "diagonal": lambda o, a: o.diagonal(a),
        "moveaxis": lambda o, a: o.moveaxis(a, 1, 2),
        "permute": lambda o, a: o.permute(a, (2, 0, 1)),
        "pad_end": lambda o, a: o.pad_end(a, (0, 1, 2)),
        "slice_front": lambda o, a: o.slice_front(a, (1, 3, 2)),
        "reductions": lambda o, a: o.sum(a, axis=(1, 2)) + o.mean(a, -1)[:, 0] + o.max(a, 1)[:, 0],
        "elementwise": lambda o, a: o.sqrt(o.abs(a)) + o.log1p(o.abs(a)) + o.tanh(a) + o.sign(a),
        "clip_floor": lambda o, a: o.clip(o.floor(a * 3), -2.0, 2.0),
        "where": lambda o, a: o.where(a > 0, a, o.exp(a)),
        "maximum": lambda o, a: o.maximum(a, 0.25) + o.minimum(0.5, a),
        "argmax": lambda o, a: o.argmax(a, -1),
        "eye_ones": lambda o, a: o.eye(4, a) + o.ones((4, 4), a) + o.zeros((4, 4), a),
        "add_diagonal": lambda o, a: o.add_diagonal(a, -2.5) + o.add_diagonal(a, a[:, 0]),
        "addcmul": lambda o, a: o.addcmul(a, a[:, :1, :1], o.mT(a)) + o.addcmul(a, -1.5, a),
        "take_rows": lambda o, a: o.take_rows(a, o.argmax(a[:, :, 0], -1)),
    }
    for name, fn in cases.items():
        np.testing.assert_allclose(
            to_numpy(fn(KO, _k(x))), fn(NP, x), rtol=1e-5, atol=1e-6, err_msg=name
        )
    np.testing.assert_allclose(
        to_numpy(KO.solve_lower(_k(lower), _k(rhs))), np.linalg.solve(lower, rhs), rtol=1e-5
    )


def test_dtypes_and_numbers() -> None:
    assert KO.eps("bfloat16") == 2.0**-7 and KO.eps("float32") == float(np.finfo(np.float32).eps)
    assert KO.tiny("float16") == float(np.finfo(np.float16).tiny)
    x32 = _k(np.ones(3, np.float32))
    assert KO.dtype(KO.maximum(x32, 0.9)) == "float32"  # a number does not promote
    assert KO.dtype(KO.astype(0.9, "float64")) == "float64"
    assert KO.maximum(0.5, 2) == 2 and KO.minimum(0.5, 2) == 0.5


@pytest.mark.parametrize("geometry", ["EQ", "Q0.5EQ1.5"])
def test_kron_step_matches_numpy(geometry: str) -> None:
    """Three fitting steps on a padded, blocked parameter give NumPy's results."""
    rng = np.random.default_rng(1)
    layout = LayoutOptions(block_size=4, max_skew=float("inf"))
    options = StepOptions(layout=layout, fit=FitOptions(geometry=geometry), cache=True)
    plan = make_plan((7, 3), layout)
    like = np.zeros((), np.float32)
    state = TensorState(
        tuple(init_factors(plan, 1.0, like, NP)),
        tuple(init_lipschitz(plan, like, NP)),
        np.zeros((1, 7, 3), np.float32),
    )
    k_state = TensorState(
        tuple(map(_k, state.factors)), tuple(map(_k, state.lipschitz)), _k(state.momentum)
    )
    mask = plan.mask().astype(np.float32)
    for count in range(3):
        g = rng.standard_normal((1, 7, 3)).astype(np.float32)
        noise = rng.standard_normal((plan.num_blocks, *plan.block_shape)).astype(np.float32)
        common = dict(plan=plan, options=options, precond_lr=0.1, do_fit=True)
        y, state = kron_step(state, g, float(count), noise, ops=NP, mask=mask, **common)
        k_y, k_state = kron_step(
            k_state, _k(g), float(count), _k(noise), ops=KO, mask=_k(mask), **common
        )
    np.testing.assert_allclose(to_numpy(k_y), y, rtol=1e-5, atol=1e-6)
    for a, b in zip(k_state.factors + k_state.cache, state.factors + state.cache):
        np.testing.assert_allclose(to_numpy(a), b, rtol=1e-5, atol=1e-6)
