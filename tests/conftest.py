"""Shared fixtures. The core suite runs once per ops backend (``ops`` fixture)."""

from __future__ import annotations

import ast
import inspect
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import pytest

from kron.core import get_ops

# The core suite checks float64 invariants; JAX computes in float32 unless told otherwise.
jax.config.update("jax_enable_x64", True)

BACKENDS = ("numpy", "torch", "jax")


class Backend:
    """An ops backend plus conversions to and from NumPy, for tests."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ops = get_ops(name)

    def array(self, x) -> object:
        x = np.asarray(x)
        if self.name == "torch":
            import torch

            return torch.as_tensor(x)
        if self.name == "jax":
            import jax.numpy as jnp

            return jnp.asarray(x)
        return x

    def numpy(self, x) -> np.ndarray:
        if self.name == "torch":
            return x.detach().cpu().numpy()
        return np.asarray(x)


@pytest.fixture(params=BACKENDS)
def backend(request) -> Backend:
    return Backend(request.param)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


DOCS = Path(__file__).resolve().parents[1] / "docs"
_OPTION_ROW = re.compile(r"^\| (`[^|]+`) \| ([^|]+) \|", re.MULTILINE)


def _documented_defaults(page: str) -> dict[str, object]:
    """``name -> default`` from the rows of a docs page's *Options* section. A row may name
    several options (``a``, ``b``) with one default each, or one default shared by all."""
    section = (DOCS / page).read_text().split("## Options", 1)[1].split("\n## ", 1)[0]
    found = {}
    for names_cell, default_cell in _OPTION_ROW.findall(section):
        names = re.findall(r"`([A-Za-z_][A-Za-z_0-9]*)`", names_cell)
        defaults = [
            math.inf if v == "inf" else ast.literal_eval(v)
            for v in re.findall(r"`([^`]*)`", default_cell)
        ]
        if len(defaults) == 1:
            defaults *= len(names)
        assert len(defaults) == len(names), f"{page}: row {names_cell!r} has defaults {defaults}"
        found.update(zip(names, defaults))
    return found


@pytest.fixture
def check_options_table():
    """``check(page, cls)``: the options table of ``docs/<page>`` lists exactly the options of
    ``cls.__init__``, each with the default the code uses."""

    def check(page: str, cls) -> None:
        documented = _documented_defaults(page)
        actual = {
            p.name: p.default
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.name not in ("self", "params") and p.kind is not p.VAR_KEYWORD
        }
        assert sorted(set(actual) - set(documented)) == [], f"options missing from {page}"
        assert sorted(set(documented) - set(actual)) == [], f"{page} lists unknown options"
        wrong = {k: (documented[k], actual[k]) for k in actual if documented[k] != actual[k]}
        assert wrong == {}, f"{page}: (documented, actual) defaults differ"

    return check


class Conflict(NamedTuple):
    """A documented conflict among options: when ``applies(options)``, the front end must refuse
    the combination with a ``ValueError`` naming one of ``names``."""

    names: tuple[str, ...]
    applies: Callable[[dict], bool]


def refused_as_documented(build, options: dict, conflicts: Sequence[Conflict] = ()) -> bool:
    """Whether ``build(**options)`` refused the combination, which it must do exactly when one of
    ``conflicts`` applies: then with a ``ValueError`` naming one of that conflict's options;
    every other combination must be accepted, so a front end that refuses a valid combination
    fails with the refusal's message. For the property tests over option combinations; records
    the outcome as a hypothesis event (``--hypothesis-show-statistics``)."""
    from hypothesis import event

    expected = [c for c in conflicts if c.applies(options)]
    names = sorted({name for c in expected for name in c.names})
    try:
        build(**options)
    except ValueError as refused:
        if not expected:
            raise AssertionError(
                f"refused a combination no documented conflict covers: {refused}"
            ) from refused
        named = [n for n in names if re.search(rf"\b{re.escape(n)}\b", str(refused))]
        assert named, f"refusal names none of the conflicting options {names}: {refused}"
        event("refused")
        return True
    assert not expected, f"accepted a documented conflict of {names}"
    event("accepted")
    return False
