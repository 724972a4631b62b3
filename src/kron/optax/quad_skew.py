"""eformer's "white kron" contract: ``quad``, ``skew``, ``scale_by_quad``, ``scale_by_skew`` and
``get_opt_state_partition_specs``.

Both fit the preconditioner on every step on the bias-corrected momentum, with merged 2-D views
tiled into ``block_size`` blocks (padding masked out of every statistic), a precond learning rate
that anneals as ``max(μ·(1 + t/10⁴)^(-½), min(μ, 0.4))``, Lipschitz β = 0.95, factor balancing
every 100 steps, absolute damping ``noise_scale`` and an output RMS cap of 1.1 (then ÷5 with
``lr_style="adam"``). ``quad`` uses the QUAD geometry, ``skew`` Q0.5EQ1.5 (the Procrustes-kept
SPD factor). Q and the momentum are stored in ``dtype``, and the fit and the product run in it;
the gradient, the momentum's average and the Lipschitz estimates use at least float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from kron.core import FitOptions, LayoutOptions, StepOptions
from kron.core.option_types import check_option_types
from kron.optax.engine import build
from kron.optax.options import (
    INJECTED_HINT,
    EngineConfig,
    check_chain_options,
    decays_weights,
    float_dtype,
    require_option,
)
from kron.optax.sharding import chain_state_specs, param_specs

LR_STYLES = ("adam", None)
# The dtypes of Q, the momentum and the arithmetic (docs/optax.md); not float16, which
# scale_by_kron's precond_dtype takes.
WHITE_KRON_DTYPES = ("bfloat16", "float32", "float64")
# ÷5 brings the RMS-1.1-capped update to Adam's typical update RMS (about 0.2).
ADAM_STYLE_SCALE = 0.2
PRECOND_LR_FLOOR = 0.4
PRECOND_LR_DECAY_STEPS = 10_000  # μ·(1 + t/this)^(-½): μ/√2 at t = this, μ/2 at 3× this
BALANCE_EVERY = 100
BETA_LIPSCHITZ = 0.95
MAX_UPDATE_RMS = 1.1


def annealed_precond_lr(initial: float) -> Callable[[jax.Array], jax.Array]:
    """``μ_t = max(μ·(1 + t/10⁴)^(-½), min(μ, 0.4))`` for step count ``t``."""

    def schedule(count: jax.Array) -> jax.Array:
        # Computed when called (inside the update), so building the optimizer makes no arrays;
        # initial may be traced (inject_hyperparams).
        floor = jnp.minimum(initial, PRECOND_LR_FLOOR)
        t = jnp.asarray(count, jnp.float32)
        return jnp.maximum(initial * jax.lax.rsqrt(1.0 + t / PRECOND_LR_DECAY_STEPS), floor)

    return schedule


def white_kron_layout(max_size_dense: int, block_size: int) -> LayoutOptions:
    """eformer's layout: leaves merged to their squarest 2-D view and tiled into
    ``block_size`` blocks; an axis longer than ``max_size_dense`` gets a diagonal factor, and a
    leaf with one axis after dropping size-1 axes (eformer's 1-D path: its size equals its
    longest axis) one diagonal factor over the whole axis, not tiled."""
    return LayoutOptions(
        max_size=max_size_dense,
        max_skew=math.inf,
        merge_dims=True,
        block_size=block_size,
        whole_vectors=True,
    )


def _scale_by_white_kron(
    geometry: str,
    lr_style: str | None,
    b1: float,
    normalize_grads: bool,
    max_size_dense: int,
    preconditioner_lr: float,
    preconditioner_init_scale: float | None,
    dtype: Any,
    scanned_layers: Any,
    block_size: int,
    pipeline_axis_name: str | None,
    pipeline_axis_size: int,
    params_partition_specs: Any,
    noise_scale: float,
) -> optax.GradientTransformationExtraArgs:
    if lr_style not in LR_STYLES:
        raise ValueError(f"Unknown lr_style {lr_style!r}; accepted: 'adam', None.")
    # The core's records check these too, under their own names; these name eformer's.
    require_option("b1", b1, lambda v: 0 <= v < 1, "in [0, 1)")
    require_option("max_size_dense", max_size_dense, lambda v: v >= 0, ">= 0")
    if isinstance(block_size, jax.Array):
        raise ValueError(f"block_size must be an int; got {block_size!r}.{INJECTED_HINT}")
    require_option("block_size", block_size, lambda v: v >= 1, ">= 1")
    # Checked here for finiteness too: the core would name inf as its own "damping".
    require_option("noise_scale", noise_scale, lambda v: 0 <= v < math.inf, "finite and >= 0")
    require_option(
        "preconditioner_lr", preconditioner_lr, lambda v: 0 < v < math.inf, "finite and > 0"
    )
    # A string would be read as its truth value ("no" switching normalisation on).
    check_option_types(
        numbers={},
        optional_numbers={},
        flags=dict(normalize_grads=normalize_grads),
        optional_flags={},
    )
    dtype = float_dtype("dtype", dtype, WHITE_KRON_DTYPES)
    step = StepOptions(
        layout=white_kron_layout(max_size_dense, block_size),
        fit=FitOptions(
            geometry=geometry,
            beta_lipschitz=BETA_LIPSCHITZ,
            damping=noise_scale,
            damping_rule="absolute",
            norm_bound="power",
        ),
        beta=b1,
        momentum_rule="debiased_ema",
        whiten_momentum=True,
        clip_rms=MAX_UPDATE_RMS,
        clip_max=None,
    )
    config = EngineConfig(
        step=step,
        precond_lr=annealed_precond_lr(preconditioner_lr),
        update_probability=1.0,
        balance_every=BALANCE_EVERY,
        q_dtype=dtype,
        mu_dtype=dtype,
        init_scale=preconditioner_init_scale,
        scanned_layers=scanned_layers,
        normalize_grads=normalize_grads,
        output_scale=ADAM_STYLE_SCALE if lr_style == "adam" else 1.0,
        block_axis_name=pipeline_axis_name,
        block_axis_size=pipeline_axis_size,
        params_partition_specs=params_partition_specs,
    )
    return build(config)


def scale_by_quad(
    lr_style: str | None = "adam",
    b1: float = 0.95,
    normalize_grads: bool = False,
    max_size_dense: int = 16384,
    preconditioner_lr: float = 0.7,
    preconditioner_init_scale: float | None = 1.0,
    dtype: Any = jnp.bfloat16,
    scanned_layers: Any = None,
    block_size: int = 256,
    pipeline_axis_name: str | None = None,
    pipeline_axis_size: int = 1,
    params_partition_specs: Any = None,
    noise_scale: float = 1e-9,
) -> optax.GradientTransformationExtraArgs:
    """PSGD-Kron with the QUAD geometry, fitted every step (eformer's ``scale_by_quad``).

    Args:
      lr_style: ``"adam"`` (default) divides the RMS-capped update by 5; None leaves it.
      b1: momentum β (bias-corrected EMA). Default 0.95.
      normalize_grads: divide each layer's gradient by its L2 norm first. Default False.
      max_size_dense: an axis longer than this gets a diagonal factor. Default 16384.
      preconditioner_lr: μ at step 0, annealed as in the module docstring. Default 0.7.
      preconditioner_init_scale: initial ``Q = scale·I`` (None: from the first gradients).
        Default 1.0.
      dtype: dtype of Q and of the stored momentum, and of the fit's and the product's
        arithmetic (the gradient and the momentum's average use at least float32). Default
        bfloat16.
      scanned_layers: bool pytree like the params (or a function of them); True marks a leaf
        whose leading axis stacks layers. Default None.
      block_size: tile size of the merged 2-D view; padding is masked. Default 256.
      pipeline_axis_name, pipeline_axis_size: the mesh axis the block stacks are split over,
        and its size. With a name, the state keeps one stack of blocks per layout (as eformer
        does), padded with inert identity blocks to a multiple of ``pipeline_axis_size``; while
        a mesh with that axis is active each device stores, fits and applies only its blocks.
        Defaults None, 1.
      params_partition_specs: pytree of ``PartitionSpec`` for the params; the momentum and the
        updates follow it. Default None.
      noise_scale: absolute damping δ (``x + δ·ξ``); 0 fits on the momentum itself. Default 1e-9.
    """
    return _scale_by_white_kron("QUAD", **locals())


def scale_by_skew(
    lr_style: str | None = "adam",
    b1: float = 0.95,
    normalize_grads: bool = False,
    max_size_dense: int = 16384,
    preconditioner_lr: float = 0.7,
    preconditioner_init_scale: float | None = 1.0,
    dtype: Any = jnp.bfloat16,
    scanned_layers: Any = None,
    block_size: int = 256,
    pipeline_axis_name: str | None = None,
    pipeline_axis_size: int = 1,
    params_partition_specs: Any = None,
    noise_scale: float = 1e-9,
) -> optax.GradientTransformationExtraArgs:
    """PSGD-Kron with the Q0.5EQ1.5 ("skew") geometry: the factor step is followed by an online
    Procrustes rotation that keeps Q symmetric positive definite (eformer's ``scale_by_skew``).
    Arguments as :func:`scale_by_quad`."""
    return _scale_by_white_kron("Q0.5EQ1.5", **locals())


def _full_optimizer(
    scale_by: Callable[..., optax.GradientTransformation], options: dict[str, Any]
) -> optax.GradientTransformationExtraArgs:
    learning_rate = options.pop("learning_rate")
    weight_decay = options.pop("weight_decay")
    weight_decay_mask = options.pop("weight_decay_mask")
    check_chain_options(learning_rate, weight_decay)
    parts = [scale_by(**options)]
    if decays_weights(weight_decay):
        parts.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


def quad(
    learning_rate: float | optax.Schedule = 0.001,
    lr_style: str | None = "adam",
    b1: float = 0.95,
    weight_decay: float = 0.1,
    weight_decay_mask: Any = None,
    normalize_grads: bool = False,
    max_size_dense: int = 16384,
    preconditioner_lr: float = 0.7,
    preconditioner_init_scale: float | None = 1.0,
    dtype: Any = jnp.bfloat16,
    scanned_layers: Any = None,
    block_size: int = 256,
    pipeline_axis_name: str | None = None,
    pipeline_axis_size: int = 1,
    params_partition_specs: Any = None,
    noise_scale: float = 1e-9,
) -> optax.GradientTransformationExtraArgs:
    """``chain(scale_by_quad(...), add_decayed_weights(weight_decay, weight_decay_mask) unless
    weight_decay is 0, scale_by_learning_rate(learning_rate))``. ``learning_rate`` is a float or
    an optax schedule; the other options are :func:`scale_by_quad`'s."""
    return _full_optimizer(scale_by_quad, dict(locals()))


def skew(
    learning_rate: float | optax.Schedule = 0.001,
    lr_style: str | None = "adam",
    b1: float = 0.95,
    weight_decay: float = 0.1,
    weight_decay_mask: Any = None,
    normalize_grads: bool = False,
    max_size_dense: int = 16384,
    preconditioner_lr: float = 0.7,
    preconditioner_init_scale: float | None = 1.0,
    dtype: Any = jnp.bfloat16,
    scanned_layers: Any = None,
    block_size: int = 256,
    pipeline_axis_name: str | None = None,
    pipeline_axis_size: int = 1,
    params_partition_specs: Any = None,
    noise_scale: float = 1e-9,
) -> optax.GradientTransformationExtraArgs:
    """As :func:`quad` with :func:`scale_by_skew`."""
    return _full_optimizer(scale_by_skew, dict(locals()))


def get_opt_state_partition_specs(params: Any, **quad_kwargs: Any) -> Any:
    """The ``PartitionSpec`` tree of ``quad(**quad_kwargs).init(params)``'s state.

    The tree is built from the real state (through ``jax.eval_shape``), so it matches it for
    every ``weight_decay``, including the default 0.1 (eformer's helper assumes 0 unless told).
    Block stacks (padded to a multiple of ``pipeline_axis_size``) are split over
    ``pipeline_axis_name``; the momentum takes ``params_partition_specs`` (or the params' own
    shardings); everything else is replicated. ``skew`` has the same state layout.
    ``weight_decay=None`` means no decay, as in eformer's helper.
    """
    if "weight_decay" in quad_kwargs and quad_kwargs["weight_decay"] is None:
        quad_kwargs["weight_decay"] = 0.0
    state = jax.eval_shape(quad(**quad_kwargs).init, params)
    return chain_state_specs(
        state,
        quad_kwargs.get("pipeline_axis_name"),
        quad_kwargs.get("pipeline_axis_size", 1),
        param_specs(params, quad_kwargs.get("params_partition_specs")),
    )


__all__ = [
    "annealed_precond_lr",
    "get_opt_state_partition_specs",
    "quad",
    "scale_by_quad",
    "scale_by_skew",
    "skew",
    "white_kron_layout",
]
