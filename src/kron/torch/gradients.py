"""The gradients a :class:`kron.torch.Kron` step takes: the checks made before anything is
updated (no sparse gradient; with ``nonfinite="raise"``, no unusable one), and each bucket's
stack of gradients with non-finite rows zeroed and the group's ``gradient_clipping`` applied.

A gradient is unusable when it has a NaN or Inf, or, for a group whose factors are float16,
an entry past 65520 (its products with the factors would overflow). On accelerators the step
never reads which gradients those are on the host (that would wait for the device): it keeps
the flags on the device and selects with them.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kron.core import finite_rows, overflow_limit
from kron.torch.functional import OPS, clipper, stack
from kron.torch.options import torch_dtype
from kron.torch.state import DEFAULT_PRECOND_DTYPE

_PAST_FLOAT16 = ", or past float16's range (the factors' dtype)"


def _gradient_limit(group: dict[str, Any]) -> float:
    """``finite_rows``'s limit for the group's factor dtype (65520 for float16, else inf)."""
    return overflow_limit(
        torch_dtype(group["precond_dtype"], "precond_dtype") or DEFAULT_PRECOND_DTYPE
    )


def usable_gradient(grad: torch.Tensor, group: dict[str, Any]) -> bool:
    """Whether ``grad`` is finite, and within float16's range when the group's factors are
    float16 (their products would overflow): the test ``nonfinite="raise"`` applies."""
    if grad.numel() == 0:  # an empty parameter, or a rank's empty shard of one
        return True
    return bool(finite_rows(grad.reshape(1, -1), OPS, _gradient_limit(group))[0])


def check_dense_gradients(param_groups: list[dict[str, Any]]) -> None:
    """``ValueError`` naming the first parameter of ``param_groups`` with a sparse gradient."""
    for gi, group in enumerate(param_groups):
        for index, p in enumerate(group["params"]):
            if p.grad is not None and p.grad.is_sparse:
                raise ValueError(
                    f"Kron does not support sparse gradients (parameter {index} of group "
                    f"{gi}, shape {tuple(p.shape)}); use a dense gradient."
                )


def raise_on_nonfinite(param_groups: list[dict[str, Any]]) -> None:
    """``FloatingPointError`` naming the first parameter of ``param_groups`` whose gradient is
    not usable (see :func:`usable_gradient`); reads every gradient on the host."""
    for gi, group in enumerate(param_groups):
        for index, p in enumerate(group["params"]):
            if p.grad is not None and not usable_gradient(p.grad, group):
                past = "" if _gradient_limit(group) == math.inf else _PAST_FLOAT16
                raise FloatingPointError(
                    f"Non-finite gradient{past} in parameter {index} of group {gi} (shape "
                    f"{tuple(p.shape)}); nothing was updated."
                )


def gather_gradients(group, params, states, dtype):
    """Stacked gradients in ``dtype``, clipped, with non-finite ones zeroed; the per-parameter
    finiteness flags; and whether all are known to be finite. On the CPU that is known from a
    free read; elsewhere it is left to the device (no synchronisation)."""
    size = len(params)
    grads = stack([p.grad for p in params]).to(dtype)
    on_cpu = grads.device.type == "cpu"
    limit = overflow_limit(states[0]["factors"][0].dtype)  # float16 factors: 65520
    # A finite sum proves every entry finite (NaN and ±inf survive addition), so on the CPU
    # one reduction usually settles it; a non-finite or overflowing sum takes the exact test.
    if on_cpu and limit == math.inf and math.isfinite(grads.sum().item()):
        return clip_gradients(group, grads), torch.ones(size, dtype=torch.bool), True
    finite = finite_rows(grads.reshape(size, -1), OPS, limit)
    all_finite = on_cpu and bool(finite.all())
    if not all_finite:
        grads = torch.where(finite.view(-1, *[1] * (grads.ndim - 1)), grads, 0.0)
    return clip_gradients(group, grads), finite, all_finite


def clip_gradients(group, grads):
    """``grads`` clipped as the group's ``gradient_clipping`` and ``gradient_clip_value`` say."""
    clip_grad = clipper(group["gradient_clipping"], group["gradient_clip_value"])
    return grads if clip_grad is None else clip_grad(grads)
