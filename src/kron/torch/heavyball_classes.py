"""heavyball 1.5's PSGD-Kron classes, by name, signature and defaults, over :class:`Kron`.

A script written for ``heavyball.ForeachPSGDKron`` (or one of its four variants, or their short
names ``PSGDKron``, ``PurePSGD``, ``DelayedPSGD``, ``CachedPSGDKron`` and
``CachedDelayedPSGDKron``) runs with ``from kron.torch import ForeachPSGDKron`` and nothing
else changed. Each class is :class:`Kron`
with heavyball's defaults and heavyball's rules where ours differ:

* the geometry is ``"EQ"`` (heavyball's triangular Q update);
* the fit schedule, when ``preconditioner_update_probability`` is None, is heavyball's
  ``max(0.03, 0.999^max(n - 1000, 0))``; this one and a callable given are called with heavyball's
  count ``n``, 1 on the first step (``Kron`` passes kron_torch's, 0 on the first step);
* ``merge_dims=True`` is heavyball's merge, ``merge_dims="heavyball"`` (its ``dim_merger``:
  axis 0 kept, the trailing axes folded from the last while the product stays within
  ``max_size_triangular``), not ``Kron``'s squarest view;
* ``split`` cuts axes only when ``merge_dims`` is on: heavyball splits inside its dimension
  merger, so without merging an axis longer than ``max_size_triangular`` stays whole and
  diagonal;
* ``stochastic_schedule=False`` takes heavyball's deterministic accumulator rule;
* the update is clipped by heavyball's trust-region clip (``update_clipping="soft"`` at 1.5)
  unless ``update_clipping`` is given; ``None`` turns clipping off, as in heavyball;
* ``delayed``, ``cached`` and ``exp_avg_input`` left at ``USE_DEFAULT`` or given as None take the
  class's value (heavyball's ``C.default``);
* P is fitted on the momentum only when the momentum is what gets preconditioned
  (``exp_avg_input``), since heavyball fits P on the input of its preconditioning step;
* ``step()`` releases every gradient it used (``p.grad = None``), as heavyball's optimizers do,
  so a heavyball loop that leaves out ``zero_grad()`` trains the same. Set the instance's
  ``consume_grad`` to False to keep them, as in heavyball.

The trust-region default and the schedule are heavyball 3.2.1's (the 1.5 documentation names
the options but not these values). ``store_triu_as_line`` (True by default, as in heavyball)
keeps each triangular Q as the line of its upper triangle between steps; with a geometry other
than EQ, given through ``preconditioner_mode``, the factors are not triangular and stay square.
Any of :class:`Kron`'s own keyword options (``seed``, ``compile``, ``nonfinite``, …) may be
added.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from kron.core import heavyball_schedule
from kron.torch.optimizer import Kron

# heavyball's ``C.use_default``: "the class's value", distinct from None ("off").
USE_DEFAULT: Any = type("UseDefault", (), {"__repr__": lambda self: "USE_DEFAULT"})()
HEAVYBALL_UPDATE_CLIPPING = ("soft", 1.5)  # heavyball's trust_region_clip_(scale=1.5)


class ForeachPSGDKron(Kron):
    """heavyball's ``ForeachPSGDKron``: fit P on the momentum and precondition the momentum."""

    delayed: bool = False
    cached: bool = False
    exp_avg_input: bool = True
    consume_grad: bool = True

    _SETTINGS = (*Kron._SETTINGS, "consume_grad")
    _default_schedule = staticmethod(heavyball_schedule())
    _schedule_first_step = 1  # utils.psgd_should_update counts the step before calling

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.001,
        beta: float = 0.9,
        weight_decay: float = 0.0,
        preconditioner_update_probability: float | Callable[[int], float] | None = None,
        max_size_triangular: int = 2048,
        min_ndim_triangular: int = 2,
        memory_save_mode: str | None = None,
        momentum_into_precond_update: bool = True,
        warmup_steps: int = 1,
        merge_dims: bool = False,
        split: bool = False,
        store_triu_as_line: bool = True,
        foreach: bool = True,
        q_dtype: torch.dtype | str = "float32",
        stochastic_schedule: bool = True,
        storage_dtype: torch.dtype | str = "float32",
        mars: bool = False,
        caution: bool = False,
        mars_gamma: float = 0.0025,
        delayed: bool | None = USE_DEFAULT,
        cached: bool | None = USE_DEFAULT,
        exp_avg_input: bool | None = USE_DEFAULT,
        gradient_clipping: str | Callable[[torch.Tensor], Any] | None = USE_DEFAULT,
        update_clipping: str | Callable[[torch.Tensor], Any] | None = USE_DEFAULT,
        precond_init_scale: float | None = 1.0,
        precond_lr: float = 0.1,
        **kron_options: Any,
    ) -> None:
        if update_clipping is USE_DEFAULT:
            update_clipping, clip_value = HEAVYBALL_UPDATE_CLIPPING
            kron_options.setdefault("update_clip_value", clip_value)
        kron_options.setdefault("preconditioner_mode", "EQ")
        # Read by add_param_group, so set before it runs.
        self._fit_on_momentum = momentum_into_precond_update
        self._split = split
        if not stochastic_schedule:
            kron_options.setdefault("decision_rule", "accumulator")
        # heavyball's C.default: None, like USE_DEFAULT, takes the class's value.
        delayed = self.delayed if delayed in (None, USE_DEFAULT) else delayed
        cached = self.cached if cached in (None, USE_DEFAULT) else cached
        if exp_avg_input in (None, USE_DEFAULT):
            exp_avg_input = self.exp_avg_input
        # Kron's spelling given alone (precond_dtype for q_dtype, ...) wins over the class's
        # default for heavyball's; both given must agree, as in Kron.
        beta, q_dtype, storage_dtype, foreach = (
            None if ours in kron_options and value == default else value
            for value, default, ours in (
                (beta, 0.9, "b1"),
                (q_dtype, "float32", "precond_dtype"),
                (storage_dtype, "float32", "mu_dtype"),
                (foreach, True, "stack_params"),
            )
        )
        super().__init__(
            params,
            lr=lr,
            beta=beta,
            weight_decay=weight_decay,
            preconditioner_update_probability=preconditioner_update_probability,
            max_size_triangular=max_size_triangular,
            min_ndim_triangular=min_ndim_triangular,
            memory_save_mode=memory_save_mode,
            # heavyball fits P on its chain's input: the momentum only when that is the input.
            momentum_into_precond_update=momentum_into_precond_update and exp_avg_input,
            warmup_steps=warmup_steps,
            merge_dims=_heavyball_merge(merge_dims),
            split=_split_if_merging(split, merge_dims),
            # Only EQ's factors are triangular; another geometry given here stores them square.
            store_triu_as_line=(
                False
                if store_triu_as_line is True and kron_options["preconditioner_mode"] != "EQ"
                else store_triu_as_line
            ),
            foreach=foreach,
            q_dtype=q_dtype,
            stochastic_schedule=stochastic_schedule,
            storage_dtype=storage_dtype,
            mars=mars,
            caution=caution,
            mars_gamma=mars_gamma,
            delayed=delayed,
            cached=cached,
            exp_avg_input=exp_avg_input,
            gradient_clipping=None if gradient_clipping is USE_DEFAULT else gradient_clipping,
            update_clipping=update_clipping,
            precond_init_scale=precond_init_scale,
            precond_lr=precond_lr,
            **kron_options,
        )

    def __getstate__(self) -> dict[str, Any]:
        # add_param_group reads the constructor's fitting target and split, so a copy must
        # carry them.
        return {
            **super().__getstate__(),
            "_fit_on_momentum": self._fit_on_momentum,
            "_split": self._split,
        }

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As :meth:`Kron.add_param_group`, with the class's rules for a group's own values:
        ``delayed``, ``cached`` and ``exp_avg_input`` given as None or ``USE_DEFAULT`` take the
        class's value; P is fitted on the momentum only when the group's ``exp_avg_input`` makes
        the momentum the preconditioned input; ``merge_dims=True`` is heavyball's merge;
        ``split`` (the group's or the constructor's) acts only where the group's ``merge_dims``
        is on; ``stochastic_schedule=False`` takes heavyball's accumulator rule unless the group
        names a ``decision_rule``; and a geometry other than EQ stores its factors square unless
        the group says otherwise (as the constructor does)."""
        group = dict(param_group)
        for name in ("delayed", "cached", "exp_avg_input"):
            if name in group and group[name] in (None, USE_DEFAULT):
                group[name] = getattr(self, name)
        if "exp_avg_input" in group or "momentum_into_precond_update" in group:
            wanted = group.get("momentum_into_precond_update", self._fit_on_momentum)
            exp_avg_input = group.get("exp_avg_input", self.defaults["exp_avg_input"])
            if isinstance(wanted, bool) and isinstance(exp_avg_input, bool):  # else refused later
                group["momentum_into_precond_update"] = wanted and exp_avg_input
        if "split" in group or "merge_dims" in group:
            group["split"] = _split_if_merging(
                # an instance pickled before _split existed kept the constructor's in defaults
                group.get("split", getattr(self, "_split", self.defaults["split"])),
                group.get("merge_dims", self.defaults["merge_dims"]),
            )
        if "merge_dims" in group:
            group["merge_dims"] = _heavyball_merge(group["merge_dims"])
        if group.get("stochastic_schedule") is False:
            group.setdefault("decision_rule", "accumulator")
        if group.get("preconditioner_mode", "EQ") != "EQ":  # only EQ's factors are triangular
            group.setdefault("store_triu_as_line", False)
        super().add_param_group(group)

    def _step_all(self, decisions, probes, hvps) -> None:
        super()._step_all(decisions, probes, hvps)
        if self.consume_grad:
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad = None


def _heavyball_merge(merge_dims: Any) -> Any:
    """heavyball's ``merge_dims=True`` as ``Kron``'s rule of that name: ``"heavyball"``, its
    ``dim_merger``, rather than ``Kron``'s squarest 2-D view. Other values are ``Kron``'s."""
    return "heavyball" if merge_dims is True else merge_dims


def _split_if_merging(split: Any, merge_dims: Any) -> Any:
    """heavyball's ``split`` as ``Kron``'s: heavyball cuts axes inside its dimension merger,
    which ``merge_dims=False`` skips (``utils.merge_group`` returns the tensor as it is), so there
    a long axis stays whole and diagonal. A value that is not a bool is left for validation."""
    return False if split is True and not merge_dims else split


class ForeachPurePSGD(ForeachPSGDKron):
    """heavyball's ``ForeachPurePSGD``: precondition the raw gradient, not the momentum."""

    exp_avg_input = False


