"""``kron.torch.Kron``: PSGD-Kron as a ``torch.optim.Optimizer``.

The class does bookkeeping only: options, param groups, state, when to fit, stacking. The math is
:func:`kron.core.kron_step` on the torch ops backend. Design choices (see ``docs/torch.md``):

* parameters of one group with the same shape, dtype and device are stacked and stepped in one
  batched call;
* the decision to fit the preconditioner is made on the host from counters kept in the param
  group, so ``step()`` never synchronises with the device; randomness is counter-based from
  ``(seed, step, group, parameter index)``;
* preconditioner state stays in ``precond_dtype`` (bfloat16 by default) whatever the parameter
  dtype, including after ``load_state_dict``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import numbers
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch

from kron.core import (
    LayoutOptions,
    StepOptions,
    accumulator_decision,
    balance,
    bernoulli_decision,
    counter_decision,
    exponential_schedule,
    finite_rows,
    fourth_moment,
    init_factors,
    init_lipschitz,
    kron_step,
    make_plan,
    mars_correction,
    overflow_limit,
    probability_at,
    scale_from_moments,
    select_state,
)
from kron.core.option_types import as_python_number
from kron.torch.functional import (
    OPS,
    Streams,
    apply_caution,
    clipper,
    concat,
    hessian_vector_products,
    stack,
    stochastic_round,
    uniform_for,
)
from kron.torch.loading import (
    check_clock,
    check_is_kron_state,
    check_saved_state,
    loaded_seed,
)
from kron.torch.options import (
    GROUP_ALIASES,
    NONFINITE_POLICIES,
    RECORD_KEYS,
    check_hvp_methods,
    check_parameter_dtype,
    check_ranges,
    check_seed,
    check_types,
    core_records,
    group_with_our_names,
    merge_alias,
    torch_dtype,
)
from kron.torch.stacks import StateStacks, pack_triangles, unpack_triangles

DEFAULT_SCHEDULE = exponential_schedule()
# bfloat16 factors were level with float32 ones or better on 12 of the 13 `kron bench` tasks
# (the deep linear network ended up to 1.7× higher) and made the benchmark MLP's step 0.66× as
# long on a CPU with bfloat16 instructions (docs/benchmarks.md, *The preconditioner dtype*);
# the algorithm's author defaults his DDP wrapper to bfloat16 too.
DEFAULT_PRECOND_DTYPE = torch.bfloat16

# Stream identifiers mixed into the counter-based seeds.
_NOISE, _PROBE, _SUBSPACE, _ROUNDING, _BALANCE, _DECISION = range(6)


class _Decision(NamedTuple):
    """A group's fit decision for one step: whether to fit, the probability it came from, and
    the decision rule's counter after this step."""

    fit: bool
    probability: float
    total: float


