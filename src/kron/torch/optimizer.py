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

The class keeps the order of things and the hooks ``DistributedKron`` overrides; the work is in
functions: the per-bucket step in :mod:`kron.torch.bucket_step`, fit decisions in
:mod:`~kron.torch.decisions`, gradient checks in :mod:`~kron.torch.gradients`, a parameter's
state in :mod:`~kron.torch.state`, option checks in :mod:`~kron.torch.options`, checkpoint
loading in :mod:`~kron.torch.loading`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from kron.core import STATE_IS_P, LayoutOptions, StepOptions, kron_step, make_plan
from kron.core.option_types import as_python_number
from kron.torch.bucket_step import fresh_kron_step, step_bucket
from kron.torch.decisions import (
    DEFAULT_SCHEDULE,
    Decision,
    advance_clock,
    decide,
    group_context,
)
from kron.torch.functional import Streams, autocast_disabled, newton_gradients
from kron.torch.functional import clipper as clipper  # benchmarks/torch_temporaries.py reads it
from kron.torch.gradients import check_dense_gradients, raise_on_nonfinite
from kron.torch.loading import checked_load, copy_saved_state, hooks_suspended
from kron.torch.options import (
    GROUP_ALIASES,
    cached_records,
    check_hvp_methods,
    check_ranges,
    check_seed,
    check_settings,
    check_types,
    merge_alias,
    new_group,
)
from kron.torch.stacks import StateStacks
from kron.torch.state import DEFAULT_PRECOND_DTYPE as DEFAULT_PRECOND_DTYPE
from kron.torch.state import check_layout


