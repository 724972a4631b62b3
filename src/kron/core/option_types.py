"""Type checks of front-end options, shared so that every front end words them alike.

The core's option records check ranges; these catch values of the wrong type first: a string
where a number belongs, ``"False"`` where a bool does (which would count as true). Each raises
``ValueError`` naming the option as the caller spelled it.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any


def is_real_number(value: Any) -> bool:
    """A Python or NumPy real number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def as_python_number(value: Any) -> Any:
    """A NumPy number as the Python number it stands for; anything else as it is. Options are
    stored this way so that configs serialise as plain JSON and checkpoints load with
    ``torch.load(weights_only=True)``."""
    return value.item() if isinstance(value, numbers.Number) and hasattr(value, "item") else value


def check_option_types(
    *,
    numbers: Mapping[str, Any],
    optional_numbers: Mapping[str, Any],
    flags: Mapping[str, Any],
    optional_flags: Mapping[str, Any],
    is_number: Callable[[Any], bool] = is_real_number,
) -> None:
    """``ValueError`` for the first option, by name, whose value is not of its kind: numbers
    (``is_number``; a front end may accept its tensors), flags (``bool``), and the optional
    variants of both, which also take None."""
    for options, optional in ((numbers, False), (optional_numbers, True)):
        for name, value in options.items():
            if not is_number(value) and not (optional and value is None):
                accepted = "a number or None" if optional else "a number"
                raise ValueError(f"{name} must be {accepted}; got {value!r}.")
    for options, optional in ((flags, False), (optional_flags, True)):
        for name, value in options.items():
            if not isinstance(value, bool) and not (optional and value is None):
                accepted = "True, False or None" if optional else "True or False"
                raise ValueError(f"{name} must be {accepted}; got {value!r}.")


__all__ = ["as_python_number", "check_option_types", "is_real_number"]
