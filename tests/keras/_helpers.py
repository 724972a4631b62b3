"""A NumPy reference of ``kron.keras.Kron`` written directly on :mod:`kron.core`, fed the very
random draws the optimizer makes (:mod:`kron.keras.native`), plus small conversions."""

from __future__ import annotations

import keras
import numpy as np

from kron.core import (
    TensorState,
    balance,
    counter_decision,
    fourth_moment,
    get_ops,
    init_factors,
    init_lipschitz,
    kron_step,
    make_plan,
    scale_from_moments,
)
from kron.keras import native

NP = get_ops("numpy")


def to_numpy(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


def draw_normal(
    seed: int, step: int, index: int, stream: int, shape: tuple, dtype: str = "float32"
) -> np.ndarray:
    return to_numpy(native.normal(seed, step, index, stream, shape, dtype))


def draw_uniform(seed: int, step: int, index: int, stream: int) -> float:
    return float(to_numpy(native.uniform(seed, step, index, stream)))


def reference_trajectory(
    params: list[np.ndarray],
    grads: list[list[np.ndarray]],
    *,
    options,
    learning_rate: float,
    weight_decay: float,
    probability: float,
    precond_lr: float,
    precond_init_scale: float | None,
    balance_probability: float,
    seed: int,
    dtype: str = "float32",
) -> list[np.ndarray]:
    """Parameters after ``len(grads)`` steps of the front end's loop (counter rule), everything
    in ``dtype``."""
    real = np.dtype(dtype).type
    params = [p.astype(real) for p in params]
    plans = [make_plan(p.shape, options.layout) for p in params]
    like = np.zeros((), real)
    states, counts = [], [0.0] * len(params)
    for plan, p in zip(plans, params):
        factors = init_factors(plan, precond_init_scale or 1.0, like, NP, options.fit.state_is_p)
        states.append(
            TensorState(
                tuple(factors),
                tuple(init_lipschitz(plan, like, NP)),
                np.zeros((1, *p.shape), real),
            )
        )
    counter = np.float32(0.0)
    for step, step_grads in enumerate(grads):
        fit, counter = counter_decision(counter, probability, NP)
        for index, (plan, g) in enumerate(zip(plans, step_grads)):
            g = g.astype(real)[None]
            state = states[index]
            if precond_init_scale is None and counts[index] == 0:
                scale = scale_from_moments(fourth_moment(g, NP), NP)
                state = state._replace(
                    factors=tuple(f * real(scale ** (1.0 / plan.order)) for f in state.factors)
                )
            noise = None
            if fit:
                shape = (plan.num_blocks, *plan.block_shape)
                noise = draw_normal(seed, step, index, native.NOISE, shape, dtype)
            mask = plan.mask()
            y, state = kron_step(
                state,
                g,
                np.float32(counts[index]),  # the front end's count is float32 in any dtype
                noise,
                plan=plan,
                options=options,
                precond_lr=precond_lr,
                do_fit=bool(fit),
                ops=NP,
                mask=None if mask is None else mask.astype(real),
            )
            if fit and balance_probability > 0 and plan.order > 1:
                if draw_uniform(seed, step, index, native.BALANCE) < balance_probability:
                    state = state._replace(factors=tuple(balance(state.factors, NP)))
            states[index] = state
            counts[index] += 1
            p = params[index]
            params[index] = p - real(learning_rate) * (y[0] + real(weight_decay) * p)
    return params
