"""``kron.keras.Kron``: PSGD-Kron as a Keras 3 optimizer over :mod:`kron.core`.

The class does Keras bookkeeping only: options, the optimizer variables made in ``build``, reading
and writing them around :func:`kron.core.kron_step` (run on the ``keras`` ops backend) in
``update_step``, and ``get_config``. Design choices (see ``docs/keras.md``):

* every piece of state that changes the trajectory is an optimizer variable (factors, Lipschitz
  estimates, momentum, the optional ``P`` cache, a per-variable update count, the decision
  counter, the seed), so ``model.save`` / ``load_model`` and ``stateless_apply`` carry all of it;
* whether to fit the preconditioner is decided from those variables with array ops, and both
  branches are traced once and picked with ``keras.ops.cond``, so a compiled train step never
  retraces; random draws are pure functions of ``(seed, step, variable index, stream)``
  (:mod:`kron.keras.native`);
* preconditioner state is ``precond_dtype`` (float32 by default) whatever the variable dtype;
* weight decay is applied inside ``update_step`` (not by the base class), so that a variable whose
  gradient is not finite is left entirely untouched.

What is not the ``Optimizer`` subclass lives beside it: :mod:`kron.keras.validation` (the checks
of options, variables, gradients and saved state), :mod:`kron.keras.slots` (the optimizer
variables of each model variable) and :mod:`kron.keras.preconditioner` (the preconditioner's
update within a step).
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops as kops

from kron.core import (
    DECISION_RULES,
    FitOptions,
    LayoutOptions,
    Plan,
    StepOptions,
    accumulator_decision,
    counter_decision,
    finite_rows,
    get_ops,
    kron_step,
    make_plan,
    nonzero_rows,
    overflow_limit,
)
from kron.core.option_types import as_python_number, is_real_number
from kron.keras import native, preconditioner, validation
from kron.keras.schedules import UpdateProbability
from kron.keras.slots import add_slots, read_slots, work_dtype, write_slots

OPS = get_ops("keras")


def _size(variable: Any) -> int:
    return math.prod(int(n) for n in variable.shape)


@keras.saving.register_keras_serializable(package="kron")
class Kron(keras.optimizers.Optimizer):
    """PSGD-Kron: SGD preconditioned by a learned Kronecker-factored ``P = QᵀQ``.

    Each variable gets one factor per axis (dense or diagonal, see the layout options), fitted so
    that ``P·g`` is whitened (``P·m`` with ``momentum_into_precond_update``), and the update is
    ``θ ← θ(1 − lr·wd) − lr·clip(P·m)``, with ``m`` the bias-corrected momentum. The options of
    seed 000 (Keras ``Kron``) come first, with its defaults; then Keras's shared ones, then kron's
    own (keyword-only). ``docs/keras.md`` lists each one.

    Args:
      learning_rate: float (finite, >= 0), ``LearningRateSchedule`` or callable. Default 0.0003,
        seed 000's; 0.003 with ``momentum_into_precond_update=False`` did better on the ``kron
        bench`` tasks (docs/benchmarks.md).
      weight_decay: weight decay, decoupled ``θ ← θ(1 − lr·wd)`` unless
        ``decoupled_weight_decay=False``; honours ``exclude_from_weight_decay``. Default 0.0.
      b1: momentum β in [0, 1) (an EMA with bias correction; 0 disables momentum). Default 0.9.
      preconditioner_update_probability: float in [0, 1], a ``LearningRateSchedule`` or callable
        of the step, or None for :class:`UpdateProbability` (1.0 for 500 steps, then decaying to
        0.03).
      max_size_triangular: axes longer than this get a diagonal factor. Default 8192.
      min_ndim_triangular: variables with fewer axes get only diagonal factors. Default 2.
      memory_save_mode: None, ``"one_diag"``, ``"smart_one_diag"``, ``"one_triu"`` or
        ``"all_diag"``. Default None.
      momentum_into_precond_update: fit P on the momentum (True, the default, seed 000's) or on
        the gradient (False). With ``b1=0`` the momentum is the gradient, so both fit the same.
      precond_lr: preconditioner learning rate μ. Default 0.1.
      precond_init_scale: initial ``Q = scale·I``; None sets it per variable from its first
        gradient that is finite and not all zeros, ``(mean g⁴ + δ⁴)^(-1/8)``. Default 1.0.
      mu_dtype: momentum storage dtype (None: the variable's). Default None.
      precond_dtype: dtype of Q and of the preconditioner math. Default ``"float32"``.
      clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum, ema_overwrite_frequency,
        loss_scale_factor, gradient_accumulation_steps: as in every Keras optimizer.
      name: Default ``"kron"``.
      preconditioner_mode: geometry, one of ``kron.core.GEOMETRIES``. Default ``"Q0.5EQ1.5"``.
      whiten_grad: psgd's name for ``not momentum_into_precond_update``; overrides it when given.
      max_skew_triangular: an axis whose square exceeds this times the block's size (the
        variable's, without ``block_size``) gets a diagonal factor (``inf``, the default,
        disables the rule).
      merge_dims: view variables of more than two axes as a matrix: ``True``, the squarest one;
        ``"first_last"``, kron_torch's choice; ``"heavyball"``, heavyball 1.5's. Default False.
      block_size: cut axes longer than this into blocks with their own factors. Default None.
      cached: keep ``P_i = Q_iᵀQ_i`` (one product per axis instead of two on steps that do not
        fit; twice the factor memory). Default True.
      update_clipping, update_clip_value: ``"rms"`` (default; RMS ≤ 1.1, kron_torch's),
        ``"value"`` (each entry ≤ the value) or None.
      decision_rule: ``"counter"`` (default, kron_torch), ``"accumulator"`` or ``"bernoulli"``.
      beta_lipschitz, damping, damping_rule, norm_bound: ``kron.core.FitOptions``. Defaults 0.9,
        1e-9, ``"elementwise"``, ``"power"``.
      balance_probability: chance per fit of rebalancing the factors' norms. Default 0.01.
      decoupled_weight_decay: ``θ ← θ(1 − lr·wd)`` (True, default) or ``g ← g + wd·θ`` before
        the momentum and the preconditioner (False): seed 000's ``decoupled`` flag.
      seed: seed of every random draw, in [0, 2³¹). Default 0.
      nonfinite: ``"skip"`` (default): a variable whose gradient holds a NaN or Inf is left
        untouched, with its optimizer state; ``"raise"``: ``FloatingPointError``.
    """

    def __init__(
        self,
        learning_rate: Any = 0.0003,
        weight_decay: float = 0.0,
        b1: float = 0.9,
        preconditioner_update_probability: Any = None,
        max_size_triangular: int = 8192,
        min_ndim_triangular: int = 2,
        memory_save_mode: str | None = None,
        momentum_into_precond_update: bool = True,
        precond_lr: float = 0.1,
        precond_init_scale: float | None = 1.0,
        mu_dtype: Any = None,
        precond_dtype: Any = "float32",
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: int | None = None,
        loss_scale_factor: float | None = None,
        gradient_accumulation_steps: int | None = None,
        name: str = "kron",
        *,
        preconditioner_mode: str = "Q0.5EQ1.5",
        whiten_grad: bool | None = None,
        max_skew_triangular: float = math.inf,
        merge_dims: bool | str = False,
        block_size: int | None = None,
        cached: bool = True,
        update_clipping: str | None = "rms",
        update_clip_value: float = 1.1,
        decision_rule: str = "counter",
        beta_lipschitz: float = 0.9,
        damping: float = 1e-9,
        damping_rule: str = "elementwise",
        norm_bound: str = "power",
        balance_probability: float = 0.01,
        decoupled_weight_decay: bool = True,
        seed: int = 0,
        nonfinite: str = "skip",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=as_python_number(weight_decay),
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            name=name,
            **kwargs,
        )
        # What a store saved before the optimizer was built holds (iterations, a float lr).
        self._unbuilt_variable_count = len(self.variables)
        validation.check_options(
            learning_rate=learning_rate,
            b1=b1,
            weight_decay=weight_decay,
            preconditioner_update_probability=preconditioner_update_probability,
            max_size_triangular=max_size_triangular,
            min_ndim_triangular=min_ndim_triangular,
            momentum_into_precond_update=momentum_into_precond_update,
            precond_lr=precond_lr,
            precond_init_scale=precond_init_scale,
            whiten_grad=whiten_grad,
            max_skew_triangular=max_skew_triangular,
            block_size=block_size,
            cached=cached,
            update_clip_value=update_clip_value,
            beta_lipschitz=beta_lipschitz,
            damping=damping,
            balance_probability=balance_probability,
            decoupled_weight_decay=decoupled_weight_decay,
            seed=seed,
        )
        self.decoupled_weight_decay = decoupled_weight_decay
        self.b1 = as_python_number(b1)
        self.preconditioner_update_probability = (
            float(preconditioner_update_probability)
            if is_real_number(preconditioner_update_probability)
            else preconditioner_update_probability
        )
        self.max_size_triangular = as_python_number(max_size_triangular)
        self.min_ndim_triangular = as_python_number(min_ndim_triangular)
        self.memory_save_mode = memory_save_mode
        self.momentum_into_precond_update = momentum_into_precond_update
        self.precond_lr = as_python_number(precond_lr)
        self.precond_init_scale = as_python_number(precond_init_scale)
        self.mu_dtype = validation.dtype_name(mu_dtype, "mu_dtype", None)
        self.precond_dtype = validation.dtype_name(precond_dtype, "precond_dtype", "float32")
        self.preconditioner_mode = preconditioner_mode
        self.whiten_grad = whiten_grad
        self.max_skew_triangular = as_python_number(max_skew_triangular)
        self.merge_dims = merge_dims
        self.block_size = as_python_number(block_size)
        self.cached = cached
        self.update_clipping = validation.choice(
            update_clipping, "update_clipping", validation.UPDATE_CLIPPINGS
        )
        self.update_clip_value = as_python_number(update_clip_value)
        self.decision_rule = validation.choice(decision_rule, "decision_rule", DECISION_RULES)
        self.beta_lipschitz = as_python_number(beta_lipschitz)
        self.damping = as_python_number(damping)
        self.damping_rule = damping_rule
        self.norm_bound = norm_bound
        self.balance_probability = as_python_number(balance_probability)
        self.seed = int(seed)
        self.nonfinite = validation.choice(nonfinite, "nonfinite", validation.NONFINITE_POLICIES)
        self._step_options = self._build_step_options()  # the core validates the rest
        self._schedule = (
            UpdateProbability()
            if preconditioner_update_probability is None
            else preconditioner_update_probability
        )

    # -- options -------------------------------------------------------------------------------

    def _build_step_options(self) -> StepOptions:
        layout = LayoutOptions(
            max_size=self.max_size_triangular,
            max_skew=self.max_skew_triangular,
            min_ndim_dense=self.min_ndim_triangular,
            memory_save_mode=self.memory_save_mode,
            merge_dims=self.merge_dims,
            block_size=self.block_size,
        )
        whiten_momentum = (
            not self.whiten_grad
            if self.whiten_grad is not None
            else self.momentum_into_precond_update
        )
        return StepOptions(
            layout=layout,
            fit=FitOptions(
                geometry=self.preconditioner_mode,
                beta_lipschitz=self.beta_lipschitz,
                damping=self.damping,
                damping_rule=self.damping_rule,
                norm_bound=self.norm_bound,
            ),
            beta=self.b1,
            momentum_rule="debiased_ema",
            whiten_momentum=whiten_momentum,
            cache=self.cached,
            clip_rms=self.update_clip_value if self.update_clipping == "rms" else None,
            clip_max=self.update_clip_value if self.update_clipping == "value" else None,
        )

    @property
    def step_options(self) -> StepOptions:
        """The :class:`kron.core.StepOptions` every variable is stepped with."""
        return self._step_options

    def plan(self, variable: Any) -> Plan:
        """The factor layout (:class:`kron.core.Plan`) of a variable of this shape."""
        return make_plan(tuple(variable.shape), self._step_options.layout)

    # -- state ---------------------------------------------------------------------------------

    def build(self, var_list: list) -> None:
        """Create the optimizer variables: ``seed`` and ``decision_counter``, then per model
        variable ``momentum``, ``q{i}``, ``lipschitz{i}``, ``p{i}`` (when cached) and ``count``,
        in that fixed order (Keras saves optimizer variables by position)."""
        if self.built:
            return
        validation.check_floating(var_list)
        super().build(var_list)
        if len(var_list) > native.MAX_VARIABLES:
            raise ValueError(f"Kron supports at most {native.MAX_VARIABLES} variables.")
        self._seed_state = self.add_variable(
            (), initializer=keras.initializers.Constant(self.seed), dtype="int32", name="seed"
        )
        self._decision_counter = self.add_variable((), dtype="float32", name="decision_counter")
        # A variable without elements has nothing to precondition or update: no plan and no
        # slots, as Keras's own optimizers treat it (a no-op).
        self._plans = tuple(self.plan(v) if _size(v) else None for v in var_list)
        self._slots = tuple(
            None if plan is None else add_slots(self, v, plan)
            for v, plan in zip(var_list, self._plans)
        )

    @property
    def _work_dtype(self) -> str:
        """The gradient's and the momentum average's dtype (:func:`kron.keras.slots.work_dtype`)."""
        return work_dtype(self.precond_dtype)

    # -- the step ------------------------------------------------------------------------------

    def apply(self, grads: list, trainable_variables: list | None = None) -> None:
        """Keras's ``apply``, after checking that each gradient has its variable's shape:
        broadcasting let a ``(3,)`` gradient step a ``(4, 3)`` variable, and other shapes failed
        deep in the step without naming the variable. Shapes are static, so this costs nothing
        in a compiled step."""
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)
        known = self._trainable_variables if trainable_variables is None else trainable_variables
        validation.check_gradient_shapes(grads, known)
        return super().apply(grads, trainable_variables)

    def _apply_weight_decay(self, variables: list) -> None:
        """Weight decay is applied in :meth:`update_step`, gated on a finite gradient."""

    def _backend_update_step(self, grads: list, trainable_variables: list, learning_rate) -> None:
        checks = self._nonfinite_checks(grads, trainable_variables)
        with native.after(checks):  # nothing moves until every gradient has passed
            super()._backend_update_step(grads, trainable_variables, learning_rate)
            if self.decision_rule != "bernoulli":  # every update_step has read the old counter
                _, counter = self._decide()
                self.assign(self._decision_counter, counter)

    def _nonfinite_checks(self, grads: list, variables: list) -> list:
        """With ``nonfinite="raise"``, check every gradient before any variable is updated, so
        the step that raises moves nothing: eagerly this raises at once; in a ``tf.function`` it
        returns the assertions that the updates wait on."""
        if self.nonfinite != "raise":
            return []
        limit = overflow_limit(self.precond_dtype)
        past = ", or past float16's range (precond_dtype)" if limit < math.inf else ""
        checks = []
        for gradient, variable in zip(grads, variables):
            index = self._get_variable_index(variable)
            plan = self._plans[index]
            if plan is None:  # an empty variable
                continue
            grad = kops.expand_dims(kops.cast(gradient, self._work_dtype), 0)
            bad = kops.logical_not(finite_rows(grad, OPS, limit)[0])
            message = f"Kron: non-finite gradient{past} for variable {index} of shape {plan.shape}."
            checks.append(native.raise_if(bad, message))
        return [check for check in checks if check is not None]

    def _decide(self) -> tuple[Any, Any]:
        """``(fit?, new decision counter)`` for this step: a pure function of the iteration and
        the stored counter, so every variable's ``update_step`` computes the same answer."""
        step = self.iterations
        probability = self._schedule
        if callable(probability):  # of a float32 step, as seed 000 called it
            value = probability(kops.cast(step, "float32"))
            probability = validation.probability_value(value, step)
        counter = kops.convert_to_tensor(self._decision_counter)
        if self.decision_rule == "bernoulli":
            seed = kops.convert_to_tensor(self._seed_state)
            return native.uniform(seed, step, 0, native.DECISION) < probability, counter
        decide = counter_decision if self.decision_rule == "counter" else accumulator_decision
        return decide(counter, probability, OPS)

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        index = self._get_variable_index(variable)
        plan, slots = self._plans[index], self._slots[index]
        if plan is None:  # an empty variable
            return
        work = self._work_dtype
        grad = kops.expand_dims(kops.cast(gradient, work), 0)
        limit = overflow_limit(self.precond_dtype)
        finite = finite_rows(grad, OPS, limit)[0]  # "raise" checked them all before this step
        grad = kops.where(finite, grad, kops.zeros_like(grad))
        if self._decays(index) and not self.decoupled_weight_decay:  # g ← g + wd·θ
            theta = kops.expand_dims(kops.cast(variable, work), 0)
            grad = grad + kops.cast(self.weight_decay, work) * theta * kops.cast(finite, work)
        old, count = read_slots(slots, work)
        fit, _ = self._decide()
        factors, lipschitz, cache = preconditioner.update(
            old,
            grad,
            count,
            finite,
            fit,
            plan=plan,
            key=preconditioner.DrawKey(self._seed, lambda: self.iterations, index),
            settings=self._fit_settings(),
        )
        state = old._replace(factors=factors, lipschitz=lipschitz, cache=cache)
        y, new = kron_step(
            state,
            grad,
            count,
            None,
            plan=plan,
            options=self._step_options,
            precond_lr=self.precond_lr,
            do_fit=False,
            ops=OPS,
        )
        new = new._replace(momentum=kops.where(finite, new.momentum, old.momentum))
        counted = finite
        if self.precond_init_scale is None:
            # Leading all-zero gradients (a LoRA factor whose partner starts at zero) are not
            # counted: the automatic scale, taken at count 0, would fall back to 1.0 for good.
            # Such a step moves nothing (a zero momentum, preconditioned), so the scale and the
            # momentum start from the first nonzero gradient, as for a fresh variable.
            waiting = kops.logical_and(count == 0, kops.logical_not(nonzero_rows(grad, OPS)[0]))
            counted = kops.logical_and(finite, kops.logical_not(waiting))
        write_slots(self, slots, new, counted)
        self._apply_update(
            variable, index, kops.where(finite, y[0], kops.zeros_like(y[0])), finite, learning_rate
        )

    def _fit_settings(self) -> preconditioner.FitSettings:
        """The options the preconditioner's update reads, read when a step is traced."""
        return preconditioner.FitSettings(
            options=self._step_options,
            precond_lr=self.precond_lr,
            balance_probability=self.balance_probability,
            norm_bound=self.norm_bound,
            damping=self.damping,
            dtype=self.precond_dtype,
            scale_from_gradient=self.precond_init_scale is None,
        )

    def _seed(self) -> Any:
        """The seed, read where a draw is keyed (see :func:`kron.keras.preconditioner.update`)."""
        return kops.convert_to_tensor(self._seed_state)

    def _decays(self, index: int) -> bool:
        """Whether weight decay applies to variable ``index``."""
        return bool(self.weight_decay) and self._use_weight_decay(self._trainable_variables[index])

    def _apply_update(self, variable, index, y, finite, learning_rate) -> None:
        """``θ ← θ − lr·(y + wd·θ)`` (decoupled; the coupled decay went into the gradient); the
        decay term is dropped for a non-finite gradient."""
        dtype = keras.backend.standardize_dtype(variable.dtype)
        lr = kops.cast(learning_rate, dtype)
        step = kops.cast(y, dtype)
        if self.decoupled_weight_decay and self._decays(index):
            decay = kops.cast(self.weight_decay, dtype) * kops.cast(finite, dtype)
            step = step + decay * kops.convert_to_tensor(variable)
        self.assign_sub(variable, lr * step)

    # -- serialisation -------------------------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        probability = self.preconditioner_update_probability
        if callable(probability):
            probability = keras.saving.serialize_keras_object(probability)
        config.update(
            b1=self.b1,
            preconditioner_update_probability=probability,
            max_size_triangular=self.max_size_triangular,
            min_ndim_triangular=self.min_ndim_triangular,
            memory_save_mode=self.memory_save_mode,
            momentum_into_precond_update=self.momentum_into_precond_update,
            precond_lr=self.precond_lr,
            precond_init_scale=self.precond_init_scale,
            mu_dtype=self.mu_dtype,
            precond_dtype=self.precond_dtype,
            preconditioner_mode=self.preconditioner_mode,
            whiten_grad=self.whiten_grad,
            max_skew_triangular=self.max_skew_triangular,
            merge_dims=self.merge_dims,
            block_size=self.block_size,
            cached=self.cached,
            update_clipping=self.update_clipping,
            update_clip_value=self.update_clip_value,
            decision_rule=self.decision_rule,
            beta_lipschitz=self.beta_lipschitz,
            damping=self.damping,
            damping_rule=self.damping_rule,
            norm_bound=self.norm_bound,
            balance_probability=self.balance_probability,
            decoupled_weight_decay=self.decoupled_weight_decay,
            seed=self.seed,
            nonfinite=self.nonfinite,
        )
        return config

    def load_own_variables(self, store: Any) -> None:
        """Load the saved optimizer variables, refusing a store that does not fit. Keras's
        version only warns when the counts differ and keeps none of the state (``iterations``
        back to 0), and a count that matches with other shapes fails half-way through. A store
        whose count and shapes fit loads as Keras loads it. An optimizer that is not built yet
        (``load_model`` builds it first) is left to Keras, which warns and loads nothing."""
        if not self.built or len(store.keys()) == self._unbuilt_variable_count:
            # Unbuilt here, or saved unbuilt (a model saved before fit): Keras warns and loads
            # nothing, as for its own optimizers; there is no state to lose.
            super().load_own_variables(store)
            return
        validation.check_saved_count(self.name, len(store.keys()), len(self.variables))
        values = [store[str(i)] for i in range(len(self.variables))]
        validation.check_saved_shapes(self.name, self.variables, values)
        for variable, value in zip(self.variables, values):
            variable.assign(value)

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> Kron:
        config = dict(config)
        probability = config.get("preconditioner_update_probability")
        if isinstance(probability, dict):
            config["preconditioner_update_probability"] = keras.saving.deserialize_keras_object(
                probability, custom_objects=custom_objects
            )
        return super().from_config(config, custom_objects=custom_objects)
