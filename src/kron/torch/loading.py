"""Loading a state dict into ``Kron``: the checks made before anything is assigned, and the
copy of the saved state that follows (``Kron.load_state_dict`` and ``Kron.state_dict`` are thin
methods over these).

A checkpoint that is refused leaves the optimizer as it was, and one that loads does not fail
at the next step: each check raises ``ValueError`` naming the group or parameter and the entry.
Shapes and types only, so a load does no tensor work until the state is copied.
"""

from __future__ import annotations

import collections
import contextlib
import math
import numbers
from collections.abc import Callable, Iterator
from typing import Any

import torch

from kron.core import LayoutOptions, make_plan
from kron.core.option_types import is_real_number
from kron.torch.options import SEED_LIMIT, check_hvp_methods


def checked_load(
    state_dict: dict[str, Any],
    param_groups: list[dict[str, Any]],
    seed: int,
    validate: Callable[[dict[str, Any]], None],
    options: Callable[[dict[str, Any]], tuple],
) -> tuple[dict[str, Any], int]:
    """``state_dict`` as ``torch.optim.Optimizer.load_state_dict`` is to load it into an optimizer
    with ``param_groups``: integer state keys, and each saved group over the current one's
    options (callables are not saved) in its current form (:func:`as_saved_before`); and the
    seed to resume with (``seed``, the optimizer's, when none was saved). ``ValueError`` when
    anything would fail, at the load or at the next step: ``validate`` checks a group as a new
    one is checked, ``options`` gives its ``(layout, step options)``."""
    # A torch.distributed.checkpoint round trip turns the integer state keys into strings.
    state_dict = {
        **state_dict,
        "state": {
            (int(k) if isinstance(k, str) and k.isdigit() else k): v
            for k, v in state_dict["state"].items()
        },
    }
    groups = state_dict["param_groups"]
    if len(groups) != len(param_groups):  # zip below would drop the extra groups
        raise ValueError(
            f"loaded state dict has {len(groups)} parameter groups; this optimizer has "
            f"{len(param_groups)}"
        )
    check_is_kron_state(state_dict["state"], groups)
    merged = []
    for saved, current in zip(groups, param_groups):
        merged.append(
            as_saved_before({**{k: v for k, v in current.items() if k != "params"}, **saved})
        )
    # Everything is checked before anything is assigned, so a checkpoint that is refused
    # leaves the optimizer as it was, and one that loads does not fail at the next step.
    check_loaded_groups(merged, param_groups, validate)
    check_loaded_state(state_dict["state"], merged, param_groups, options)
    seed = loaded_seed(state_dict.get("seed", seed))
    return {**state_dict, "param_groups": merged}, seed


def copy_saved_state(
    state: dict[torch.Tensor, Any], state_dict: dict[str, Any], param_groups: list[dict[str, Any]]
) -> None:
    """Put into ``state`` (the optimizer's) a copy of each parameter's saved state, on the
    parameter's device; ``state_dict`` is :func:`checked_load`'s."""
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    current = [p for g in param_groups for p in g["params"]]
    for saved_id, p in zip(saved_ids, current):
        saved = state_dict["state"].get(saved_id)
        if not saved:  # none, or the empty entry that reading opt.state[p] leaves
            continue
        state[p] = {key: to_device(value, p.device) for key, value in saved.items()}


def check_loaded_groups(
    groups: list[dict[str, Any]],
    param_groups: list[dict[str, Any]],
    validate: Callable[[dict[str, Any]], None],
) -> None:
    """``ValueError`` naming the group when a loaded group (saved options over the current
    ones, ``param_groups``) fails a check that a new group passes (``validate``), or its clock
    is not a count."""
    for gi, (group, current) in enumerate(zip(groups, param_groups)):
        if len(group["params"]) != len(current["params"]):
            raise ValueError(
                f"loaded state dict has {len(group['params'])} parameters in group {gi}; "
                f"this optimizer has {len(current['params'])}"
            )
        try:
            validate(group)
            check_clock(group)
        except ValueError as error:
            raise ValueError(f"loaded state dict, param group {gi}: {error}") from None
    try:
        check_hvp_methods(groups)
    except ValueError as error:
        raise ValueError(f"loaded state dict: {error}") from None


def check_loaded_state(
    saved: dict[Any, Any],
    groups: list[dict[str, Any]],
    param_groups: list[dict[str, Any]],
    options: Callable[[dict[str, Any]], tuple],
) -> None:
    """``ValueError`` naming the parameter and the entry when a saved state is not one the
    step can take, for the layout its loaded group gives (``options(group)[0]``; see
    :func:`check_saved_state`)."""
    for gi, (group, current) in enumerate(zip(groups, param_groups)):
        layout, _ = options(group)
        for index, (saved_id, p) in enumerate(zip(group["params"], current["params"])):
            entry = saved.get(saved_id)
            if entry is None or (isinstance(entry, dict) and not entry):
                continue  # none, or the empty entry that reading opt.state[p] leaves
            check_saved_state(gi, index, p, entry, layout)


def as_saved_before(group: dict[str, Any]) -> dict[str, Any]:
    """A loaded group with the values earlier versions let through in their current form:
    ``merge_dims`` 0 or 1 (which ran as False and True) as a bool, and a NumPy integer step
    count (which the draws' seeding cannot take) as an ``int``."""
    merge = group.get("merge_dims")
    if type(merge) is int and merge in (0, 1):
        group["merge_dims"] = bool(merge)
    step = group.get("step")
    if isinstance(step, numbers.Integral) and not isinstance(step, (bool, int)):
        group["step"] = int(step)
    return group


def to_device(value: Any, device: torch.device) -> Any:
    """A copy of ``value`` on ``device``: the optimizer updates its state in place, and the
    caller's state dict must not change under it."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, copy=True)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    return value


@contextlib.contextmanager
def hooks_suspended(optimizer: torch.optim.Optimizer, *names: str) -> Iterator[None]:
    """``optimizer``'s hook tables ``names`` emptied for the block: the checkpoint methods run
    the user's hooks themselves, around their own work rather than inside torch's."""
    saved = {name: getattr(optimizer, name) for name in names}
    try:
        for name in names:
            setattr(optimizer, name, collections.OrderedDict())
        yield
    finally:
        for name, hooks in saved.items():
            setattr(optimizer, name, hooks)


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
