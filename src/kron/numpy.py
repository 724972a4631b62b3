"""``KronPsgd``: PSGD-Kron for plain NumPy arrays, with the API of the Rust crate's ``KronPsgd``.

The six fields of the Rust struct (``lr``, ``precond_lr``, ``momentum``, ``weight_decay``, ``eps``,
``clip``) are plain mutable attributes, read afresh on every step. Everything else is a keyword
option fixed at construction. Parameters are addressed by name::

    opt = KronPsgd(lr=3e-3)
    for batch in data:
        for name, param in params.items():
            opt.step(name, param, grads[name])   # updates `param` in place
        opt.end_iteration()

Randomness is counter-based: the noise of a step is drawn from a generator seeded with
``(seed, iteration, crc32(name))``, so a run resumed from :meth:`KronPsgd.state_dict` repeats the
uninterrupted run bit for bit, and the order in which names are stepped does not matter.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from kron._numpy_checkpoint import (
    check_keys,
    same_option,
    saved_array,
    saved_arrays,
    saved_decided,
    saved_keys,
    saved_names,
    saved_pending_skips,
    saved_shape,
    whole_number,
)
from kron.core import (
    DECISION_RULES,
    FitOptions,
    LayoutOptions,
    Plan,
    StepOptions,
    TensorState,
    accumulator_decision,
    balance,
    bernoulli_decision,
    counter_decision,
    fourth_moment,
    get_ops,
    init_factors,
    init_lipschitz,
    kron_step,
    make_plan,
    probability_at,
    scale_from_moments,
)
from kron.core.option_types import check_option_types
from kron.core.option_types import is_real_number as _is_real

_OPS = get_ops("numpy")
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
NONFINITE_POLICIES = ("skip", "raise")
_HYPERPARAMETERS = ("lr", "precond_lr", "momentum", "weight_decay", "eps", "clip")
_CHECKPOINT_KEYS = (
    "hyperparameters",
    "seed",
    "iteration",
    "decision_total",
    "decided",
    "pending_skips",
    "slots",
)
# Absent from checkpoints saved before they existed; such a checkpoint still loads.
_LATER_CHECKPOINT_KEYS = ("stepped", "options")
_SLOT_KEYS = ("factors", "lipschitz", "momentum", "count", "skipped", "shape")


@dataclass
class _Slot:
    """Per-name state: the plan (derived, not saved), the core state and two counters."""

    plan: Plan
    state: TensorState
    count: int = 0  # steps applied (momentum count)
    skipped: int = 0  # steps skipped for a non-finite gradient
    mask: np.ndarray | None = None


class KronPsgd:
    """Kronecker-factored preconditioned SGD for NumPy arrays.

    Args:
      lr: learning rate η. Default 3e-3, chosen by the sweep in ``docs/numpy.md`` §6 (best or
        near-best on 3 of 4 problems by worst seed; about a third of Adam's best there).
      precond_lr: μ, the preconditioner's learning rate. Default 0.1.
      momentum: momentum β (0 disables it). Default 0.9.
      weight_decay: L2 coefficient folded into the gradient (``g + wd·θ``). Default 0.0.
      eps: floor of the preconditioner step normaliser (``μ / max(L, eps)``). Default 1e-8.
      clip: cap on every entry of the preconditioned update; ``None`` or ``inf`` disables it.
        Default 1.0.
      preconditioner_mode: geometry: ``"Q0.5EQ1.5"`` (default), ``"EQ"``, ``"QEQ"``, ``"QUAD"``,
        ``"QEP"``, ``"PRO4P"``, ``"QUAD4P"``.
      whiten_grad: fit P on the raw gradient (True, default) or on the momentum (False).
      update_probability: probability of a preconditioner fit per iteration: a float or a callable
        of the iteration number. Default 1.0.
      decision_rule: how the probability becomes a decision: ``"counter"`` (default),
        ``"accumulator"`` or ``"bernoulli"`` (see :mod:`kron.core.schedules`).
      init_scale: initial ``Q = init_scale·I``; ``None`` (default) sets it per tensor from the first
        gradient by the 4th-moment rule.
      max_size, max_skew, min_ndim_dense, memory_save_mode, merge_dims, block_size: factor layout,
        see :class:`kron.core.LayoutOptions`.
      beta_lipschitz, damping, damping_rule, norm_bound: fit options, see
        :class:`kron.core.FitOptions`.
      clip_rms: optional per-tensor RMS cap applied before ``clip``. Default None.
      balance_probability: chance per fit of rebalancing factor norms. Default 0.01.
      nonfinite: ``"skip"`` (default) leaves a tensor untouched when its gradient has a NaN or Inf
        and counts it (:meth:`skipped`); ``"raise"`` raises ``FloatingPointError``.
      seed: seed of the counter-based noise. Default 0.
    """

    def __init__(
        self,
        lr: float = 3e-3,
        precond_lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        clip: float | None = 1.0,
        *,
        preconditioner_mode: str = "Q0.5EQ1.5",
        whiten_grad: bool = True,
        update_probability: float | Callable[[int], float] = 1.0,
        decision_rule: str = "counter",
        init_scale: float | None = None,
        max_size: float = math.inf,
        max_skew: float = 1.0,
        min_ndim_dense: int = 0,
        memory_save_mode: str | None = None,
        merge_dims: bool | str = False,
        block_size: int | None = None,
        beta_lipschitz: float = 0.9,
        damping: float = 1e-9,
        damping_rule: str = "elementwise",
        norm_bound: str = "power",
        clip_rms: float | None = None,
        balance_probability: float = 0.01,
        nonfinite: str = "skip",
        seed: int = 0,
    ) -> None:
        check_option_types(
            numbers=dict(
                max_size=max_size,
                max_skew=max_skew,
                beta_lipschitz=beta_lipschitz,
                damping=damping,
                balance_probability=balance_probability,
            ),
            optional_numbers=dict(clip_rms=clip_rms),
            flags={},
            optional_flags={},
        )
        if isinstance(min_ndim_dense, bool) or not isinstance(min_ndim_dense, numbers.Integral):
            raise ValueError(f"min_ndim_dense must be a whole number >= 0; got {min_ndim_dense!r}.")
        self.lr = lr
        self.precond_lr = precond_lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.eps = eps
        self.clip = clip
        self._layout = LayoutOptions(
            max_size=max_size,
            max_skew=max_skew,
            min_ndim_dense=min_ndim_dense,
            memory_save_mode=memory_save_mode,
            merge_dims=merge_dims,
            block_size=block_size,
        )
        self._fit = FitOptions(
            geometry=preconditioner_mode,
            beta_lipschitz=beta_lipschitz,
            damping=damping,
            damping_rule=damping_rule,
            norm_bound=norm_bound,
        )  # normalizer_floor is eps, set per step from the field (checked there, by its name)
        if decision_rule not in DECISION_RULES:
            raise ValueError(
                f"Unknown decision_rule {decision_rule!r}; accepted: {', '.join(DECISION_RULES)}."
            )
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"Unknown nonfinite {nonfinite!r}; accepted: {', '.join(NONFINITE_POLICIES)}."
            )
        if not callable(update_probability) and not (
            _is_real(update_probability) and 0.0 < update_probability <= 1.0
        ):
            raise ValueError(
                f"update_probability must be a number in (0, 1] or a callable; got "
                f"{update_probability!r}."
            )
        if init_scale is not None and not (
            _is_real(init_scale) and 0 < init_scale and math.isfinite(init_scale)
        ):
            raise ValueError(f"init_scale must be a finite number > 0 or None; got {init_scale!r}.")
        if not 0.0 <= balance_probability <= 1.0:
            raise ValueError(f"balance_probability must be in [0, 1]; got {balance_probability!r}.")
        self.whiten_grad = whiten_grad
        self.update_probability = update_probability
        self.decision_rule = decision_rule
        self.init_scale = init_scale
        self.clip_rms = clip_rms
        self.balance_probability = balance_probability
        self.nonfinite = nonfinite
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative int; got {seed!r}.")
        self.seed = int(seed)
        self._step_options()  # validate the mutable fields once, eagerly
        self._iteration = 0
        self._decision_total = 0.0  # the counter or accumulator of the decision rule
        self._decided: tuple[int, bool] | None = None
        self._slots: dict[str, _Slot] = {}
        self._pending_skips: dict[str, int] = {}  # skips seen before a name's first good step
        self._stepped: set[str] = set()  # names stepped in the current iteration

    # -- the Rust crate's API ------------------------------------------------------------------

    def step(
        self,
        name: str,
        param: np.ndarray,
        grad: np.ndarray,
        shape: tuple[int, ...] | None = None,
    ) -> None:
        """Update ``param`` in place from ``grad``.

        ``param`` and ``grad`` have the same shape, or are flat with ``shape`` giving the logical
        shape (as the Rust API passes ``shape`` with flat slices). float32 and float64 are accepted.
        Stepping a name a second time ends the iteration first, as :meth:`end_iteration` would.
        A step that raises (bad input, a changed field out of range, ``nonfinite="raise"``)
        changes nothing, so it can be retried.
        """
        if not isinstance(name, str):
            raise TypeError(f"name must be a str; got {type(name).__name__} {name!r}.")
        view, grad = self._check(name, param, grad, shape)
        options = self._step_options()  # the fields may have been changed since the last step
        scale = self.lr_scale(name)
        if isinstance(scale, np.ndarray) and scale.ndim == 0:
            scale = scale.item()
        if (
            isinstance(scale, bool)
            or not isinstance(scale, numbers.Real)
            or not (scale >= 0 and math.isfinite(scale))
        ):
            raise ValueError(f"lr_scale({name!r}) must be a finite number >= 0; got {scale!r}.")
        if self.weight_decay:
            # Coupled decay before the check: a finite gradient that the decay takes past the
            # dtype's range is skipped like any non-finite one rather than stepped.
            with np.errstate(over="ignore"):  # an overflow is caught just below
                grad = grad + self.weight_decay * view
        finite = bool(np.isfinite(grad).all())
        if not finite and self.nonfinite == "raise":
            decayed = " plus weight_decay·param" if self.weight_decay else ""
            raise FloatingPointError(
                f"Non-finite gradient for {name!r} (as stepped: cast to {view.dtype}{decayed})."
            )
        clock = (self._iteration, set(self._stepped), self._decision_total, self._decided)
        try:
            self._step_checked(name, view, grad, options, finite, self.lr * scale)
        except BaseException:
            # What can still raise (a schedule's value, the step's arithmetic) comes before the
            # parameter and its state are written, so winding the clock back undoes the step.
            self._iteration, self._stepped, self._decision_total, self._decided = clock
            raise

    def _step_checked(self, name, view, grad, options, finite, step_size) -> None:
        """:meth:`step` once its input has passed the checks; ``step_size`` is
        ``lr·lr_scale(name)``."""
        if name in self._stepped:
            # A loop written for the Rust trait, where end_iteration is a no-op, never calls it;
            # without this its noise and fit decisions would repeat every step.
            self.end_iteration()
        self._stepped.add(name)
        if not finite:
            if name in self._slots:
                self._slots[name].skipped += 1
            else:
                self._pending_skips[name] = self._pending_skips.get(name, 0) + 1
            return
        if name not in self._slots and self.init_scale is None and not grad.any():
            # No state yet from an all-zero gradient (a LoRA factor whose partner starts at
            # zero): its automatic scale would fall back to 1.0 for good. The step would move
            # nothing (a zero momentum, preconditioned), so the name starts at its first
            # nonzero gradient instead, as if this one had not come.
            return
        slot = self._slots.get(name) or self._new_slot(view, grad)
        rng = np.random.default_rng([self.seed, self._iteration, zlib.crc32(name.encode())])
        do_fit = self._do_fit()
        plan, dtype = slot.plan, view.dtype
        balance_draw = rng.random()
        noise = rng.standard_normal((plan.num_blocks, *plan.block_shape)).astype(dtype)
        probes = None
        if self._fit.norm_bound == "subspace":
            probes = [
                rng.standard_normal((plan.num_blocks, 32, n)).astype(dtype)
                for n in plan.block_shape
            ]
        y, state = kron_step(
            slot.state._replace(momentum=slot.state.momentum[None]),
            grad[None],
            slot.count,
            noise,
            plan=plan,
            options=options,
            precond_lr=self.precond_lr,
            do_fit=do_fit,
            ops=_OPS,
            mask=slot.mask,
            norm_probes=probes,
        )
        if do_fit and balance_draw < self.balance_probability:
            state = state._replace(factors=tuple(balance(state.factors, _OPS)))
        view -= step_size * y[0].astype(dtype, copy=False)
        slot.state = state._replace(momentum=state.momentum[0])
        slot.count += 1
        if name not in self._slots:
            slot.skipped = self._pending_skips.pop(name, 0)
            self._slots[name] = slot

    def end_iteration(self) -> None:
        """Advance the global iteration (schedules and noise depend on it)."""
        self._do_fit()  # an iteration with no step still advances the decision rule
        self._iteration += 1
        self._stepped.clear()

    def lr_scale(self, name: str) -> float:
        """Multiplier on ``lr`` for parameter ``name``. 1.0; override in a subclass for per-name
        learning rates."""
        return 1.0

    # -- inspection and checkpoints ------------------------------------------------------------

    @property
    def iteration(self) -> int:
        """Iterations completed (calls to :meth:`end_iteration`)."""
        return self._iteration

    def skipped(self, name: str) -> int:
        """How many steps of ``name`` were skipped for a non-finite gradient."""
        slot = self._slots.get(name)
        return (slot.skipped if slot else 0) + self._pending_skips.get(name, 0)

    def preconditioner(self, name: str) -> list[np.ndarray]:
        """The factors of ``name`` (``Q_i``, or ``P_i`` for PRO4P/QUAD4P), blocked ``(B, ...)``."""
        return list(self._slots[name].state.factors)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: plain NumPy arrays and Python scalars, no objects."""
        slots = {
            name: {
                "factors": [np.array(f) for f in s.state.factors],
                "lipschitz": [np.array(lip) for lip in s.state.lipschitz],
                "momentum": np.array(s.state.momentum),
                "count": s.count,
                "skipped": s.skipped,
                "shape": list(s.plan.shape),
            }
            for name, s in self._slots.items()
        }
        return {
            "hyperparameters": {k: getattr(self, k) for k in _HYPERPARAMETERS},
            "seed": self.seed,
            "iteration": self._iteration,
            "decision_total": self._decision_total,
            "decided": None if self._decided is None else list(self._decided),
            "pending_skips": dict(self._pending_skips),
            "stepped": sorted(self._stepped),
            "slots": slots,
            "options": self._state_options(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the continued run equals the one that never stopped.

        The whole dict is checked before anything is assigned, so a checkpoint that is refused
        (``ValueError`` naming the entry and what was expected) leaves this optimizer as it was.
        """
        check_keys(state, "checkpoint", _CHECKPOINT_KEYS, _LATER_CHECKPOINT_KEYS)
        if "options" in state:  # checkpoints saved before it existed cannot be checked here
            self._check_saved_options(state["options"])
        fields = _saved_fields(state["hyperparameters"])
        seed = whole_number(state["seed"], "checkpoint['seed']")
        iteration = whole_number(state["iteration"], "checkpoint['iteration']")
        decision_total = self._saved_decision_total(state["decision_total"])
        decided = saved_decided(state["decided"], iteration)
        slots = self._saved_slots(state["slots"])
        pending_skips = saved_pending_skips(state["pending_skips"], slots)
        stepped = saved_names(state.get("stepped", []), "checkpoint['stepped']")
        # Nothing below can raise: the checkpoint replaces the state as a whole.
        for name, value in fields.items():
            setattr(self, name, value)
        self.seed = seed
        self._iteration = iteration
        self._decision_total = decision_total
        self._decided = decided
        self._pending_skips = pending_skips
        self._stepped = set(stepped)
        self._slots = slots

    def _state_options(self) -> dict[str, Any]:
        """The keyword options that fix what the saved state means: the layout gives the factors'
        shapes, the geometry whether they are ``Q_i`` (triangular for EQ) or ``P_i``, and the
        decision rule whether ``decision_total`` is a counter or an accumulator. Saved so that a
        checkpoint is refused by an optimizer that would read it otherwise."""
        layout = self._layout
        merge = layout.merge_dims
        return {
            "preconditioner_mode": self._fit.geometry,
            "max_size": float(layout.max_size),
            "max_skew": float(layout.max_skew),
            "min_ndim_dense": int(layout.min_ndim_dense),
            "memory_save_mode": layout.memory_save_mode,
            "merge_dims": merge if isinstance(merge, str) else bool(merge),
            "block_size": layout.block_size,  # an int: LayoutOptions stores it so
            "decision_rule": self.decision_rule,
        }

    def _check_saved_options(self, saved: Any) -> None:
        """``ValueError`` naming the options a checkpoint was saved with that differ from this
        optimizer's: its factors and counters would be read with another meaning."""
        mine = self._state_options()
        check_keys(saved, "checkpoint['options']", tuple(mine))
        differ = [key for key in mine if not same_option(saved[key], mine[key])]
        if differ:
            theirs = ", ".join(f"{key}={saved[key]!r}" for key in differ)
            ours = ", ".join(f"{key}={mine[key]!r}" for key in differ)
            raise ValueError(
                f"The checkpoint was saved with {theirs}, but this optimizer has {ours}. The "
                "geometry, the layout options and the decision rule fix what the saved state "
                "means; construct the optimizer with the options used when saving."
            )

    def _saved_decision_total(self, value: Any) -> float:
        """The saved counter (a count of iterations) or accumulator (a fraction in [0, 1))."""
        high = 1.0 if self.decision_rule == "accumulator" else math.inf
        if not (_is_real(value) and 0 <= value < high):
            expected = "in [0, 1)" if high == 1.0 else "finite and >= 0"
            raise ValueError(
                f"checkpoint['decision_total'] must be a number {expected} for decision_rule "
                f"{self.decision_rule!r}; got {value!r}."
            )
        return float(value)

    def _saved_slots(self, saved: Any) -> dict[str, _Slot]:
        """The slots of a checkpoint, each checked against the plan its shape gives under this
        optimizer's layout."""
        names = saved_keys(saved, "checkpoint['slots']")
        return {name: self._saved_slot(name, saved[name]) for name in names}

    def _saved_slot(self, name: str, saved: Any) -> _Slot:
        """One saved slot as a :class:`_Slot` holding copies of its arrays. Its factors and
        Lipschitz estimates must be the ones :meth:`_new_slot` makes for its shape: a list one
        short would load, and the next step would leave the parameter a factor short."""
        where = f"checkpoint['slots'][{name!r}]"
        check_keys(saved, where, _SLOT_KEYS)
        plan = make_plan(saved_shape(saved["shape"], f"{where}['shape']"), self._layout)
        momentum = saved_array(saved["momentum"], f"{where}['momentum']")
        if momentum.shape != plan.shape or momentum.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"{where}['momentum'] is {momentum.shape} {momentum.dtype}; expected "
                f"{plan.shape} (its 'shape' entry), float32 or float64."
            )
        if not np.isfinite(momentum).all():
            raise ValueError(f"{where}['momentum'] holds a value that is not finite.")
        layout = f"the plan of shape {plan.shape} under this optimizer's layout options"
        factors = saved_arrays(
            saved["factors"],
            f"{where}['factors']",
            [
                (plan.num_blocks, n, n) if dense else (plan.num_blocks, n)
                for n, dense in zip(plan.block_shape, plan.dense)
            ],
            momentum.dtype,
            layout,
        )
        lipschitz = saved_arrays(
            saved["lipschitz"],
            f"{where}['lipschitz']",
            [(plan.num_blocks,)] * plan.order,
            np.promote_types(momentum.dtype, np.float32),  # as _new_slot makes them
            layout,
            nonnegative=True,
        )
        mask = plan.mask()
        return _Slot(
            plan=plan,
            state=TensorState(tuple(factors), tuple(lipschitz), momentum),
            count=whole_number(saved["count"], f"{where}['count']"),
            skipped=whole_number(saved["skipped"], f"{where}['skipped']"),
            mask=None if mask is None else mask.astype(momentum.dtype),
        )

    # -- internals -----------------------------------------------------------------------------

    def _step_options(self) -> StepOptions:
        """The core's options from the current field values (validated here, on every step)."""
        _check_fields({name: getattr(self, name) for name in _HYPERPARAMETERS})
        if not isinstance(self.whiten_grad, bool):
            raise ValueError(f"whiten_grad must be True or False; got {self.whiten_grad!r}.")
        clip = None if self.clip is None or self.clip == math.inf else self.clip
        return StepOptions(
            layout=self._layout,
            fit=dataclasses.replace(self._fit, normalizer_floor=self.eps),
            beta=self.momentum,
            momentum_rule="running_mean",
            whiten_momentum=not self.whiten_grad,
            fit_before_apply=True,
            clip_rms=self.clip_rms,
            clip_max=clip,
        )

    def _check(self, name, param, grad, shape):
        if not isinstance(param, np.ndarray) or param.dtype not in _FLOAT_DTYPES:
            # The Rust trait's order is (name, shape, param, grad); this one's puts shape last.
            hint = (
                " The arguments are (name, param, grad, shape=None): the shape goes last."
                if isinstance(param, (tuple, list))
                else ""
            )
            raise TypeError(
                f"param {name!r} must be a float32 or float64 numpy array; got "
                f"{type(param).__name__} of dtype {getattr(param, 'dtype', None)}.{hint}"
            )
        if not param.flags.writeable:
            raise ValueError(f"param {name!r} is read-only; step updates it in place.")
        given, grad = grad, np.asarray(grad)
        if np.iscomplexobj(grad):
            raise TypeError(
                f"grad of {name!r} is complex ({grad.dtype}); accepted: real gradients for "
                "float32 or float64 parameters."
            )
        if grad.dtype.kind not in "biuf":  # NumPy would turn None into NaN, a silent skip
            raise TypeError(
                f"grad of {name!r} must be a real numeric array; got {type(given).__name__} of "
                f"dtype {grad.dtype}."
            )
        if shape is not None:
            if not isinstance(shape, (tuple, list)) or not all(
                isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1
                for n in shape
            ):
                raise ValueError(
                    f"shape of {name!r} must be a tuple of positive whole numbers; got {shape!r}."
                )
            shape = tuple(int(n) for n in shape)
            if param.size != math.prod(shape) or grad.size != param.size:
                raise ValueError(
                    f"shape {shape} of {name!r} ({math.prod(shape)} elements) does not match param "
                    f"of {param.size} and grad of {grad.size} elements."
                )
            view = param.reshape(shape)
            if not np.shares_memory(view, param):
                raise ValueError(f"param {name!r} must be contiguous to be updated through shape=.")
            grad = grad.reshape(shape)
        else:
            view = param
            if grad.shape != param.shape:
                raise ValueError(
                    f"grad shape {grad.shape} does not match param shape {param.shape} "
                    f"for {name!r}."
                )
        slot = self._slots.get(name)
        if slot is not None:
            known = slot.state.momentum
            if view.shape != known.shape or view.dtype != known.dtype:
                raise ValueError(
                    f"param {name!r} was stepped as {known.shape} {known.dtype}; got "
                    f"{view.shape} {view.dtype}. A name stands for one parameter: give a new "
                    "parameter a new name."
                )
        return view, grad.astype(param.dtype, copy=False)

    def _new_slot(self, param: np.ndarray, grad: np.ndarray) -> _Slot:
        """The initial state of a parameter first stepped with ``grad``; :meth:`step` registers
        it under its name once that step is done."""
        plan = make_plan(param.shape, self._layout)
        like = np.zeros((), param.dtype)
        if self.init_scale is None:
            scale = float(scale_from_moments(fourth_moment(grad, _OPS), _OPS, self._fit.damping))
        else:
            scale = self.init_scale
        factors = init_factors(plan, scale, like, _OPS, self._fit.state_is_p)
        lipschitz = init_lipschitz(
            plan, np.zeros((), np.promote_types(param.dtype, np.float32)), _OPS
        )
        mask = plan.mask()
        return _Slot(
            plan=plan,
            state=TensorState(tuple(factors), tuple(lipschitz), np.zeros_like(param)),
            mask=None if mask is None else mask.astype(param.dtype),
        )

    def _do_fit(self) -> bool:
        """The fit decision of the current iteration, made once and remembered."""
        if self._decided is not None and self._decided[0] == self._iteration:
            return self._decided[1]
        p = float(probability_at(self.update_probability, self._iteration))
        if not 0.0 < p <= 1.0:
            raise ValueError(
                f"update_probability gave {p!r} at iteration {self._iteration}; it must be in "
                "(0, 1]."
            )
        if self.decision_rule == "counter":
            decide, total = counter_decision(self._decision_total, p, _OPS)
        elif self.decision_rule == "accumulator":
            decide, total = accumulator_decision(self._decision_total, p, _OPS)
        else:
            draw = np.random.default_rng([self.seed, self._iteration, 0x5EED]).random()
            decide, total = bernoulli_decision(draw, p), self._decision_total
        self._decision_total = float(total)
        self._decided = (self._iteration, bool(decide))
        return bool(decide)


def _check_fields(fields: dict[str, Any]) -> None:
    """``ValueError`` naming the first of the six fields that is not a number in its range. A
    step checks them before anything moves, and :meth:`KronPsgd.load_state_dict` before it
    assigns any."""
    for name in _HYPERPARAMETERS:
        value = fields[name]
        if name == "clip" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{name} must be a number; got {value!r}.")
    for name in ("lr", "precond_lr", "weight_decay", "eps"):
        value = fields[name]
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number >= 0; got {value!r}.")
    if not 0.0 <= fields["momentum"] < 1.0:
        raise ValueError(f"momentum must be in [0, 1); got {fields['momentum']!r}.")
    if fields["clip"] is not None and not fields["clip"] > 0:
        raise ValueError(f"clip must be > 0, inf or None; got {fields['clip']!r}.")


def _saved_fields(saved: Any) -> dict[str, Any]:
    """The six fields of a checkpoint, checked as a step checks them: only these may be set from
    it, since ``setattr`` of any other key could replace a method (``lr_scale``) or an option."""
    where = "checkpoint['hyperparameters']"
    check_keys(saved, where, _HYPERPARAMETERS)
    fields = {name: saved[name] for name in _HYPERPARAMETERS}
    try:
        _check_fields(fields)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    return fields


__all__ = ["KronPsgd"]