class ForeachCachedDelayedPSGDKron(ForeachPSGDKron):
    """heavyball's ``ForeachCachedDelayedPSGDKron``: ``cached`` and ``delayed`` by default."""

    delayed = True
    cached = True


class ForeachCachedPSGDKron(ForeachPSGDKron):
    """heavyball's ``ForeachCachedPSGDKron``: keeps ``P_i = Q_iᵀQ_i`` by default."""

    cached = True


class ForeachDelayedPSGD(ForeachPSGDKron):
    """heavyball's ``ForeachDelayedPSGD``: precondition with the previous P, then fit."""

    delayed = True


# heavyball 1.5's short names for the same classes.
PSGDKron = ForeachPSGDKron
PurePSGD = ForeachPurePSGD
DelayedPSGD = ForeachDelayedPSGD
CachedPSGDKron = ForeachCachedPSGDKron
CachedDelayedPSGDKron = ForeachCachedDelayedPSGDKron

__all__ = [
    "USE_DEFAULT",
    "CachedDelayedPSGDKron",
    "CachedPSGDKron",
    "DelayedPSGD",
    "ForeachCachedDelayedPSGDKron",
    "ForeachCachedPSGDKron",
    "ForeachDelayedPSGD",
    "ForeachPSGDKron",
    "ForeachPurePSGD",
    "PSGDKron",
    "PurePSGD",
]
