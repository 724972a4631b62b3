"""Checks of a state dict given to ``Kron.load_state_dict``, made before anything is assigned.

A checkpoint that is refused leaves the optimizer as it was, and one that loads does not fail
at the next step: each check raises ``ValueError`` naming the group or parameter and the entry.
Shapes and types only, so a load does no tensor work.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from kron.core import LayoutOptions, make_plan
from kron.core.option_types import is_real_number
from kron.torch.options import SEED_LIMIT


def check_is_kron_state(saved: dict[Any, Any], groups: list[dict[str, Any]]) -> None:
    """``ValueError`` naming the parameter when a saved per-parameter state is not this
    optimizer's (another optimizer's state dict would fail later, on the first step)."""
    for gi, group in enumerate(groups):
        for index, saved_id in enumerate(group["params"]):
            entry = saved.get(saved_id, saved.get(str(saved_id)))
            if entry and not {"factors", "momentum"} <= set(entry):
                raise ValueError(
                    f"The saved state of parameter {index} of group {gi} has keys "
                    f"{sorted(entry)}, not a kron.torch state (factors, momentum, ...). A "
                    "kron_torch.Kron state dict loads with kron.torch.load_kron_torch_state."
                )


# What a step reads from every parameter's state (``previous_grad`` too, with ``mars``; a
# state saved without it starts from a zero previous gradient, as when mars is switched on).
_STATE_KEYS = ("factors", "lipschitz", "cache", "momentum", "count", "skipped")


def check_saved_state(
    gi: int, index: int, p: torch.Tensor, entry: Any, layout: LayoutOptions
) -> None:
    """``ValueError`` naming parameter ``index`` of group ``gi`` and the entry when its saved
    state lacks a key or holds a tensor of another shape than ``p`` and ``layout`` give (the
    state of another parameter, or edited by hand); the step would otherwise fail with a
    KeyError or a broadcast error. Shapes only, so a load does no tensor work."""
    where = f"The saved state of parameter {index} of group {gi}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is a {type(entry).__name__}, not a dict of tensors.")
    missing = [key for key in _STATE_KEYS if key not in entry]
    if missing:
        raise ValueError(
            f"{where} lacks {', '.join(missing)}; a kron.torch state holds "
            f"{', '.join(_STATE_KEYS)}."
        )
    shape = (*p.shape, 2) if p.is_complex() else tuple(p.shape)  # complex: its real view
    for key in ("momentum", "previous_grad"):
        if key in entry and _saved_shape(where, key, entry[key]) != shape:
            raise ValueError(
                f"{where} has {key} of shape {tuple(entry[key].shape)}, but the parameter has "
                f"shape {shape}{' (its real view)' if p.is_complex() else ''}: the state was "
                "saved for another parameter."
            )
    for key in ("count", "skipped"):
        found = _saved_shape(where, key, entry[key], integer=key == "skipped")
        if found != ():
            raise ValueError(f"{where} has {key} of shape {found}; accepted: a 0-d tensor.")
    plan = make_plan(shape, layout)
    for key, accepted in _factor_shapes(plan).items():
        values = entry[key]
        if not isinstance(values, (list, tuple)):
            found = type(values).__name__
            raise ValueError(f"{where} has {key} of {found}; accepted: a list of tensors.")
        found = [_saved_shape(where, key, value) for value in values]
        fits = len(found) == len(accepted) and all(f in a for f, a in zip(found, accepted))
        if not fits and not (key == "cache" and not found):  # no cache is a cache too
            expected = [" or ".join(map(str, a)) for a in accepted]
            raise ValueError(
                f"{where} has {key} of shapes {found}, not the layout its group's options give "
                f"a parameter of shape {shape}: [{', '.join(expected)}]."
            )


def _factor_shapes(plan: Any) -> dict[str, list[tuple[tuple[int, ...], ...]]]:
    """Per list entry of a state, the shapes each of its tensors may have under ``plan``: a dense
    factor square or as the line of its triangle (``store_triu_as_line``, either form loads
    whatever the option is now), a diagonal one a vector; the cache square, never a line."""
    b = plan.num_blocks
    factors, lipschitz, cache = [], [], []
    for n, dense in zip(plan.block_shape, plan.dense):
        square, diagonal = (b, n, n), (b, n)
        factors.append((square, (b, n * (n + 1) // 2)) if dense else (diagonal,))
        cache.append((square,) if dense else (diagonal,))
        lipschitz.append(((b,),))
    return dict(factors=factors, lipschitz=lipschitz, cache=cache)


def _saved_shape(where: str, key: str, value: Any, integer: bool = False) -> tuple[int, ...]:
    """The shape of the saved tensor ``value``; ``ValueError`` when it is no real floating-point
    tensor (or, with ``integer``, integer one), which the step could not update in place."""
    if isinstance(value, torch.Tensor) and (
        value.is_floating_point()
        or (integer and not value.is_complex() and value.dtype != torch.bool)
    ):
        return tuple(value.shape)
    found = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
    accepted = "a real tensor" if integer else "a floating-point tensor"
    raise ValueError(f"{where} has {key} of {found}; accepted: {accepted}.")


def check_clock(group: dict[str, Any]) -> None:
    """``ValueError`` unless the group's step count is an int >= 0 (it seeds the draws) and its
    decision counter a finite number."""
    step, total = group["step"], group["decision_total"]
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"step must be an int >= 0; got {step!r}.")
    if not (is_real_number(total) and math.isfinite(total)):
        raise ValueError(f"decision_total must be a finite number; got {total!r}.")


def loaded_seed(seed: Any) -> int:
    """A checkpoint's seed, which must be an int, in ``[0, 2**64)``: one outside, saved before
    the range was checked, is folded into it, which draws the same numbers (the draws mask the
    seed to 64 bits), so that run resumes exactly."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"loaded state dict has seed {seed!r}; accepted: an int.")
    return int(seed) % SEED_LIMIT
