"""``kron``: the whole optimizer, composed from :func:`scale_by_kron` like optax's aliases."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import optax

from kron.optax.transform import scale_by_kron

# Options that may be traced values (optax.inject_hyperparams); the rest shape the computation.
# weight_decay is static: whether it is 0 decides the chain's structure (and so the state's).
INJECTABLE = ("learning_rate", "preconditioner_lr")


def static_args(factory: Callable[..., Any]) -> tuple[str, ...]:
    """The ``static_args`` of ``optax.inject_hyperparams(factory, static_args=...)`` for
    :func:`kron`, :func:`~kron.optax.quad` or :func:`~kron.optax.skew`: every option except
    the learning rate and the preconditioner learning rate."""
    return tuple(name for name in inspect.signature(factory).parameters if name not in INJECTABLE)


def kron(
    learning_rate: float | optax.Schedule = 1e-3,
    b1: float = 0.9,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    preconditioner_init_scale: float | None = None,
    preconditioner_lr: float = 0.1,
    preconditioner_mode: str = "Q0.5EQ1.5",
    whiten_grad: bool = True,
    preconditioner_update_probability: float | Callable[[jax.Array], jax.Array] | None = None,
    max_size_triangular: int = 8192,
    max_skew_triangular: float = 1.0,
    min_ndim_triangular: int = 2,
    memory_save_mode: str | None = None,
    mu_dtype: Any = None,
    precond_dtype: Any = None,
    precond_update_precision: str | None = "tensorfloat32",
    precond_grads_precision: str | None = None,
    grad_clip_max_amp: float | None = 1.0,
    beta_lipschitz: float = 0.9,
    damping: float = 1e-9,
    norm_bound: str = "subspace",
    balance_probability: float = 0.01,
    decision_rule: str = "bernoulli",
    scanned_layers: Any = None,
    lax_map_scanned_layers: bool = False,
    lax_map_batch_size: int = 8,
    preconditioner_type: str = "whitening",
    cached: bool | None = None,
    seed: int = 42,
) -> optax.GradientTransformationExtraArgs:
    """PSGD-Kron: ``chain(scale_by_kron, add_decayed_weights, scale_by_learning_rate)``.

    The parameters are spelled out (rather than ``**kwargs``) so that ``optax.inject_hyperparams``
    can bind them.

    Args:
      learning_rate: a float or an optax schedule. Default 1e-3.
      b1: momentum β. Default 0.9.
      weight_decay: decoupled weight decay, added to the preconditioned update before the
        learning rate (optax's ``add_decayed_weights``); 0 (default) leaves it out.
      weight_decay_mask: a pytree of booleans, or a callable returning one, selecting the leaves
        that decay.
      preconditioner_init_scale: ``None`` (default) sets the initial scale from the first
        gradients; a float fixes it.
      others: as :func:`scale_by_kron`, with the same defaults.
    """
    options = dict(locals())
    learning_rate = options.pop("learning_rate")
    weight_decay = options.pop("weight_decay")
    weight_decay_mask = options.pop("weight_decay_mask")
    parts = [scale_by_kron(**options)]
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)
