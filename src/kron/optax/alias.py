"""``kron``: the whole optimizer, composed from :func:`scale_by_kron` like optax's aliases."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import optax

from kron.optax.options import check_chain_options, decays_weights
from kron.optax.sharding import chain_state_specs, param_specs
from kron.optax.transform import scale_by_kron

# Options of kron that scale_by_kron does not take.
CHAIN_ONLY = ("learning_rate", "weight_decay", "weight_decay_mask")
# Options that may be traced values (optax.inject_hyperparams); the rest shape the computation.
# An injected weight_decay always brings add_decayed_weights into the chain (decays_weights), so
# it may be scheduled as optax.adamw's is.
INJECTABLE = ("learning_rate", "preconditioner_lr", "weight_decay")


def static_args(factory: Callable[..., Any]) -> tuple[str, ...]:
    """The ``static_args`` of ``optax.inject_hyperparams(factory, static_args=...)`` for
    :func:`kron`, :func:`~kron.optax.quad` or :func:`~kron.optax.skew`: every option except
    the learning rate, the preconditioner learning rate and the weight decay."""
    return tuple(name for name in inspect.signature(factory).parameters if name not in INJECTABLE)


def kron(
    learning_rate: float | optax.Schedule = 1e-3,
    b1: float = 0.9,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    preconditioner_update_probability: float | Callable[[jax.Array], jax.Array] | None = None,
    max_size_triangular: int = 8192,
    max_skew_triangular: float = 1.0,
    min_ndim_triangular: int = 2,
    memory_save_mode: str | None = None,
    whiten_grad: bool = True,
    preconditioner_lr: float = 0.1,
    preconditioner_init_scale: float | None = None,
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
    """PSGD-Kron: ``chain(scale_by_kron, add_decayed_weights, scale_by_learning_rate)``.

    The parameters are spelled out (rather than ``**kwargs``) so that ``optax.inject_hyperparams``
    can bind them.

    Args:
      learning_rate: a float or an optax schedule. Default 1e-3, psgdax's; 3e-3 did better on
        the ``kron bench`` tasks and is the PyTorch front end's default (docs/benchmarks.md).
      b1: momentum β. Default 0.9.
      weight_decay: decoupled weight decay, added to the preconditioned update before the
        learning rate (optax's ``add_decayed_weights``); 0 (default) leaves it out.
      weight_decay_mask: a pytree of booleans, or a callable returning one, selecting the leaves
        that decay.
      preconditioner_init_scale: ``None`` (default) sets the initial scale from the first
        gradients; a float fixes it.
      others: as :func:`scale_by_kron`, with the same defaults; ``pipeline_axis_name``,
        ``pipeline_axis_size`` and ``params_partition_specs`` shard the state over a mesh axis
        (:func:`kron_partition_specs` gives its specs).
    """
    options = dict(locals())
    learning_rate = options.pop("learning_rate")
    weight_decay = options.pop("weight_decay")
    weight_decay_mask = options.pop("weight_decay_mask")
    check_chain_options(learning_rate, weight_decay)
    parts = [scale_by_kron(**options)]
    if decays_weights(weight_decay):
        parts.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


def kron_partition_specs(params: Any, scale_by_kron_only: bool = False, **kron_kwargs: Any) -> Any:
    """The ``PartitionSpec`` tree of ``kron(**kron_kwargs).init(params)``'s state, or of
    ``scale_by_kron(**kron_kwargs)``'s with ``scale_by_kron_only=True`` (distributed_kron's flag;
    the chain-only options are then ignored).

    The tree is built from the real state through ``jax.eval_shape``, so it matches it for every
    ``weight_decay`` and learning-rate schedule (nothing is computed). Factor stacks, Lipschitz
    estimates and caches are split over ``pipeline_axis_name`` (``P(axis, None, ...)``; they are
    padded to a multiple of ``pipeline_axis_size``); the momentum takes ``params_partition_specs``
    (or each param's own ``.sharding.spec``); everything else is replicated (``P()``).

    Args:
      params: the params, or ``jax.ShapeDtypeStruct``s like them.
      scale_by_kron_only: specs of ``scale_by_kron``'s state alone. Default False.
      kron_kwargs: the options given to :func:`kron` (or :func:`scale_by_kron`).
    """
    if scale_by_kron_only:
        options = {k: v for k, v in kron_kwargs.items() if k not in CHAIN_ONLY}
        tx = scale_by_kron(**options)
    else:
        tx = kron(**kron_kwargs)
    state = jax.eval_shape(tx.init, params)
    return chain_state_specs(
        state,
        kron_kwargs.get("pipeline_axis_name"),
        kron_kwargs.get("pipeline_axis_size", 1),
        param_specs(params, kron_kwargs.get("params_partition_specs")),
    )
