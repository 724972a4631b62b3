"""``scale_by_kron``: PSGD-Kron as an optax ``GradientTransformation`` (psgdax's contract).

The arithmetic is :mod:`kron.core`'s; :mod:`kron.optax.engine` stacks the leaves and
:mod:`kron.optax.fitting` draws the randomness and decides when to fit. This module only maps
psgdax's options onto them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from kron.core import (
    FitOptions,
    LayoutOptions,
    StepOptions,
    canonical_geometry,
    exponential_schedule,
    get_ops,
)
from kron.core.option_types import check_option_types
from kron.optax.engine import build
from kron.optax.options import EngineConfig, float_dtype, require_option


def scale_by_kron(
    b1: float = 0.9,
    preconditioner_update_probability: float | Callable[[jax.Array], jax.Array] | None = None,
    max_size_triangular: int = 8192,
    max_skew_triangular: float = 1.0,
    min_ndim_triangular: int = 2,
    memory_save_mode: str | None = None,
    whiten_grad: bool = True,
    preconditioner_lr: float = 0.1,
    preconditioner_init_scale: float | None = 1.0,
    mu_dtype: Any = None,
    precond_dtype: Any = None,
    precond_update_precision: str | None = "tensorfloat32",
    precond_grads_precision: str | None = None,
    scanned_layers: Any = None,
    lax_map_scanned_layers: bool = False,
    lax_map_batch_size: int = 8,
    preconditioner_mode: str = "Q0.5EQ1.5",
    beta_lipschitz: float = 0.9,
    track_lipschitz: bool = True,
    damping: float = 1e-9,
    grad_clip_max_amp: float | None = 1.0,
    seed: int = 42,
    norm_bound: str = "subspace",
    balance_probability: float = 0.01,
    decision_rule: str = "bernoulli",
    preconditioner_type: str = "whitening",
    cached: bool | None = None,
    pipeline_axis_name: str | None = None,
    pipeline_axis_size: int = 1,
    params_partition_specs: Any = None,
    key: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """PSGD-Kron preconditioning of the updates (psgdax's ``scale_by_kron`` contract).

    Args:
      b1: momentum β; the momentum is a running mean for the first steps
        (``β_t = min(t/(t+1), b1)``), then an EMA. Default 0.9.
      preconditioner_lr: μ. Default 0.1.
      preconditioner_init_scale: initial ``Q = scale·I``; ``None`` sets one scale for all leaves
        from the first gradients, ``(max mean g⁴ + δ⁴)^(-1/8)``. Default 1.0.
      preconditioner_mode: ``"Q0.5EQ1.5"`` (default, alias ``"Q0p5EQ1p5"``), ``"EQ"``,
        ``"QUAD"``, ``"QEQ"``, ``"QEP"``, ``"PRO4P"`` or ``"QUAD4P"``; anything else raises.
      whiten_grad: fit P on the gradient (True, default) or on the momentum (needs ``b1 > 0``).
      preconditioner_update_probability: float, optax schedule of the step, or ``None`` for 1.0
        for 500 steps then ``exp(-0.001·(t-500))`` down to 0.03.
      max_size_triangular, max_skew_triangular, min_ndim_triangular, memory_save_mode: which
        axes get dense factors (``kron.core.LayoutOptions``). Defaults 8192, 1.0, 2, None.
      mu_dtype, precond_dtype: momentum and preconditioner dtypes (None: param dtype, float32).
      precond_update_precision, precond_grads_precision: ``jax.default_matmul_precision`` while
        fitting and while applying P. Defaults ``"tensorfloat32"`` and None.
      grad_clip_max_amp: per-leaf RMS cap of the output, None for none. Default 1.0.
      beta_lipschitz, damping, norm_bound: ``kron.core.FitOptions``. Defaults 0.9, 1e-9,
        ``"subspace"``.
      track_lipschitz: False normalises each fit by the current norm bound alone, as psgdax's
        flag does; the same as ``beta_lipschitz=0``. Default True.
      balance_probability: chance per fit of rebalancing factor norms. Default 0.01.
      decision_rule: ``"bernoulli"`` (default, psgdax) or ``"counter"`` (psgd_jax).
      scanned_layers: a bool pytree like the params (or a function of the params returning one);
        True marks a leaf whose leading axis stacks layers, each with its own factors and
        statistics. Default None (no scanned leaves).
      lax_map_scanned_layers, lax_map_batch_size: walk scanned stacks with ``lax.map``,
        ``lax_map_batch_size`` layers at a time (less memory, same numbers). Defaults False, 8.
      preconditioner_type: ``"whitening"`` (default) or ``"newton"``: fit P on Hessian-vector
        products, which needs ``update(grads, state, params, value_fn=loss_of_params)``; the
        update probability is then the Hessian interval.
      cached: keep ``P_i = Q_iᵀQ_i`` in the state so that steps without a fit apply P with one
        product per axis instead of two (more memory, fewer flops). None (default) caches when
        the update probability is a schedule or below 0.5.
      seed: seed of the PRNG key in the state, or the key itself. Default 42.
      pipeline_axis_name, pipeline_axis_size: the mesh axis (eformer's names; any axis, typically
        the data-parallel one) that the factor stacks are split over, and its size. With a name,
        the state keeps one stack of factors per layout (``state.factors`` is a tuple of stacks,
        not a tree like the params), padded with inert identity rows to a multiple of
        ``pipeline_axis_size``; while a mesh with that axis is active (``jax.set_mesh``), each
        device stores, fits and applies only its rows. Defaults None, 1 (per-leaf state).
      params_partition_specs: ``PartitionSpec`` tree of the params; while a mesh is active the
        momentum and the updates are pinned to it. Default None (left to the compiler).
      key: psgdax's name for the state's key (``psgdax.kron(..., key=PRNGKey(0))``): given,
        it is used instead of ``seed``, which must then be left at its default. Default None.
    """
    if key is not None:
        if seed != 42:
            raise ValueError(
                f"seed and key (psgdax's name) both set the state's key; give one (got "
                f"seed={seed!r}, key={key!r})."
            )
        seed = key
    # A string or None would be taken as its truth value ("no" switching an option on).
    check_option_types(
        numbers={},
        optional_numbers={},
        flags=dict(
            whiten_grad=whiten_grad,
            lax_map_scanned_layers=lax_map_scanned_layers,
            track_lipschitz=track_lipschitz,
        ),
        optional_flags=dict(cached=cached),
    )
    for name, precision in (
        ("precond_update_precision", precond_update_precision),
        ("precond_grads_precision", precond_grads_precision),
    ):
        _check_precision(name, precision)
    # The core's records check these too, under their own names and with comparisons that a
    # string, None, a bool or an array of several values fails or passes by accident; these
    # name psgdax's options first.
    # psgdax's running mean, min(t/(t+1), b1): b1 = 1 averages every gradient.
    require_option("b1", b1, lambda v: 0 <= v <= 1, "in [0, 1]")
    if not whiten_grad and b1 <= 0:
        raise ValueError(f"whiten_grad=False whitens the momentum and needs b1 > 0; got {b1!r}.")
    require_option("max_size_triangular", max_size_triangular, lambda v: v >= 0, ">= 0")
    require_option("max_skew_triangular", max_skew_triangular, lambda v: v >= 0, ">= 0")
    require_option(
        "min_ndim_triangular",
        min_ndim_triangular,
        lambda v: v >= 0 and float(v).is_integer(),
        "a whole number >= 0",
    )
    require_option("beta_lipschitz", beta_lipschitz, lambda v: 0 <= v < 1, "in [0, 1)")
    require_option("damping", damping, lambda v: 0 <= v < math.inf, "finite and >= 0")
    if grad_clip_max_amp is not None:
        require_option("grad_clip_max_amp", grad_clip_max_amp, lambda v: v > 0, "> 0 or None")
    preconditioner_mode = canonical_geometry(preconditioner_mode)
    layout = LayoutOptions(
        max_size=max_size_triangular,
        max_skew=max_skew_triangular,
        min_ndim_dense=min_ndim_triangular,
        memory_save_mode=memory_save_mode,
    )
    step = StepOptions(
        layout=layout,
        fit=FitOptions(
            geometry=preconditioner_mode,
            beta_lipschitz=beta_lipschitz if track_lipschitz else 0.0,
            damping=damping,
            norm_bound=norm_bound,
        ),
        beta=b1,
        momentum_rule="running_mean",
        whiten_momentum=not whiten_grad,
        clip_rms=grad_clip_max_amp,
        clip_max=None,
    )
    if preconditioner_update_probability is None:
        preconditioner_update_probability = exponential_schedule(ops=get_ops("jax"))
    require_option(
        "preconditioner_update_probability",
        preconditioner_update_probability,
        lambda v: v >= 0,
        ">= 0 (>= 1: every step), a schedule or None",
        schedule=True,
    )
    # None is psgdax's float32; False (or another non-dtype) is refused, not read as None.
    q_dtype = float_dtype("precond_dtype", precond_dtype, optional=True)
    if cached is None:
        cached = (
            callable(preconditioner_update_probability) or preconditioner_update_probability < 0.5
        )
    config = EngineConfig(
        step=step,
        precond_lr=preconditioner_lr,
        update_probability=preconditioner_update_probability,
        decision_rule=decision_rule,
        balance_probability=balance_probability,
        q_dtype=jnp.float32 if q_dtype is None else q_dtype,
        mu_dtype=mu_dtype,
        init_scale=preconditioner_init_scale,
        fit_precision=precond_update_precision,
        apply_precision=precond_grads_precision,
        scanned_layers=scanned_layers,
        lax_map_scanned_layers=lax_map_scanned_layers,
        lax_map_batch_size=lax_map_batch_size,
        preconditioner_type=preconditioner_type,
        cache=cached,
        block_axis_name=pipeline_axis_name,
        block_axis_size=pipeline_axis_size,
        params_partition_specs=params_partition_specs,
        seed=seed,
    )
    return build(config)


def _check_precision(name: str, precision: Any) -> None:
    """``ValueError`` naming option ``name`` now, for a value ``jax.default_matmul_precision``
    would refuse only inside the first update."""
    if precision is None:
        return
    try:
        with jax.default_matmul_precision(precision):
            pass
    except (ValueError, TypeError) as error:
        raise ValueError(f"{name}: {error}") from None


__all__ = ["scale_by_kron"]