class Kron(torch.optim.Optimizer):
    """PSGD-Kron: SGD preconditioned by a learned Kronecker-factored ``P = QᵀQ``.

    The options of kron_torch's ``Kron`` come first, in its order (positional calls mean the
    same), with its defaults except three: the learning rate and the fitting target, chosen
    together by measurement, and ``merge_dims``, heavyball's default; then, keyword-only, those
    of heavyball's ``PSGDKron``; then kron's own. Every option except ``seed``, ``nonfinite``,
    ``stack_params``, ``compile`` and ``resync`` can be overridden per param group.
    ``docs/torch.md`` lists each one.

    Args:
      params: parameters or param groups.
      lr: learning rate. Default 3e-3 (kron_torch's is 3e-4, heavyball's 1e-3); chosen on the
        ``kron bench`` tasks together with the fitting target (docs/benchmarks.md, *The default
        learning rate and fitting target*).
      b1: momentum β. Default 0.9.
      weight_decay: weight decay. Default 0.
      preconditioner_update_probability: float or callable of the step; ``None`` is kron_torch's
        schedule (1.0 for 500 steps, then decaying to 0.03).
      max_size_triangular, min_ndim_triangular, memory_save_mode: which axes get dense factors.
      momentum_into_precond_update: fit P on the momentum (True, kron_torch's and heavyball's
        default) or on the gradient (False, the default, as psgd_torch and psgdax).
      precond_lr: preconditioner learning rate μ. Default 0.1.
      precond_init_scale: initial ``Q = scale·I``; ``None`` sets it from the first gradient.
      mu_dtype: momentum storage dtype (default: the parameter's). bfloat16 storage is
        stochastically rounded.
      precond_dtype: dtype of the factors, of the cache and of the products (the fit's
        included). Default bfloat16. The gradient and momentum are handled in at least float32
        (the momentum stored in ``mu_dtype``); triangular solves and Procrustes rotations run in
        float32 whatever it is.
      merge_dims: view parameters of more than two axes as a matrix: ``True``, the squarest one;
        ``"first_last"``, kron_torch's choice; or, ``"heavyball"``, fold the trailing axes as
        heavyball's ``merge_dims=True`` does (see :class:`kron.core.LayoutOptions`). Default
        False (heavyball's; kron_torch merges by its rule).
      split: cut axes longer than ``max_size_triangular`` into blocks (as ``block_size``).
      store_triu_as_line: keep each dense factor as the line of its upper triangle between
        steps, about half its memory, at the cost of unpacking it on every step and packing it
        after each fit (heavyball's option; its default is True). Needs
        ``preconditioner_mode="EQ"``. Default False.
      cached: keep ``P_i = Q_iᵀQ_i``; ``None`` (default) caches once the update probability is
        below 0.5.
      delayed: apply the previous step's P, then fit (heavyball's ``delayed``). Default False.
      exp_avg_input: precondition the momentum (True) or the raw gradient. Default True.
      stochastic_schedule: draw the fit decision (True) instead of the deterministic rule.
      warmup_steps: linear learning-rate warm-up, heavyball's ``lr·t/max(t, warmup_steps + 1)``
        on step ``t`` counted from 1. Default 0.
      caution: cautious updates. mars, mars_gamma: MARS gradient correction.
      q_dtype, storage_dtype: heavyball's names for ``precond_dtype`` and ``mu_dtype``.
      beta, foreach: heavyball's names for ``b1`` and ``stack_params``.
      gradient_clipping, gradient_clip_value: clip each gradient before use: ``"rms"``,
        ``"l2_norm"``, ``"value"``, ``"soft"``, heavyball's names ``"rmsnorm_clip_"``,
        ``"l2_clip_"`` and ``"trust_region_clip_"`` (``"rms"`` and ``"l2_norm"`` at 1.0,
        ``"soft"`` at 1.5, whatever the value), a callable, or None (default).
      update_clipping, update_clip_value: same for the preconditioned update, before
        ``caution``. Default ``"rms"`` at 1.1, kron_torch's clip.
      preconditioner_mode: geometry, one of ``kron.core.GEOMETRIES``. Default ``"Q0.5EQ1.5"``.
      whiten_grad: psgd_torch's name for ``not momentum_into_precond_update``; overrides it when
        given.
      max_skew: psgd_torch's skew rule (``inf`` disables it, the default).
      block_size: cut axes longer than this into blocks. Default None.
      decoupled_weight_decay: ``θ ← θ(1 - lr·wd)`` (True, default) or ``g ← g + wd·θ``.
      decision_rule: ``"counter"`` (default), ``"accumulator"`` or ``"bernoulli"``.
      beta_lipschitz, damping, damping_rule, norm_bound: see ``kron.core.FitOptions``.
      balance_probability: chance per fit of rebalancing factor norms. Default 0.01.
      preconditioner_type: ``"whitening"`` (default) or ``"newton"``; Newton fits P on
        Hessian-vector products and needs ``step(closure)`` with a closure that returns the loss
        without calling ``backward``.
      hvp_method: ``"double_backward"`` (default) or ``"finite_difference"``.
      seed: seed of every random draw. Default 0.
      nonfinite: ``"skip"`` (default): a parameter whose gradient has a NaN or Inf is left
        untouched this step and counted in ``state[p]["skipped"]``; ``"raise"`` raises
        ``FloatingPointError`` (this one synchronises with the device).
      stack_params: step same-shape parameters in one batched call. Default True.
      compile: compile the per-bucket math with ``torch.compile``; ``None`` (default) compiles
        on accelerators and runs eagerly on the CPU. On the CPU ``True`` compiles the steps
        that fit (0.76-0.83x the eager step's time on the benchmark models, after tens of
        seconds of compiling) and leaves the others eager, where compiled ones were slower.
      resync: with replicated training (DDP), every ``resync`` steps of a group broadcast its
        parameters and their state (Q, L, cache, momentum, ...) from rank 0 of the default process
        group, to cancel floating-point drift between replicas. ``None`` or 0 (default): never.
        Needs an initialised ``torch.distributed`` process group. See ``docs/distributed.md``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 3e-3,
        b1: float = 0.9,
        weight_decay: float = 0.0,
        preconditioner_update_probability: float | Callable[[int], float] | None = None,
        max_size_triangular: int = 8192,
        min_ndim_triangular: int = 2,
        memory_save_mode: str | None = None,
        momentum_into_precond_update: bool = False,
        precond_lr: float = 0.1,
        precond_init_scale: float | None = 1.0,
        merge_dims: bool | str = False,
        mu_dtype: torch.dtype | str | None = None,
        precond_dtype: torch.dtype | str | None = None,
        *,
        split: bool = False,
        store_triu_as_line: bool = False,
        cached: bool | None = None,
        delayed: bool = False,
        exp_avg_input: bool = True,
        stochastic_schedule: bool = False,
        warmup_steps: int = 0,
        caution: bool = False,
        mars: bool = False,
        mars_gamma: float = 0.0025,
        q_dtype: torch.dtype | str | None = None,
        storage_dtype: torch.dtype | str | None = None,
        beta: float | None = None,
        foreach: bool | None = None,
        gradient_clipping: str | Callable[[torch.Tensor], torch.Tensor] | None = None,
        gradient_clip_value: float = 1.0,
        update_clipping: str | Callable[[torch.Tensor], torch.Tensor] | None = "rms",
        update_clip_value: float = 1.1,
        preconditioner_mode: str = "Q0.5EQ1.5",
        whiten_grad: bool | None = None,
        max_skew: float = math.inf,
        block_size: int | None = None,
        decoupled_weight_decay: bool = True,
        decision_rule: str = "counter",
        beta_lipschitz: float = 0.9,
        damping: float = 1e-9,
        damping_rule: str = "elementwise",
        norm_bound: str = "power",
        balance_probability: float = 0.01,
        preconditioner_type: str = "whitening",
        hvp_method: str = "double_backward",
        seed: int = 0,
        nonfinite: str = "skip",
        stack_params: bool = True,
        compile: bool | None = None,
        resync: int | None = None,
    ) -> None:
        precond_dtype = merge_alias(precond_dtype, "precond_dtype", q_dtype, "q_dtype")
        mu_dtype = merge_alias(mu_dtype, "mu_dtype", storage_dtype, "storage_dtype")
        b1 = merge_alias(b1, "b1", beta, "beta", default=0.9)
        stack_params = merge_alias(stack_params, "stack_params", foreach, "foreach", default=True)
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"Unknown nonfinite {nonfinite!r}; accepted: {', '.join(NONFINITE_POLICIES)}."
            )
        if resync is not None and (
            isinstance(resync, bool) or not isinstance(resync, int) or resync < 0
        ):
            raise ValueError(f"resync must be a non-negative int or None; got {resync!r}.")
        if resync:
            from kron.torch.distributed.replicas import require_process_group

            require_process_group(None, f"Kron(resync={resync})")
        defaults = dict(
            lr=lr,
            b1=b1,
            weight_decay=weight_decay,
            preconditioner_update_probability=preconditioner_update_probability,
            max_size_triangular=max_size_triangular,
            min_ndim_triangular=min_ndim_triangular,
            memory_save_mode=memory_save_mode,
            momentum_into_precond_update=momentum_into_precond_update,
            precond_lr=precond_lr,
            precond_init_scale=precond_init_scale,
            mu_dtype=mu_dtype,
            precond_dtype=precond_dtype,
            merge_dims=merge_dims,
            split=split,
            store_triu_as_line=store_triu_as_line,
            cached=cached,
            delayed=delayed,
            exp_avg_input=exp_avg_input,
            stochastic_schedule=stochastic_schedule,
            warmup_steps=warmup_steps,
            caution=caution,
            mars=mars,
            mars_gamma=mars_gamma,
            gradient_clipping=gradient_clipping,
            gradient_clip_value=gradient_clip_value,
            update_clipping=update_clipping,
            update_clip_value=update_clip_value,
            preconditioner_mode=preconditioner_mode,
            whiten_grad=whiten_grad,
            max_skew=max_skew,
            block_size=block_size,
            decoupled_weight_decay=decoupled_weight_decay,
            decision_rule=decision_rule,
            beta_lipschitz=beta_lipschitz,
            damping=damping,
            damping_rule=damping_rule,
            norm_bound=norm_bound,
            balance_probability=balance_probability,
            preconditioner_type=preconditioner_type,
            hvp_method=hvp_method,
        )
        seed = check_seed(seed)
        if not isinstance(stack_params, bool):
            raise ValueError(f"stack_params must be True or False; got {stack_params!r}.")
        if compile is not None and not isinstance(compile, bool):
            raise ValueError(f"compile must be True, False or None; got {compile!r}.")
        defaults = {k: as_python_number(v) for k, v in defaults.items()}
        self.seed = seed
        self.nonfinite = nonfinite
        self.stack_params = stack_params
        self.compile = compile
        self.resync = resync or None
        self._reset_caches()
        super().__init__(params, defaults)

    # Options kept on the optimizer rather than in its groups: pickling and copy.deepcopy carry
    # them (torch.optim's own state is defaults, state and param_groups).
    _SETTINGS = ("seed", "nonfinite", "stack_params", "compile", "resync")
    # What a group's preconditioner_update_probability=None means; subclasses with another
    # peer's defaults replace it (kept on the class, so the groups hold nothing unpicklable).
    _default_schedule = staticmethod(DEFAULT_SCHEDULE)
    # The count a schedule is called with on a group's first step: kron_torch's 0 (its
    # ``_prob_step`` starts at 0 and grows after the call); heavyball's classes count from 1.
    _schedule_first_step = 0

    def _reset_caches(self) -> None:
        """What the optimizer derives from its groups and state and rebuilds when it must."""
        self._compiled: dict[Any, Callable] = {}
        self._streams = Streams()
        self._masks: dict[Any, torch.Tensor] = {}
        self._precond_lrs: dict[Any, tuple[float, torch.Tensor]] = {}
        self._records: dict[tuple, tuple[LayoutOptions, StepOptions]] = {}
        self._stacks = StateStacks()
        self._complex_of: dict[int, torch.Tensor] = {}  # id(real view) -> complex parameter

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({name: getattr(self, name) for name in self._SETTINGS})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._reset_caches()

    # -- param groups and validation -----------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Validate the group as it will be (defaults filled in) before torch installs it, so a
        # rejected group leaves the optimizer unchanged.
        param_group = group_with_our_names(param_group)
        # heavyball's foreach is stack_params, one value for the whole optimizer too.
        global_only = [name for name in (*self._SETTINGS, "foreach") if name in param_group]
        if global_only:
            raise ValueError(
                f"{', '.join(global_only)} cannot be set per param group (one value serves "
                "the whole optimizer); pass it to the constructor."
            )
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif not isinstance(params, set):  # torch refuses sets, as unordered, with its message
            params = list(params)  # a generator is read once, here
        for index, p in enumerate(params):
            if isinstance(p, torch.Tensor) and p.is_sparse:
                raise ValueError(
                    f"Kron does not support sparse parameters (parameter {index} of the new "
                    f"group, shape {tuple(p.shape)}); accepted: dense tensors."
                )
            if isinstance(p, torch.Tensor):  # torch refuses anything else itself
                check_parameter_dtype(p, index, len(self.param_groups))
        # NumPy numbers are kept as Python ones: torch.load(weights_only=True) reads no others.
        param_group = {k: as_python_number(v) for k, v in param_group.items()}
        param_group["params"] = params
        full = {**self.defaults, **param_group}
        self._validate(full)
        check_hvp_methods([*self.param_groups, full])
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("step", 0)
        group.setdefault("decision_total", 0.0)

    def _validate(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the option and value for anything of the wrong type or
        out of range."""
        check_types(group)
        check_ranges(group)
        self._options(group)  # builds the core's records, which check everything else

    def _options(self, group: dict[str, Any]) -> tuple[LayoutOptions, StepOptions]:
        """The core's option records for ``group`` (built once per distinct set of values);
        raises ``ValueError`` on a bad value. Values are keyed with their types: ``1 == True``,
        so ``merge_dims=1`` would otherwise find the records of ``merge_dims=True``, unchecked."""
        key = tuple((type(group[name]), group[name]) for name in RECORD_KEYS)
        try:
            records = self._records.get(key)
        except TypeError:  # an unhashable value (a dataclass schedule, a list): build, not cache
            return core_records(group)
        if records is None:
            if len(self._records) > 64:  # options changed by hand many times; start afresh
                self._records.clear()
            records = self._records[key] = core_records(group)
        return records

    # -- the step ------------------------------------------------------------------------------

    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimisation step. ``closure`` re-evaluates the model: for whitening it may call
        ``backward`` as usual; for Newton-type groups it must return the loss *without* calling
        ``backward`` (the optimizer differentiates it to get gradients and Hessian-vector
        products)."""
        for group in self.param_groups:  # heavyball's name set on a group since it was added
            for alias in GROUP_ALIASES.keys() & group.keys():
                group[GROUP_ALIASES[alias]] = group.pop(alias)
        decisions = [self._decide(gi, group) for gi, group in enumerate(self.param_groups)]
        probes: dict[int, torch.Tensor] = {}
        hvps: dict[int, torch.Tensor] = {}
        loss = None
        newton = [
            (gi, group)
            for gi, group in enumerate(self.param_groups)
            if group["preconditioner_type"] == "newton"
        ]
        if newton:
            if closure is None:
                raise ValueError("Newton-type preconditioning needs step(closure).")
            loss = self._newton_gradients(closure, newton, decisions, probes, hvps)
        elif closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_gradients()
        clocks = [group["step"] for group in self.param_groups]
        with _autocast_disabled():  # the products run in precond_dtype, as the user chose
            self._step_all(decisions, probes, hvps)
        if self.resync:
            self._resync_if_due(clocks)
        return loss

    def _step_all(self, decisions, probes, hvps) -> None:
        """Step every group. A hook: ``DistributedKron`` steps only what its rank owns."""
        for gi, group in enumerate(self.param_groups):
            self._step_group(gi, group, decisions[gi], probes, hvps)

    def _resync_if_due(self, clocks: list[int]) -> None:
        """Broadcast the parameters and state of every group whose clock just reached a multiple
        of ``resync`` from rank 0 (replicas drift apart only by floating-point noise)."""
        due = [
            p
            for group, before in zip(self.param_groups, clocks)
            if group["step"] != before and group["step"] % self.resync == 0
            for p in group["params"]
        ]
        if due:
            from kron.torch.distributed.replicas import broadcast_state

            broadcast_state(self, due)

    def _decide(self, gi: int, group: dict[str, Any]) -> _Decision:
        """Whether ``group`` fits its preconditioner on this step, decided on the host (no
        device sync). Pure: ``_step_group`` commits the new counter once the group has stepped."""
        step = group["step"]
        schedule = group["preconditioner_update_probability"]
        if schedule is None:
            schedule = self._default_schedule
        count = step + self._schedule_first_step  # the count the schedule is called with
        p = float(probability_at(schedule, count))
        if not 0 < p <= 1:
            raise ValueError(
                f"preconditioner_update_probability gave {p!r} for step count {count} of group "
                f"{gi}; it must be in (0, 1]."
            )
        rule = "bernoulli" if group["stochastic_schedule"] else group["decision_rule"]
        if rule == "bernoulli":
            draw = uniform_for(self.seed, step, gi, _DECISION)
            return _Decision(bool(bernoulli_decision(draw, p)), p, group["decision_total"])
        decide = counter_decision if rule == "counter" else accumulator_decision
        do_fit, total = decide(group["decision_total"], p, np)
        return _Decision(bool(do_fit), p, float(total))

    def _newton_gradients(self, closure, newton, decisions, probes, hvps):
        check_hvp_methods(self.param_groups)  # again: a group's hvp_method may have been edited
        everything = [p for group in self.param_groups for p in group["params"]]
        for p in everything:
            if not p.requires_grad:
                p.grad = None  # frozen parameters must not step on a stale gradient
        params = [p for p in everything if p.requires_grad]
        if not params:  # all frozen: nothing to differentiate or step, as in torch.optim
            with torch.enable_grad():
                loss = closure()
            return loss.detach() if isinstance(loss, torch.Tensor) else loss
        newton_params = []
        for gi, group in newton:
            for index, p in enumerate(group["params"]):
                if p.is_complex():
                    raise ValueError(
                        f"Newton-type preconditioning does not support complex parameters "
                        f"(parameter {index} of group {gi}, {p.dtype}); accepted: real "
                        f"floating-point parameters, or preconditioner_type='whitening'."
                    )
            if not decisions[gi].fit:
                continue
            for index, p in enumerate(group["params"]):
                if p.requires_grad:
                    words = (self.seed, group["step"], gi, index, _PROBE)
                    probes[id(p)] = self._streams.normal(p.shape, p.dtype, p.device, words)
                    newton_params.append(p)
        if not newton_params:
            with torch.enable_grad():
                loss = closure()
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            loss = loss.detach()
        else:
            loss, grads, products = hessian_vector_products(
                closure,
                params,
                newton_params,
                [probes[id(p)] for p in newton_params],
                newton[0][1]["hvp_method"],
            )
            hvps.update({id(p): h for p, h in zip(newton_params, products)})
        for p, g in zip(params, grads):
            p.grad = None if g is None else g
        return loss

    def _check_gradients(self) -> None:
        """Before anything is updated: reject sparse gradients and, with ``nonfinite="raise"``,
        non-finite ones (the gradients the closure, if any, has just computed)."""
        for gi, group in enumerate(self.param_groups):
            for index, p in enumerate(group["params"]):
                if p.grad is not None and p.grad.is_sparse:
                    raise ValueError(
                        f"Kron does not support sparse gradients (parameter {index} of group "
                        f"{gi}, shape {tuple(p.shape)}); use a dense gradient."
                    )
        if self.nonfinite == "raise":
            self._raise_on_nonfinite()

    def _raise_on_nonfinite(self) -> None:
        """A hook: ``DistributedKron`` agrees across ranks on the first bad gradient."""
        for gi, group in enumerate(self.param_groups):
            for index, p in enumerate(group["params"]):
                if p.grad is not None and not usable_gradient(p.grad, group):
                    past = "" if _gradient_limit(group) == math.inf else _PAST_FLOAT16
                    raise FloatingPointError(
                        f"Non-finite gradient{past} in parameter {index} of group {gi} (shape "
                        f"{tuple(p.shape)}); nothing was updated."
                    )

    def _step_group(self, gi, group, decision, probes, hvps) -> None:
        members = []
        for index, p in enumerate(group["params"]):
            # An empty parameter has nothing to precondition or update (torch.optim steps it as
            # a no-op too).
            if p.grad is not None and p.numel() > 0:
                members.append((index, self._as_real(p)))
        if not members:  # nothing to step: the group's clock and decision counter stand still
            return
        context = self._group_context(gi, group, decision)
        try:
            for bucket in self._buckets(members):
                self._step_bucket(gi, group, bucket, *context, probes, hvps)
        finally:
            self._complex_of.clear()
        self._advance_clock(group, decision)

    def _as_real(self, p: torch.Tensor) -> torch.Tensor:
        """``p``, or for a complex parameter its real view ``(*p.shape, 2)`` carrying the real
        view of its gradient, as ``torch.optim`` steps complex parameters: a real optimizer over
        the real and imaginary parts. The view shares ``p``'s storage, so the update lands in
        ``p``, and its state is ``p``'s (see :meth:`_state_for`)."""
        if not p.is_complex():
            return p
        view = torch.view_as_real(p)
        view.grad = torch.view_as_real(p.grad)
        self._complex_of[id(view)] = p
        return view

    def _buckets(self, members: list[tuple[int, torch.Tensor]]) -> list[list]:
        """``(index, param)`` pairs split into same-shape, dtype and device stacks (one per
        parameter without ``stack_params``), in order of first appearance."""
        buckets: dict[Any, list[tuple[int, torch.Tensor]]] = {}
        for index, p in members:
            key = (tuple(p.shape), p.dtype, p.device)
            if not self.stack_params:
                key = (*key, index)
            buckets.setdefault(key, []).append((index, p))
        return list(buckets.values())

    def _group_context(self, gi, group, decision) -> tuple[LayoutOptions, StepOptions, bool, bool]:
        """``(layout, options, do_fit, do_balance)`` for this step of a group: the same on every
        rank, since they derive from the group's counters and the seed only."""
        layout, options = self._options(group)
        use_cache = group["cached"] if group["cached"] is not None else decision.probability < 0.5
        if use_cache:
            options = dataclasses.replace(options, cache=True)
        balance_draw = uniform_for(self.seed, group["step"], gi, _BALANCE)
        do_balance = decision.fit and balance_draw < group["balance_probability"]
        return layout, options, decision.fit, do_balance

    @staticmethod
    def _advance_clock(group: dict[str, Any], decision: _Decision) -> None:
        group["decision_total"] = decision.total
        group["step"] = group["step"] + 1

    def _state_for(self, p: torch.Tensor) -> dict[str, Any]:
        """The state of the parameter that ``p`` stands for. A hook: ``DistributedKron`` steps
        full-size stand-ins for sharded (DTensor) parameters and keeps state on the parameter."""
        return self.state[self._complex_of.get(id(p), p)]

    def _init_state(self, group, p, plan, options, probes, hvps) -> dict[str, Any]:
        # The moments behind the automatic scale are taken in at least float32: a bfloat16 mean
        # of g⁴ over a large tensor would be mostly rounding.
        dtype = torch_dtype(group["precond_dtype"], "precond_dtype") or DEFAULT_PRECOND_DTYPE
        moment_dtype = torch.promote_types(dtype, torch.float32)
        scale = group["precond_init_scale"]
        if scale is None and id(p) in hvps:  # Newton: (E v²)^¼ (E h⁴)^(-1/8), algorithm.md §2.4
            v, h = probes[id(p)].to(moment_dtype), hvps[id(p)].to(moment_dtype)
            scale = scale_from_moments(
                fourth_moment(h, OPS), OPS, group["damping"], probe_second=(v * v).mean()
            )
        elif scale is None:
            grad = p.grad.to(moment_dtype)
            scale = scale_from_moments(fourth_moment(grad, OPS), OPS, group["damping"])
        state = self._state_for(p)
        state.update(initial_state(group, p, plan, options, scale))
        return state

    def _mask(self, plan, stack_size, dtype, device):
        key = (plan, stack_size, dtype, device)
        if key not in self._masks:
            mask = plan.mask()
            self._masks[key] = (
                None
                if mask is None
                else torch.as_tensor(
                    np.concatenate([mask] * stack_size), dtype=dtype, device=device
                )
            )
        return self._masks[key]

    def _precond_lr(self, gi, value, dtype, device) -> torch.Tensor:
        """The group's preconditioner learning rate as a 0-d tensor on ``device``, so a changed
        value never recompiles the step. It is refreshed in place (a kernel with a scalar
        argument): a CPU tensor or ``torch.tensor(value, device=...)`` would cost a blocking
        host-to-device copy per bucket and step."""
        key = (gi, dtype, device)
        if isinstance(value, torch.Tensor):  # may be edited in place, as schedulers edit lr
            held = self._precond_lrs.get(key, (None, None))[1]
            if held is None:
                held = torch.empty((), dtype=dtype, device=device)
                self._precond_lrs[key] = (None, held)
            return held.copy_(value.reshape(()))
        if key not in self._precond_lrs:
            self._precond_lrs[key] = (value, torch.full((), value, dtype=dtype, device=device))
        held_value, held = self._precond_lrs[key]
        if held_value != value:
            held.fill_(value)
            self._precond_lrs[key] = (value, held)
        return held

    def _step_bucket(self, gi, group, members, layout, options, do_fit, do_balance, probes, hvps):
        """One ``kron_step`` for same-shape parameters ``members`` (``(index, param)`` pairs)."""
        plan = make_plan(tuple(members[0][1].shape), layout)
        params = [p for _, p in members]
        states = [
            self._state_for(p) or self._init_state(group, p, plan, options, probes, hvps)
            for p in params
        ]
        factor_dtype = torch_dtype(group["precond_dtype"], "precond_dtype") or DEFAULT_PRECOND_DTYPE
        mu_dtype = torch_dtype(group["mu_dtype"], "mu_dtype")
        for p, state in zip(params, states):  # dtypes edited since the state was made convert now
            if state["factors"][0].dtype != factor_dtype:
                _convert_preconditioner(state, factor_dtype)
            if state["momentum"].dtype != (mu_dtype or p.dtype):
                for key in ("momentum", "previous_grad"):
                    if key in state:
                        state[key] = state[key].to(mu_dtype or p.dtype)
        # The gradient and momentum are handled in at least float32; only the products (and the
        # fit's inputs) are in the factors' dtype, so bfloat16 factors never round the momentum
        # and the float32 state is still stepped in place. Not wider: a float64 gradient past
        # float32's range would overflow the products, so it is skipped as non-finite.
        dtype = torch.promote_types(factor_dtype, torch.float32)
        size = len(params)
        grads, finite, all_finite = self._gather_gradients(gi, group, params, states, dtype)
        clipped_grads = grads  # what MARS remembers as the previous gradient
        if group["mars"]:
            for p, s in zip(params, states):  # mars switched on after the first step: as at init
                if "previous_grad" not in s:
                    s["previous_grad"] = torch.zeros_like(p, dtype=s["momentum"].dtype)
            previous = stack([s["previous_grad"] for s in states]).to(dtype)
            grads = mars_correction(grads, previous, group["b1"], group["mars_gamma"], OPS)
        if group["weight_decay"] and not group["decoupled_weight_decay"]:
            grads = grads + group["weight_decay"] * stack([p.detach() for p in params]).to(dtype)
        _check_layout(gi, members[0][0], plan, states[0]["factors"])
        bucket = (gi, tuple(plan.shape), dtype, grads.device)
        indices = tuple(index for index, _ in members)
        old = unpack_triangles(
            self._stacks.gather(bucket, indices, states, plan.order, dtype), plan
        )
        fit_inputs = self._fit_inputs(gi, group, members, plan, factor_dtype, do_fit, probes, hvps)
        step_fn = self._compiled_step(plan, options, do_fit, size, dtype, grads.device)
        count = self._step_counts(states, len(plan.shape), step_fn is kron_step, dtype)
        # With every gradient known finite the old momentum is never restored, so the eager step
        # updates the optimizer's own stack in place: one large temporary and one copy fewer
        # (compiled steps plan their own buffers).
        donate = all_finite and step_fn is kron_step and self._stacks.owns(bucket, old)
        extra = dict(donate_momentum=True) if donate else {}
        y, new = step_fn(
            old,
            grads,
            count,
            plan=plan,
            options=options,
            ops=OPS,
            precond_lr=self._precond_lr(gi, group["precond_lr"], factor_dtype, grads.device),
            do_fit=do_fit,
            mask=self._mask(plan, size, factor_dtype, grads.device),
            **fit_inputs,
            **extra,
        )
        if do_balance:
            new = new._replace(factors=tuple(balance(new.factors, OPS)))
        # y is a fresh temporary of the step's, so the named clips may overwrite it; all_finite
        # holds only on the CPU (see _gather_gradients), where reading the norms is free.
        clip_update = clipper(
            group["update_clipping"],
            group["update_clip_value"],
            in_place=True,
            read_norms=all_finite,
        )
        if clip_update is not None:
            y = clip_update(y)
        # Caution is heavyball's option and comes after the clip, as in heavyball (the clip is
        # the last link of its chain, caution part of the parameter update): its rescale by the
        # inverse kept fraction may take the update past the clip's bound.
        if group["caution"]:
            y = apply_caution(y, grads)
        if not all_finite:
            new = select_state(finite, new, old, plan.num_blocks, OPS)
            y = y * finite.view(-1, *[1] * len(plan.shape)).to(dtype)
        self._update_params(group, params, y, finite, all_finite)
        packed = group["store_triu_as_line"]
        if not (group["mars"] or packed) and self._stacks.store_in_place(bucket, old, new):
            self._count_steps(states, finite, all_finite)
            return
        self._write_back(
            gi, group, members, states, plan, old, new, clipped_grads, finite, all_finite
        )
        if packed:  # the state holds lines, not views of the square stack
            self._stacks.forget(bucket)
        else:
            self._stacks.remember(bucket, indices, states, new, dtype)

    @staticmethod
    def _step_counts(states, ndim: int, eager: bool, dtype: torch.dtype) -> torch.Tensor | float:
        """The parameters' step counts, ``(S, 1, …, 1)``, for the momentum's weights: in the
        stack's ``dtype`` but never narrower than float32 (float64 stacks get float64 weights,
        as from a number; a bfloat16 stack's counts stay exact past 256). An eager CPU step
        whose parameters share one count gets it as a number: the weights are then host
        arithmetic rather than five tiny tensor operations (a CPU tensor reads for free; a
        compiled step would specialise on the number and recompile every step). Its counts
        that differ are float64, the precision of a number, so that a parameter's weight does
        not depend on whether its stack mates missed a step (stacked or not, Kron or
        DistributedKron, the same bits)."""
        counts = [state["count"] for state in states]
        wide = torch.promote_types(dtype, torch.float32)
        if eager and counts[0].device.type == "cpu":
            first = counts[0].item()
            if all(c.item() == first for c in counts[1:]):
                return first
            wide = torch.float64
        return stack(counts).to(wide).view(-1, *[1] * ndim)

    def _update_params(self, group, params, y, finite, all_finite) -> None:
        """``θ ← θ·(1 - lr·wd) - lr·y`` in each parameter's own dtype (a float64 parameter is
        never rounded through the float32 preconditioner)."""
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):  # one element, checked; alpha= takes only a 0-d tensor
            lr = lr.reshape(())
        if group["warmup_steps"]:
            lr = lr * warmup_factor(group["step"] + 1, group["warmup_steps"])
        decay = 1.0 - lr * group["weight_decay"] if group["decoupled_weight_decay"] else 1.0
        if decay != 1.0:
            if all_finite:
                torch._foreach_mul_(params, decay)
            else:
                factors = torch.where(finite, decay, 1.0)
                torch._foreach_mul_(params, [factors[s].to(p.dtype) for s, p in enumerate(params)])
        # An in-place add promotes, so each parameter takes y in its own dtype with no cast (and
        # no operation) per slice.
        torch._foreach_add_(params, list(y.unbind(0)), alpha=-lr)

    def _compiled_step(self, plan, options, do_fit, size, dtype, device) -> Callable:
        """``kron_step``, compiled once per (plan, options, fit or not, stack size, dtype) when
        ``compile`` is on (by default on accelerators only; the docstring of :class:`Kron` says
        why). On the CPU only steps that fit are compiled: one that does not is a few products
        and passes, which the compiled graph's guards and calls per bucket made slower than the
        eager step (benchmarks/RESULTS.md, the PyTorch table)."""
        enabled = self.compile if self.compile is not None else device.type != "cpu"
        if not enabled or (device.type == "cpu" and not do_fit):
            return kron_step
        key = (plan, options, do_fit, size, dtype, device)
        if key not in self._compiled:
            self._compiled[key] = torch.compile(fresh_kron_step(), dynamic=False)
        return self._compiled[key]

    def _gather_gradients(self, gi, group, params, states, dtype):
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
            return self._clip_gradients(group, grads), torch.ones(size, dtype=torch.bool), True
        finite = finite_rows(grads.reshape(size, -1), OPS, limit)
        all_finite = on_cpu and bool(finite.all())
        if not all_finite:
            grads = torch.where(finite.view(-1, *[1] * (grads.ndim - 1)), grads, 0.0)
        return self._clip_gradients(group, grads), finite, all_finite

    @staticmethod
    def _clip_gradients(group, grads):
        clip_grad = clipper(group["gradient_clipping"], group["gradient_clip_value"])
        return grads if clip_grad is None else clip_grad(grads)

    def _fit_inputs(self, gi, group, members, plan, dtype, do_fit, probes, hvps):
        """The random and Newton inputs of a fit (all None on steps that do not fit)."""
        if not do_fit:
            return dict(noise=None)
        device, step = members[0][1].device, group["step"]

        def draw(shape, *words):
            return concat(
                [
                    self._streams.normal(shape, dtype, device, (self.seed, step, gi, index, *words))
                    for index, _ in members
                ]
            )

        inputs = dict(noise=draw((plan.num_blocks, *plan.block_shape), _NOISE))
        if group["norm_bound"] == "subspace":
            inputs["norm_probes"] = [
                draw((plan.num_blocks, 32, n), _SUBSPACE, axis)
                for axis, n in enumerate(plan.block_shape)
            ]
        if group["preconditioner_type"] == "newton":
            for key, source in (("probe", probes), ("hvp", hvps)):
                stacked = stack([source[id(p)] for _, p in members]).to(dtype)
                inputs[key] = plan.to_blocks(stacked, OPS, stacked=True)
        return inputs

    @staticmethod
    def _count_steps(states, finite, all_finite) -> None:
        """Add one to each parameter's ``count`` if its gradient was finite, else to ``skipped``,
        in place (no host synchronisation: ``finite`` stays on the device)."""
        counts = [state["count"] for state in states]
        if all_finite:
            torch._foreach_add_(counts, 1.0)
            return
        torch._foreach_add_(counts, list(finite.to(counts[0].dtype).unbind(0)))
        skipped = [state["skipped"] for state in states]
        torch._foreach_add_(skipped, list((~finite).to(skipped[0].dtype).unbind(0)))

    def _write_back(
        self, gi, group, members, states, plan, old, new, clipped_grads, finite, all_finite
    ):
        """Store each parameter's slice of the stacked state."""
        nb, step = plan.num_blocks, group["step"]
        self._count_steps(states, finite, all_finite)
        factors = new.factors
        if group["store_triu_as_line"]:
            # A factor the step left as it was is still in the stored lines: no packing.
            stored = states[0]["factors"]
            unchanged = tuple(
                i
                for i, (f, g) in enumerate(zip(new.factors, old.factors))
                if f is g and stored[i].ndim == f.ndim - plan.dense[i]
            )
            factors = pack_triangles(factors, plan, unchanged)
        for s, ((index, _), state) in enumerate(zip(members, states)):
            state["factors"] = [
                state["factors"][i] if f is None else f[s * nb : (s + 1) * nb]
                for i, f in enumerate(factors)
            ]
            state["lipschitz"] = [f[s * nb : (s + 1) * nb] for f in new.lipschitz]
            state["cache"] = [f[s * nb : (s + 1) * nb] for f in new.cache]
            state["momentum"] = stochastic_round(
                new.momentum[s],
                state["momentum"].dtype,
                (self.seed, step, gi, index, _ROUNDING),
                self._streams,
            )
            if group["mars"]:
                kept = (
                    clipped_grads[s]
                    if all_finite
                    else torch.where(
                        finite[s], clipped_grads[s], state["previous_grad"].to(clipped_grads.dtype)
                    )
                )
                state["previous_grad"] = kept.to(state["previous_grad"].dtype)

    # -- checkpoints ---------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, except that preconditioner and momentum
        state keep the dtype they were saved with (torch would cast them to the parameter dtype,
        turning a float32 Q into bfloat16 for bfloat16 parameters), and the state is copied (torch
        would alias the caller's tensors and update them in place). Options missing from the saved
        groups (callables are not saved) keep their current values. The load hooks run as
        torch runs them: the pre-hooks on the dict before anything is read from it, the
        post-hooks once the state is in place."""
        state_dict = dict(state_dict)
        for hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
            changed = hook(self, state_dict)
            state_dict = state_dict if changed is None else changed
        with _hooks_suspended(
            self, "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"
        ):
            self._load(state_dict)
        for hook in list(self._optimizer_load_state_dict_post_hooks.values()):
            hook(self)

    def _load(self, state_dict: dict[str, Any]) -> None:
        """``load_state_dict`` without its hooks."""
        # A torch.distributed.checkpoint round trip turns the integer state keys into strings.
        state_dict = {
            **state_dict,
            "state": {
                (int(k) if isinstance(k, str) and k.isdigit() else k): v
                for k, v in state_dict["state"].items()
            },
        }
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):  # zip below would drop the extra groups
            raise ValueError(
                f"loaded state dict has {len(groups)} parameter groups; this optimizer has "
                f"{len(self.param_groups)}"
            )
        check_is_kron_state(state_dict["state"], groups)
        merged = []
        for saved, current in zip(groups, self.param_groups):
            merged.append(
                _as_saved_before({**{k: v for k, v in current.items() if k != "params"}, **saved})
            )
        # Everything is checked before anything is assigned, so a checkpoint that is refused
        # leaves the optimizer as it was, and one that loads does not fail at the next step.
        self._check_loaded_groups(merged)
        self._check_loaded_state(state_dict["state"], merged)
        seed = loaded_seed(state_dict.get("seed", self.seed))
        super().load_state_dict({**state_dict, "param_groups": merged})
        # The noise is drawn from (seed, step, ...), so a run resumes only with its own seed.
        self.seed = seed
        self._stacks.clear()
        saved_ids = [i for g in groups for i in g["params"]]
        current = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, current):
            saved = state_dict["state"].get(saved_id)
            if not saved:  # none, or the empty entry that reading opt.state[p] leaves
                continue
            self.state[p] = {key: _to_device(value, p.device) for key, value in saved.items()}

    def _check_loaded_groups(self, groups: list[dict[str, Any]]) -> None:
        """``ValueError`` naming the group when a loaded group (saved options over the current
        ones) fails a check that a new group passes, or its clock is not a count."""
        for gi, (group, current) in enumerate(zip(groups, self.param_groups)):
            if len(group["params"]) != len(current["params"]):
                raise ValueError(
                    f"loaded state dict has {len(group['params'])} parameters in group {gi}; "
                    f"this optimizer has {len(current['params'])}"
                )
            try:
                self._validate(group)
                check_clock(group)
            except ValueError as error:
                raise ValueError(f"loaded state dict, param group {gi}: {error}") from None
        try:
            check_hvp_methods(groups)
        except ValueError as error:
            raise ValueError(f"loaded state dict: {error}") from None

    def _check_loaded_state(self, saved: dict[Any, Any], groups: list[dict[str, Any]]) -> None:
        """``ValueError`` naming the parameter and the entry when a saved state is not one the
        step can take, for the layout its loaded group gives (see :func:`check_saved_state`)."""
        for gi, (group, current) in enumerate(zip(groups, self.param_groups)):
            layout, _ = self._options(group)
            for index, (saved_id, p) in enumerate(zip(group["params"], current["params"])):
                entry = saved.get(saved_id)
                if entry is None or (isinstance(entry, dict) and not entry):
                    continue  # none, or the empty entry that reading opt.state[p] leaves
                check_saved_state(gi, index, p, entry, layout)

    def state_dict(self) -> dict[str, Any]:
        """As ``torch.optim.Optimizer.state_dict``, plus the ``seed`` the noise is drawn with;
        callables in the param groups (schedules, clipping functions) are left out so that
        ``torch.load(weights_only=True)`` can read it. The post-hooks see the finished dict."""
        with _hooks_suspended(self, "_optimizer_state_dict_post_hooks"):
            state = super().state_dict()
        for group in state["param_groups"]:
            for key in [k for k, v in group.items() if callable(v)]:
                del group[key]
        state["seed"] = self.seed
        for hook in list(self._optimizer_state_dict_post_hooks.values()):
            changed = hook(self, state)
            state = state if changed is None else changed
        return state


def _as_saved_before(group: dict[str, Any]) -> dict[str, Any]:
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


def warmup_factor(t: int, warmup_steps: int) -> float:
    """heavyball's warm-up, ``t / max(t, warmup_steps + 1)`` on step ``t`` counted from 1 (its
    option, so its formula): ``1/(W+1), …, W/(W+1)``, then 1 from step ``W + 1``. With
    ``warmup_steps=1`` the first step takes half the learning rate."""
    return t / max(t, warmup_steps + 1)


def _autocast_disabled() -> contextlib.ExitStack:
    """A context without the autocast that is on (CPU or CUDA), if any: under it the factor
    products would run in bfloat16 or float16 whatever ``precond_dtype`` says."""
    stack = contextlib.ExitStack()
    for device_type in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device_type):
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


@contextlib.contextmanager
def _hooks_suspended(optimizer: torch.optim.Optimizer, *names: str) -> Iterator[None]:
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


_PAST_FLOAT16 = ", or past float16's range (the factors' dtype)"


def fresh_kron_step() -> Callable:
    """``kron_step`` under a fresh code object. Compiled once per key, each copy gets its own
    compile cache, so models with many shapes never hit dynamo's per-function recompile limit
    (and no global setting changes)."""
    fresh = types.FunctionType(
        kron_step.__code__.replace(),
        kron_step.__globals__,
        kron_step.__name__,
        kron_step.__defaults__,
        kron_step.__closure__,
    )
    fresh.__kwdefaults__ = kron_step.__kwdefaults__
    return fresh


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


def _check_layout(gi: int, index: int, plan: Any, factors: list[torch.Tensor]) -> None:
    """``ValueError`` when a parameter's factors were made for another layout than ``plan``,
    the group's options now give (a layout option changed after the first step)."""
    found = [tuple(f.shape) for f in factors]
    blocks = plan.num_blocks
    fits = len(found) == plan.order and all(
        shape in ((blocks, n, n), (blocks, n * (n + 1) // 2)) if dense else shape == (blocks, n)
        for shape, n, dense in zip(found, plan.block_shape, plan.dense)
    )
    if not fits:
        raise ValueError(
            f"The factors of parameter {index} of group {gi} have shapes {found}, made for "
            f"another layout than the group's options now give ({blocks} block(s) of "
            f"{plan.block_shape}, dense axes {plan.dense}). Options that set the layout "
            "(block_size, split, merge_dims, max_size_triangular, min_ndim_triangular, "
            "memory_save_mode, max_skew) cannot change after a parameter's first step."
        )


def _convert_preconditioner(state: dict[str, Any], dtype: torch.dtype) -> None:
    """``state``'s factors and cache in ``dtype``, its Lipschitz estimates in at least float32."""
    state["factors"] = [f.to(dtype) for f in state["factors"]]
    state["cache"] = [c.to(dtype) for c in state["cache"]]
    wide = torch.promote_types(dtype, torch.float32)
    state["lipschitz"] = [lip.to(wide) for lip in state["lipschitz"]]


def initial_state(
    group: dict[str, Any], p: torch.Tensor, plan: Any, options: StepOptions, scale: float
) -> dict[str, Any]:
    """The state of parameter ``p`` before its first step: zero momentum, ``Q_i = scale^(1/k)·I``
    (or ``P_i``, for the geometries that keep P), the initial Lipschitz estimates, no cache and
    a zero step count, in the dtypes ``group`` asks for."""
    precond_dtype = torch_dtype(group["precond_dtype"], "precond_dtype") or DEFAULT_PRECOND_DTYPE
    mu_dtype = torch_dtype(group["mu_dtype"], "mu_dtype") or p.dtype
    like = torch.zeros((), dtype=precond_dtype, device=p.device)
    factors = init_factors(plan, scale, like, OPS, options.fit.state_is_p)
    if group["store_triu_as_line"]:
        factors = pack_triangles(factors, plan)
    lipschitz_like = torch.zeros(
        (), dtype=torch.promote_types(precond_dtype, torch.float32), device=p.device
    )
    state = {
        "momentum": torch.zeros(p.shape, dtype=mu_dtype, device=p.device),
        "factors": factors,
        "lipschitz": init_lipschitz(plan, lipschitz_like, OPS),
        "cache": [],
        "count": torch.zeros((), dtype=torch.float32, device=p.device),
        "skipped": torch.zeros((), dtype=torch.int64, device=p.device),
    }
    if group["mars"]:
        state["previous_grad"] = torch.zeros(p.shape, dtype=mu_dtype, device=p.device)
    return state


def _to_device(value: Any, device: torch.device) -> Any:
    """A copy of ``value`` on ``device``: the optimizer updates its state in place, and the
    caller's state dict must not change under it."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, copy=True)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    return value
