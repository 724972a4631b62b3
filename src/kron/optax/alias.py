"""``kron``: the whole optimizer, composed from :func:`scale_by_kron` like optax's aliases."""

from __future__ import annotations

from typing import Any

import optax

from kron.optax.transform import scale_by_kron


def kron(
    learning_rate: float | optax.Schedule = 1e-3,
    b1: float = 0.9,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    preconditioner_init_scale: float | None = None,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    """PSGD-Kron: ``chain(scale_by_kron, add_decayed_weights, scale_by_learning_rate)``.

    Args:
      learning_rate: a float or an optax schedule. Default 1e-3.
      b1: momentum β. Default 0.9.
      weight_decay: decoupled weight decay, added to the preconditioned update before the
        learning rate (optax's ``add_decayed_weights``); 0 (default) leaves it out.
      weight_decay_mask: a pytree of booleans, or a callable returning one, selecting the leaves
        that decay.
      preconditioner_init_scale: ``None`` (default) sets the initial scale from the first
        gradients; a float fixes it.
      **kwargs: every other option of :func:`scale_by_kron`.
    """
    parts = [scale_by_kron(b1=b1, preconditioner_init_scale=preconditioner_init_scale, **kwargs)]
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)
