"""Stacked state for buckets of same-shape parameters.

``Kron`` steps each bucket of same-shape parameters in one batched call, on state stacked along
a leading axis: ``factors[i]`` is ``(S·b, n_i, n_i)`` or ``(S·b, n_i)`` for ``S`` parameters of
``b`` blocks each, momentum is ``(S, *shape)``. Each parameter's entries in ``optimizer.state``
are views into those stacks, so ``state_dict()`` holds per-parameter tensors while a step reuses
one stacked tensor per entry. :class:`StateStacks` remembers the last stack of each bucket and
decides when it can be reused.
"""

from __future__ import annotations

from typing import Any

import torch

from kron.core import Plan, TensorState
from kron.torch.functional import concat, line_to_triu, stack, triu_to_line


def _entries(state: dict[str, Any]) -> tuple:
    """A parameter's stacked-state tensors, as objects (kept alive, so identity is reliable)."""
    return (*state["factors"], *state["lipschitz"], *state["cache"], state["momentum"])


def _flat(state: TensorState) -> tuple:
    return (*state.factors, *state.lipschitz, *state.cache, state.momentum)


def _same_entries(state: dict[str, Any], remembered: tuple) -> bool:
    current = _entries(state)
    return len(current) == len(remembered) and all(a is b for a, b in zip(current, remembered))


def pack_triangles(factors: tuple, plan: Plan, unchanged: tuple = ()) -> list:
    """Each dense factor of a stack as the line of its upper triangle (``store_triu_as_line``):
    ``(S·b, n, n)`` -> ``(S·b, n(n+1)/2)``. Only exact for upper-triangular factors (EQ). A factor
    whose index is in ``unchanged`` is None instead: the stored line still holds it (a step
    without a fit leaves the factors as they were)."""
    return [
        None if i in unchanged else triu_to_line(f) if dense else f
        for i, (f, dense) in enumerate(zip(factors, plan.dense))
    ]


def _one_form(factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """One factor of a bucket's parameters, lines and squares mixed (a checkpoint stored in the
    other form, next to a parameter whose state is new) made all square, so they stack. A 2-D
    entry among 3-D ones can only be a line: a diagonal factor is 2-D for every parameter."""
    squares = [f for f in factors if f.ndim == 3]
    if not squares or len(squares) == len(factors):
        return factors
    n = squares[0].shape[-1]
    return [f if f.ndim == 3 else line_to_triu(f, n) for f in factors]


def unpack_triangles(state: TensorState, plan: Plan) -> TensorState:
    """``state`` with every dense factor that is stored as a line made square again; ``state``
    itself when none is (a checkpoint may hold either form, whatever the option is now)."""
    factors = tuple(
        line_to_triu(f, n) if dense and f.ndim == 2 else f
        for f, n, dense in zip(state.factors, plan.block_shape, plan.dense)
    )
    if all(a is b for a, b in zip(factors, state.factors)):
        return state
    return state._replace(factors=factors)


class StateStacks:
    """One remembered stack per bucket: the parameter indices it was made for, each parameter's
    entries when it was made, and the stacked :class:`~kron.core.TensorState`.

    A bucket is any hashable key; ``Kron`` uses ``(group index, shape, dtype, device)``.
    """

    def __init__(self) -> None:
        self._remembered: dict[Any, tuple[tuple, list[tuple], TensorState]] = {}

    def __len__(self) -> int:
        return len(self._remembered)

    def clear(self) -> None:
        """Forget every stack (after ``load_state_dict``, whose tensors are new)."""
        self._remembered.clear()

    def forget(self, bucket: Any) -> None:
        """Forget one bucket's stack (its state is stored in another form than it is stepped)."""
        self._remembered.pop(bucket, None)

    def gather(
        self, bucket: Any, indices: tuple, states: list[dict], order: int, dtype: torch.dtype
    ) -> TensorState:
        """The bucket's state stacked along axis 0, momentum in ``dtype``. While the same
        parameters step and every entry is still the view it was, the remembered stack is
        returned; otherwise (a checkpoint was loaded, state was replaced, a parameter had no
        gradient) the entries are stacked afresh."""
        remembered = self._remembered.get(bucket)
        if remembered is not None and remembered[0] == indices:
            _, entries, stacked = remembered
            if all(_same_entries(s, entry) for s, entry in zip(states, entries)):
                return stacked
        return TensorState(
            tuple(concat(_one_form([s["factors"][i] for s in states])) for i in range(order)),
            tuple(concat([s["lipschitz"][i] for s in states]) for i in range(order)),
            stack([s["momentum"] for s in states]).to(dtype),
            tuple(concat([s["cache"][i] for s in states]) for i in range(order))
            if all(s["cache"] for s in states)
            else (),
        )

    def owns(self, bucket: Any, stacked: TensorState) -> bool:
        """Whether ``stacked`` is the bucket's remembered stack: tensors the optimizer made itself,
        so it may write into them. A stack made afresh for one parameter is a view of whatever
        tensor sits in that parameter's state, which may be one the user put there."""
        remembered = self._remembered.get(bucket)
        return remembered is not None and remembered[2] is stacked

    def store_in_place(self, bucket: Any, old: TensorState, new: TensorState) -> bool:
        """Copy ``new`` into ``old`` when ``old`` is the bucket's remembered stack and has the same
        tensors: every parameter's entries are views into it, so they then hold the new values
        with no per-parameter work (on the LM benchmark that work was about 3% of a step that
        only applies P). False, storing nothing, when the views must be rebuilt (the stack was
        made afresh, or the cache appeared)."""
        if not self.owns(bucket, old) or len(new.cache) != len(old.cache):
            return False
        changed = [(o, n) for o, n in zip(_flat(old), _flat(new)) if o is not n]
        if changed:
            targets, values = zip(*changed)
            torch._foreach_copy_(list(targets), list(values))
        return True

    def remember(
        self, bucket: Any, indices: tuple, states: list[dict], new: TensorState, dtype: torch.dtype
    ) -> None:
        """Remember ``new``, whose slices are now the entries of ``states``. Nothing is remembered
        when momentum is stored in another dtype than ``dtype`` (the stored, rounded values
        must be restacked)."""
        if states[0]["momentum"].dtype != dtype:
            self._remembered.pop(bucket, None)
            return
        self._remembered[bucket] = (indices, [_entries(s) for s in states], new)