class Kron(torch.optim.Optimizer):
    """PSGD-Kron: SGD preconditioned by a learned Kronecker-factored ``P = QᵀQ``.

    The options of kron_torch's ``Kron`` come first, in its order (positional calls mean the
    same), with its defaults except four: the learning rate and the fitting target, chosen together
    by measurement, ``merge_dims``, heavyball's default, and ``precond_dtype``, bfloat16 here
    (float32 there); then, keyword-only, those
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
        (the momentum stored in ``mu_dtype``); triangular solves, the Lipschitz estimates and
        each Procrustes rotation's step size run in at least float32, the rotation's products
        in this dtype.
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
      nonfinite: ``"skip"`` (default): a parameter whose gradient has a NaN or Inf (or, with
        float16 factors, an entry of 65520 or more in magnitude) is left untouched this step
        and counted in ``state[p]["skipped"]``; ``"raise"`` raises ``FloatingPointError``
        (this one synchronises with the device).
      stack_params: step same-shape parameters in one batched call. Default True.
      compile: compile the per-bucket math with ``torch.compile``; ``None`` (default) compiles
        on accelerators and runs eagerly on the CPU. On the CPU ``True`` compiles the steps
        that fit (0.70-0.83x the eager step's time on the benchmark models, run to run, after
        tens of seconds of compiling) and leaves the others eager, where compiled ones were slower.
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
        check_settings(nonfinite, resync)
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
        self._geometries: dict[int, str] = {}  # group index -> geometry at its last (tried) step

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
        param_group = new_group(param_group, self._SETTINGS, len(self.param_groups))
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
        """The core's option records for ``group``, built once per distinct set of values
        (:func:`kron.torch.options.cached_records`); raises ``ValueError`` on a bad value."""
        return cached_records(self._records, group)

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
        with autocast_disabled():  # the products run in precond_dtype, as the user chose
            self._step_all(decisions, probes, hvps)
        if self.resync:
            self._resync_if_due(clocks)
        return loss

    def _step_all(self, decisions, probes, hvps) -> None:
        """Step every group. Every group's record options (``RECORD_KEYS``, checked again
        whenever one changes) and the layout of every parameter's stored factors are checked
        before any parameter moves: a group edited into a bad value there raises with nothing
        updated, and the step can be retried once the value is fixed. ``lr``,
        ``weight_decay``, ``precond_lr``, ``mars_gamma`` and ``warmup_steps`` are checked when
        a group is added, as ``torch.optim`` checks its own, not on every step. A hook:
        ``DistributedKron`` steps only what its rank owns."""
        work = []
        try:
            for gi, group in enumerate(self.param_groups):
                members = self._members(group)
                if members:  # else nothing to step: the clock and decision counter stand still
                    context = self._group_context(gi, group, decisions[gi])
                    self._check_layouts(gi, members, context[0])
                    work.append((gi, group, members, context))
            for gi, group, members, context in work:
                for bucket in self._buckets(members):
                    self._step_bucket(gi, group, bucket, *context, probes, hvps)
                self._advance_clock(group, decisions[gi])
        finally:
            self._complex_of.clear()

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

    def _decide(self, gi: int, group: dict[str, Any]) -> Decision:
        """Whether ``group`` fits its preconditioner on this step, decided on the host (no
        device sync). Pure: ``_step_all`` commits the new counter once the group has stepped."""
        return decide(gi, group, self.seed, self._default_schedule, self._schedule_first_step)

    def _newton_gradients(self, closure, newton, decisions, probes, hvps):
        """The closure's loss, with the gradients and Hessian-vector products of the Newton-type
        groups ``newton``: :func:`kron.torch.functional.newton_gradients`."""
        check_hvp_methods(self.param_groups)  # again: a group's hvp_method may have been edited
        return newton_gradients(
            self.param_groups, self.seed, self._streams, closure, newton, decisions, probes, hvps
        )

    def _check_gradients(self) -> None:
        """Before anything is updated: reject sparse gradients and, with ``nonfinite="raise"``,
        non-finite ones (the gradients the closure, if any, has just computed)."""
        check_dense_gradients(self.param_groups)
        if self.nonfinite == "raise":
            self._raise_on_nonfinite()

    def _raise_on_nonfinite(self) -> None:
        """A hook: ``DistributedKron`` agrees across ranks on the first bad gradient."""
        raise_on_nonfinite(self.param_groups)

    def _members(self, group: dict[str, Any]) -> list[tuple[int, torch.Tensor]]:
        """``(index, param)`` for the group's parameters that have a gradient, complex ones as
        their real views (:meth:`_as_real`). An empty parameter has nothing to precondition or
        update (torch.optim steps it as a no-op too)."""
        return [
            (index, self._as_real(p))
            for index, p in enumerate(group["params"])
            if p.grad is not None and p.numel() > 0
        ]

    def _check_layouts(self, gi: int, members: list, layout: LayoutOptions) -> None:
        """``ValueError`` (:func:`kron.torch.state.check_layout`) when stored factors were made
        under other layout options than the group's ``layout`` now gives. One parameter with
        state per shape is read, as the bucket step reads one per stack: a layout option edited
        between steps changes the plan of every parameter of a shape alike."""
        checked = set()
        for index, p in members:
            shape = tuple(p.shape)
            state = self._state_for(p)
            if shape not in checked and state:
                check_layout(gi, index, make_plan(shape, layout), state["factors"])
                checked.add(shape)

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
        self._check_geometry(gi, group, options.fit.geometry)
        return group_context(gi, group, decision, self.seed, layout, options)

    def _check_geometry(self, gi: int, group: dict[str, Any], geometry: str) -> None:
        """``ValueError`` when a group that has stepped had its ``preconditioner_mode`` moved
        between a geometry that keeps Q and one that keeps P (PRO4P, QUAD4P): its factors would
        be read as the other kind, with the same shapes. Known from the geometry of the group's
        last step on this optimizer, so a copy, or a load (whose groups bring their own mode),
        starts afresh."""
        last = self._geometries.get(gi)
        if (
            last is not None
            and group["step"] > 0
            and (last in STATE_IS_P) != (geometry in STATE_IS_P)
        ):
            kinds = {True: "P itself", False: "Q"}
            raise ValueError(
                f"preconditioner_mode of group {gi} was edited from {last!r}, whose factors are "
                f"{kinds[last in STATE_IS_P]}, to {geometry!r}, whose factors are "
                f"{kinds[geometry in STATE_IS_P]}, after the group's first step. Move between "
                f"geometries of one kind (Q: EQ, QEQ, Q0.5EQ1.5, QUAD, QEP; P: PRO4P, QUAD4P), "
                f"or start a new optimizer."
            )
        self._geometries[gi] = geometry

    _advance_clock = staticmethod(advance_clock)

    def _state_for(self, p: torch.Tensor) -> dict[str, Any]:
        """The state of the parameter that ``p`` stands for. A hook: ``DistributedKron`` steps
        full-size stand-ins for sharded (DTensor) parameters and keeps state on the parameter."""
        return self.state[self._complex_of.get(id(p), p)]

    def _step_bucket(self, gi, group, members, layout, options, do_fit, do_balance, probes, hvps):
        """One ``kron_step`` for same-shape parameters ``members`` (``(index, param)`` pairs):
        :func:`kron.torch.bucket_step.step_bucket`."""
        step_bucket(self, gi, group, members, layout, options, do_fit, do_balance, probes, hvps)

    def _compiled_step(self, plan, options, do_fit, size, dtype, device) -> Callable:
        """``kron_step``, compiled once per (plan, options, fit or not, stack size, dtype) when
        ``compile`` is on (by default on accelerators only; the docstring of :class:`Kron` says
        why). On the CPU only steps that fit are compiled: one that does not is a few products
        and passes, which the compiled graph's guards and calls per bucket made slower than the
        eager step (benchmarks/RESULTS.md, *PyTorch against the peers*, the bullet on where
        the LM's p = 0.03 step goes)."""
        enabled = self.compile if self.compile is not None else device.type != "cpu"
        if not enabled or (device.type == "cpu" and not do_fit):
            return kron_step
        key = (plan, options, do_fit, size, dtype, device)
        if key not in self._compiled:
            self._compiled[key] = torch.compile(fresh_kron_step(), dynamic=False)
        return self._compiled[key]

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
        with hooks_suspended(
            self, "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"
        ):
            self._load(state_dict)
        for hook in list(self._optimizer_load_state_dict_post_hooks.values()):
            hook(self)

    def _load(self, state_dict: dict[str, Any]) -> None:
        """``load_state_dict`` without its hooks. A hook: ``DistributedKron`` keeps the state of
        the parameters its rank owns."""
        state_dict, seed = checked_load(
            state_dict, self.param_groups, self.seed, self._validate, self._options
        )
        super().load_state_dict(state_dict)
        # The noise is drawn from (seed, step, ...), so a run resumes only with its own seed.
        self.seed = seed
        self._stacks.clear()
        self._geometries.clear()
        copy_saved_state(self.state, state_dict, self.param_groups)

    def state_dict(self) -> dict[str, Any]:
        """As ``torch.optim.Optimizer.state_dict``, plus the ``seed`` the noise is drawn with;
        callables in the param groups (schedules, clipping functions) are left out so that
        ``torch.load(weights_only=True)`` can read it. The post-hooks see the finished dict."""
        with hooks_suspended(self, "_optimizer_state_dict_post_hooks"):
            state = super().state_dict()
        for group in state["param_groups"]:
            for key in [k for k, v in group.items() if callable(v)]:
                del group[key]
        state["seed"] = self.seed
        for hook in list(self._optimizer_state_dict_post_hooks.values()):
            changed = hook(self, state)
            state = state if changed is None else changed
        return state
