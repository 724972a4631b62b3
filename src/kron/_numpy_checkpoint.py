"""Reading a :class:`kron.numpy.KronPsgd` checkpoint's entries, each checked before any is used.

A checkpoint is plain values (``KronPsgd.state_dict``), so anything may arrive in it: these
turn each entry into what the optimizer keeps, or raise ``ValueError`` naming the entry and what
was expected, so that ``load_state_dict`` can check the whole dict before it assigns anything.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np


def check_keys(
    saved: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> None:
    """``ValueError`` unless ``saved`` is a dict with the ``required`` keys and no key outside
    ``required`` and ``optional``: a missing entry would surface as a bare ``KeyError``, and an
    unknown one would be dropped (or, among the fields, set as an attribute)."""
    if not isinstance(saved, Mapping):
        raise ValueError(f"{where} must be a dict; got {type(saved).__name__}.")
    missing = [key for key in required if key not in saved]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(repr(k) for k in missing)}.")
    unknown = [key for key in saved if key not in required + optional]
    if unknown:
        raise ValueError(
            f"{where} has unknown entries {unknown!r}; expected {', '.join(required + optional)}."
        )


def whole_number(value: Any, where: str) -> int:
    """A saved count or seed as an ``int``; ``ValueError`` unless it is a whole number >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{where} must be a whole number >= 0; got {value!r}.")
    return int(value)


def saved_decided(saved: Any, iteration: int) -> tuple[int, bool] | None:
    """The remembered fit decision: ``None`` or ``[iteration, decision]``, made no later than
    the saved iteration."""
    if saved is None:
        return None
    if (
        isinstance(saved, (list, tuple))
        and len(saved) == 2
        and isinstance(saved[1], (bool, np.bool_))
        and not isinstance(saved[0], bool)
        and isinstance(saved[0], numbers.Integral)
        and 0 <= saved[0] <= iteration
    ):
        return int(saved[0]), bool(saved[1])
    raise ValueError(
        f"checkpoint['decided'] must be None or [iteration <= {iteration}, True or False]; got "
        f"{saved!r}."
    )


def saved_names(saved: Any, where: str) -> list[str]:
    """A list of parameter names (names are ``str``, as :meth:`KronPsgd.step` requires)."""
    if not isinstance(saved, (list, tuple)) or not all(isinstance(n, str) for n in saved):
        raise ValueError(f"{where} must be a list of names (str); got {saved!r}.")
    return list(saved)


def saved_keys(saved: Any, where: str) -> list[str]:
    """The names a per-name dict of a checkpoint is keyed by."""
    if not isinstance(saved, Mapping):
        raise ValueError(f"{where} must be a dict; got {type(saved).__name__}.")
    for name in saved:
        if not isinstance(name, str):
            raise ValueError(f"{where} is keyed by parameter names (str); got {name!r}.")
    return list(saved)


def saved_pending_skips(saved: Any, slots: Mapping[str, Any]) -> dict[str, int]:
    """Skips of names with no slot yet. A name with a slot keeps its skips in the slot, so one
    listed in both would be counted twice by :meth:`KronPsgd.skipped`."""
    where = "checkpoint['pending_skips']"
    names = saved_keys(saved, where)
    for name in names:
        if name in slots:
            raise ValueError(f"{where} names {name!r}, which has a slot holding its skips.")
    return {name: whole_number(saved[name], f"{where}[{name!r}]") for name in names}


def saved_shape(saved: Any, where: str) -> tuple[int, ...]:
    """A slot's logical shape, from which this optimizer's layout gives the expected plan."""
    if not isinstance(saved, (list, tuple)) or not all(
        isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1 for n in saved
    ):
        raise ValueError(f"{where} must be a list of positive whole numbers; got {saved!r}.")
    return tuple(int(n) for n in saved)


def saved_array(saved: Any, where: str) -> np.ndarray:
    """A copy of a saved array (the checkpoint stays the caller's)."""
    try:
        return np.array(saved)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where} is not an array: {error}") from None


def saved_arrays(
    saved: Any,
    where: str,
    shapes: list[tuple[int, ...]],
    dtype: np.dtype,
    plan: str,
    nonnegative: bool = False,
) -> list[np.ndarray]:
    """Copies of a saved list of per-factor arrays, one per factor of the plan (described by
    ``plan``), each of its shape in ``shapes`` and of ``dtype``, and finite (``>= 0`` too for
    the Lipschitz estimates): the state a step keeps, since it never lets a non-finite gradient
    in."""
    if not isinstance(saved, (list, tuple)):
        raise ValueError(f"{where} must be a list of arrays; got {type(saved).__name__}.")
    if len(saved) != len(shapes):
        raise ValueError(
            f"{where} must hold {len(shapes)} arrays, one per factor of {plan}; got {len(saved)}."
        )
    arrays = [saved_array(a, f"{where}[{i}]") for i, a in enumerate(saved)]
    found = [a.shape for a in arrays]
    if found != shapes:
        raise ValueError(
            f"{where} has shapes {found}, but this optimizer's layout options give {shapes}; "
            "construct it with the options used when saving."
        )
    for i, (array, shape) in enumerate(zip(arrays, shapes)):
        if array.dtype != dtype:
            raise ValueError(
                f"{where}[{i}] is {shape} {array.dtype}; expected {shape} {dtype}, the "
                "momentum's dtype."
            )
        if not np.isfinite(array).all() or (nonnegative and not (array >= 0).all()):
            bound = " and >= 0" if nonnegative else ""
            raise ValueError(f"{where}[{i}] holds a value that is not finite{bound}.")
    return arrays


def same_option(saved: Any, mine: Any) -> bool:
    """Whether a saved option equals this optimizer's; a value of another kind (an array, a
    list) is unequal rather than an error."""
    return isinstance(saved, (str, numbers.Real, type(None))) and saved == mine
