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
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import keras
import numpy as np
from keras import ops as kops

from kron.core import (
    DECISION_RULES,
    FitOptions,
    LayoutOptions,
    Plan,
    StepOptions,
    TensorState,
    accumulator_decision,
    balance,
    cache_preconditioner,
    counter_decision,
    finite_rows,
    fourth_moment,
    get_ops,
    init_factors,
    kron_step,
    make_plan,
    overflow_limit,
    scale_from_moments,
)
from kron.core.option_types import as_python_number, check_option_types, is_real_number
from kron.keras import native
from kron.keras.schedules import UpdateProbability

_FLOAT16_MAX = 65504.0

OPS = get_ops("keras")
NONFINITE_POLICIES = ("skip", "raise")
UPDATE_CLIPPINGS = ("rms", "value", None)
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
SUBSPACE_PROBES = 32  # rows of the norm-bound probes for norm_bound="subspace" (psgd_torch's)


class _Slots(NamedTuple):
    """The optimizer variables of one model variable (``B`` = blocks of its plan)."""

    momentum: Any  # like the variable, in mu_dtype
    factors: tuple  # Q_i (P_i for PRO4P/QUAD4P): (B, n, n) or (B, n), precond_dtype
    lipschitz: tuple  # L_i: (B,), at least float32
    cache: tuple  # P_i = Q_iᵀQ_i when cached (same shapes as factors), else ()
    count: Any  # float32 scalar: momentum updates taken (steps with a finite gradient)


def _size(variable: Any) -> int:
    return math.prod(int(n) for n in variable.shape)


def _dtype_name(value: Any, name: str, default: str | None) -> str | None:
    """A Keras dtype name from any framework's dtype object or name; ValueError otherwise."""
    if value is None:
        return default
    try:
        dtype = keras.backend.standardize_dtype(value)
    except (ValueError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{name} must be a float dtype ({', '.join(FLOAT_DTYPES)}) or None; got {value!r}."
        ) from error
    if dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be a float dtype ({', '.join(FLOAT_DTYPES)}) or None; got {value!r}."
        )
    return dtype


def _choice(value: Any, name: str, accepted: tuple) -> Any:
    if value not in accepted:
        raise ValueError(f"Unknown {name} {value!r}; accepted: {', '.join(map(repr, accepted))}.")
    return value


def _variable_name(variable: Any) -> str:
    """The Keras path of a variable, or the name of a plain ``tf.Variable`` (which has none)."""
    return getattr(variable, "path", None) or str(variable.name)


def _check_floating(variables: list) -> None:
    """ValueError for a variable that is not floating-point. Its update would be cast to an
    integer (to 0 for a small step), so the step did nothing and said nothing; Keras's own
    optimizers do the same or fail on a dtype clash, and PyTorch cannot make such a variable
    trainable. Models only hand the optimizer their trainable variables, so integer state
    (counters, seed generators) never gets here."""
    for variable in variables:
        dtype = keras.backend.standardize_dtype(variable.dtype)
        if not keras.backend.is_float_dtype(dtype):
            raise ValueError(
                "Kron can only train floating-point variables (float16, bfloat16, float32, "
                f"float64, ...); variable {_variable_name(variable)!r} has dtype {dtype}. Make "
                "it non-trainable or leave it out of the optimizer's variables."
            )


def _check_gradient_shapes(grads: list, variables: list) -> None:
    """ValueError naming the variable and both shapes for a gradient not of its variable's
    shape (a dimension unknown while tracing matches any)."""
    for gradient, variable in zip(grads, variables):
        if gradient is None:  # Keras drops these itself
            continue
        got, want = tuple(gradient.shape), tuple(variable.shape)
        if len(got) != len(want) or any(g is not None and g != w for g, w in zip(got, want)):
            raise ValueError(
                f"Kron: the gradient for variable {_variable_name(variable)!r} has shape {got}, "
                f"and the variable has shape {want}; they must be the same."
            )


def _probability_value(value: Any, step: Any) -> Any:
    """What a ``preconditioner_update_probability`` callable returned, as a float32 scalar.

    A Python or NumPy number is known where it is returned (while tracing, in a compiled step),
    so one outside [0, 1] (NaN included) raises there, as a float option does at construction.
    A tensor is known only when the step runs, where not every backend can raise: it is clipped
    to [0, 1] and NaN counts as 0 (no fit), so the decision counter, which ``"accumulator"``
    adds the probability to, never turns NaN. Anything else raises, naming the option."""
    value = value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value
    if isinstance(value, (bool, np.bool_)):  # "always" or "never", as a tensor bool reads
        value = float(value)
    value = as_python_number(value)
    if is_real_number(value):
        if not 0 <= value <= 1:
            raise ValueError(
                f"preconditioner_update_probability gave {value!r}{_at_step(step)}; it must be "
                "in [0, 1]."
            )
        return kops.convert_to_tensor(float(value), "float32")
    if not (kops.is_tensor(value) or isinstance(value, keras.Variable)):
        raise ValueError(
            "preconditioner_update_probability must return a number in [0, 1] or a scalar "
            f"tensor; it returned {value!r}{_at_step(step)}."
        )
    probability = kops.cast(value, "float32")
    return kops.where(kops.isnan(probability), 0.0, kops.clip(probability, 0.0, 1.0))


def _at_step(step: Any) -> str:
    """`` at step N`` where the step is a concrete number, else (while tracing) nothing."""
    try:
        return f" at step {int(step)}"
    except (TypeError, AttributeError, ValueError):
        # A traced step has no value yet: JAX raises a TypeError, and a Keras variable read in
        # a tf.function an AttributeError.
        return ""


def _constant(value: Any) -> Callable[..., Any]:
    """A Keras initializer returning ``value`` (already of the right shape and dtype)."""

    def initializer(shape: Any, dtype: Any = None) -> Any:
        return kops.cast(value, dtype) if dtype is not None else value

    return initializer


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
        finite gradient, ``(mean g⁴)^(-1/8)``. Default 1.0.
      mu_dtype: momentum storage dtype (None: the variable's). Default None.
      precond_dtype: dtype of Q and of the preconditioner math. Default ``"float32"``.
      clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum, ema_overwrite_frequency,
        loss_scale_factor, gradient_accumulation_steps: as in every Keras optimizer.
      name: Default ``"kron"``.
      preconditioner_mode: geometry, one of ``kron.core.GEOMETRIES``. Default ``"Q0.5EQ1.5"``.
      whiten_grad: psgd's name for ``not momentum_into_precond_update``; overrides it when given.
      max_skew_triangular: an axis whose square exceeds this times the variable size gets a
        diagonal factor (``inf``, the default, disables the rule).
      merge_dims: view variables of more than two axes as a matrix: ``True``, the squarest one;
        ``"first_last"``, kron_torch's choice. Default False.
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
        check_option_types(
            numbers=dict(
                b1=b1,
                precond_lr=precond_lr,
                balance_probability=balance_probability,
                update_clip_value=update_clip_value,
                max_size_triangular=max_size_triangular,
                min_ndim_triangular=min_ndim_triangular,
                max_skew_triangular=max_skew_triangular,
                beta_lipschitz=beta_lipschitz,
                damping=damping,
            ),
            optional_numbers=dict(
                weight_decay=weight_decay,
                precond_init_scale=precond_init_scale,
                block_size=block_size,
            ),
            flags=dict(
                momentum_into_precond_update=momentum_into_precond_update,
                cached=cached,
                decoupled_weight_decay=decoupled_weight_decay,
            ),
            optional_flags=dict(whiten_grad=whiten_grad),
        )
        _check_ranges(
            learning_rate=learning_rate,
            b1=b1,
            weight_decay=weight_decay,
            precond_lr=precond_lr,
            precond_init_scale=precond_init_scale,
            balance_probability=balance_probability,
            update_clip_value=update_clip_value,
            max_size_triangular=max_size_triangular,
            min_ndim_triangular=min_ndim_triangular,
            max_skew_triangular=max_skew_triangular,
            seed=seed,
            probability=preconditioner_update_probability,
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
        self.mu_dtype = _dtype_name(mu_dtype, "mu_dtype", None)
        self.precond_dtype = _dtype_name(precond_dtype, "precond_dtype", "float32")
        self.preconditioner_mode = preconditioner_mode
        self.whiten_grad = whiten_grad
        self.max_skew_triangular = as_python_number(max_skew_triangular)
        self.merge_dims = merge_dims
        self.block_size = as_python_number(block_size)
        self.cached = cached
        self.update_clipping = _choice(update_clipping, "update_clipping", UPDATE_CLIPPINGS)
        self.update_clip_value = as_python_number(update_clip_value)
        self.decision_rule = _choice(decision_rule, "decision_rule", DECISION_RULES)
        self.beta_lipschitz = as_python_number(beta_lipschitz)
        self.damping = as_python_number(damping)
        self.damping_rule = damping_rule
        self.norm_bound = norm_bound
        self.balance_probability = as_python_number(balance_probability)
        self.seed = int(seed)
        self.nonfinite = _choice(nonfinite, "nonfinite", NONFINITE_POLICIES)
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
        _check_floating(var_list)
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
            None if plan is None else self._add_slots(v, plan)
            for v, plan in zip(var_list, self._plans)
        )

    def _add_slots(self, variable: Any, plan: Plan) -> _Slots:
        # A plain tf.Variable has no path; Keras's own optimizers name its slots by its name.
        prefix = getattr(variable, "path", None) or str(variable.name).replace(":", "_")
        prefix = prefix.replace("/", "_")
        options = self._step_options
        momentum = self.add_variable(
            variable.shape,
            dtype=self.mu_dtype or keras.backend.standardize_dtype(variable.dtype),
            name=f"{prefix}_momentum",
        )
        like = kops.zeros((), self.precond_dtype)
        start = init_factors(
            plan, self.precond_init_scale or 1.0, like, OPS, options.fit.state_is_p
        )
        factors = tuple(
            self.add_variable(
                f.shape, _constant(f), dtype=self.precond_dtype, name=f"{prefix}_q{i}"
            )
            for i, f in enumerate(start)
        )
        lipschitz = tuple(
            self.add_variable((f.shape[0],), dtype=self._work_dtype, name=f"{prefix}_lipschitz{i}")
            for i, f in enumerate(start)
        )
        cache = ()
        if self._uses_cache:
            cache = tuple(
                self.add_variable(
                    p.shape, _constant(p), dtype=self.precond_dtype, name=f"{prefix}_p{i}"
                )
                for i, p in enumerate(cache_preconditioner(start, OPS))
            )
        count = self.add_variable((), dtype="float32", name=f"{prefix}_count")
        return _Slots(momentum, factors, lipschitz, cache, count)

    @property
    def _uses_cache(self) -> bool:
        return self._step_options.cache and not self._step_options.fit.state_is_p

    @property
    def _work_dtype(self) -> str:
        """The dtype of the gradient, the momentum's average and the Lipschitz estimates: the
        wider of float32 and ``precond_dtype``. Only the products and the fit run in a
        half-precision ``precond_dtype``, so it neither overflows a finite gradient (float16)
        nor rounds the momentum's average (bfloat16)."""
        return "float64" if self.precond_dtype == "float64" else "float32"

    def _read(self, slots: _Slots) -> tuple[TensorState, Any]:
        """The stored state as tensors (momentum stacked as ``(1, *shape)`` in the work dtype)."""
        read = kops.convert_to_tensor
        momentum = kops.cast(read(slots.momentum), self._work_dtype)
        state = TensorState(
            tuple(read(f) for f in slots.factors),
            tuple(read(f) for f in slots.lipschitz),
            kops.expand_dims(momentum, 0),
            tuple(read(f) for f in slots.cache),
        )
        return state, read(slots.count)

    def _write(self, slots: _Slots, state: TensorState, finite: Any) -> None:
        for variables, values in (
            (slots.factors, state.factors),
            (slots.lipschitz, state.lipschitz),
            (slots.cache, state.cache),
        ):
            for variable, value in zip(variables, values):
                self.assign(variable, value)
        momentum = state.momentum[0]
        stored = keras.backend.standardize_dtype(slots.momentum.dtype)
        if stored == "float16" and keras.backend.standardize_dtype(momentum.dtype) != "float16":
            # A finite momentum past float16's range would be stored as inf and turn the
            # variable to NaN on the next step; the largest finite value is kept instead.
            momentum = kops.clip(momentum, -_FLOAT16_MAX, _FLOAT16_MAX)
        self.assign(slots.momentum, kops.cast(momentum, stored))
        self.assign_add(slots.count, kops.cast(finite, "float32"))

    # -- the step ------------------------------------------------------------------------------

    def apply(self, grads: list, trainable_variables: list | None = None) -> None:
        """Keras's ``apply``, after checking that each gradient has its variable's shape:
        broadcasting let a ``(3,)`` gradient step a ``(4, 3)`` variable, and other shapes failed
        deep in the step without naming the variable. Shapes are static, so this costs nothing
        in a compiled step."""
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)
        known = self._trainable_variables if trainable_variables is None else trainable_variables
        _check_gradient_shapes(grads, known)
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
            probability = _probability_value(probability(kops.cast(step, "float32")), step)
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
        old, count = self._read(slots)
        fit, _ = self._decide()

        def changed() -> tuple[Any, ...]:
            """The first update's automatic init scale, then this step's fit if any."""
            start = old
            if self.precond_init_scale is None:
                start = self._scale_at_first_step(old, grad, count, plan)
            return native.cond(
                fit,
                self._fit(index, plan, start, grad, count, finite),
                lambda: _preconditioner(start),
            )

        # Only the preconditioner's update sits under the conds; applying it runs outside, so a
        # step that does not fit takes the cheap branch and XLA schedules the products freely.
        first = count == 0 if self.precond_init_scale is None else False
        factors, lipschitz, cache = native.cond(
            kops.logical_or(fit, first), changed, lambda: _preconditioner(old)
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
        self._write(slots, new, finite)
        self._apply_update(
            variable, index, kops.where(finite, y[0], kops.zeros_like(y[0])), finite, learning_rate
        )

    def _fit(self, index, plan, old, grad, count, finite) -> Callable[[], tuple[Any, ...]]:
        """The fit branch: ``kron_step``'s preconditioner update (its direction is not used, so
        the compiler drops it), with a random balance after it. The new factors, estimates and
        cache are kept only when the gradient was ``finite``."""

        def run() -> tuple[Any, ...]:
            inputs = self._fit_inputs(index, plan)
            _, new = kron_step(
                old,
                grad,
                count,
                inputs.pop("noise"),
                plan=plan,
                options=self._step_options,
                precond_lr=self.precond_lr,
                do_fit=True,
                ops=OPS,
                mask=self._mask(plan),
                **inputs,
            )
            factors = tuple(new.factors)
            if self.balance_probability > 0 and plan.order > 1:
                draw = native.uniform(self._seed(), self.iterations, index, native.BALANCE)
                factors = native.cond(
                    draw < self.balance_probability,
                    lambda: tuple(balance(factors, OPS)),
                    lambda: factors,
                )
            return (
                _where_tree(finite, tuple(factors), old.factors),
                _where_tree(finite, tuple(new.lipschitz), old.lipschitz),
                _where_tree(finite, tuple(new.cache), old.cache),
            )

        return run

    def _seed(self) -> Any:
        return kops.convert_to_tensor(self._seed_state)

    def _fit_inputs(self, index: int, plan: Plan) -> dict[str, Any]:
        seed, step, dtype = self._seed(), self.iterations, self.precond_dtype
        shape = (plan.num_blocks, *plan.block_shape)
        inputs = {"noise": native.normal(seed, step, index, native.NOISE, shape, dtype)}
        if self.norm_bound == "subspace":
            inputs["norm_probes"] = [
                native.normal(
                    seed,
                    step,
                    index,
                    native.PROBES + axis,
                    (plan.num_blocks, SUBSPACE_PROBES, n),
                    dtype,
                )
                for axis, n in enumerate(plan.block_shape)
            ]
        return inputs

    def _mask(self, plan: Plan) -> Any:
        mask = plan.mask()
        return None if mask is None else kops.convert_to_tensor(mask, self.precond_dtype)

    def _scale_at_first_step(self, state, grad, count, plan) -> TensorState:
        """``precond_init_scale=None``: on a variable's first step, rescale Q (and the cache)
        from that gradient, ``(mean g⁴ + δ⁴)^(-1/8)`` (1.0 for a zero gradient)."""
        scale = scale_from_moments(fourth_moment(grad, OPS), OPS, self.damping)
        if self._step_options.fit.state_is_p:
            scale = scale * scale
        per_factor = kops.where(count == 0, scale ** (1.0 / plan.order), 1.0)
        return state._replace(
            factors=tuple(f * kops.cast(per_factor, f.dtype) for f in state.factors),
            cache=tuple(p * kops.cast(per_factor * per_factor, p.dtype) for p in state.cache),
        )

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
        _check_saved_count(self.name, len(store.keys()), len(self.variables))
        values = [store[str(i)] for i in range(len(self.variables))]
        _check_saved_shapes(self.name, self.variables, values)
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


# The options that change how many optimizer variables there are, or their shapes.
_COUNT_OPTIONS = (
    "learning_rate (a float is saved as a variable, a schedule is not), use_ema, "
    "gradient_accumulation_steps, cached, preconditioner_mode (PRO4P and QUAD4P keep no cache) "
    "and merge_dims (one factor per axis)"
)
_SHAPE_OPTIONS = (
    "max_size_triangular, min_ndim_triangular, max_skew_triangular, memory_save_mode, "
    "merge_dims and block_size"
)


def _check_saved_count(name: str, saved: int, expected: int) -> None:
    """ValueError unless as many optimizer variables were saved as this optimizer has."""
    if saved != expected:
        raise ValueError(
            f"Kron optimizer {name!r} cannot load the saved state: {saved} variables were "
            f"saved and this optimizer has {expected}. The count follows the model's trainable "
            f"variables and the options {_COUNT_OPTIONS}; create the optimizer with the options "
            "it was saved with."
        )


def _check_saved_shapes(name: str, variables: list, values: list) -> None:
    """ValueError for the first saved value whose shape is not its variable's (checked before
    anything is assigned, so a refused store leaves the optimizer as it was)."""
    for index, (variable, value) in enumerate(zip(variables, values)):
        saved, expected = tuple(np.shape(value)), tuple(variable.shape)
        if saved != expected:
            raise ValueError(
                f"Kron optimizer {name!r} cannot load the saved state: variable {index} "
                f"({_variable_name(variable)!r}) was saved with shape {saved} and this "
                f"optimizer's has shape {expected}. The shapes follow the model's trainable "
                f"variables and the options {_SHAPE_OPTIONS}; create the optimizer with the "
                "options it was saved with."
            )


def _preconditioner(state: TensorState) -> tuple[Any, ...]:
    """The parts of ``state`` a fit changes: factors, Lipschitz estimates and cache."""
    return tuple(state.factors), tuple(state.lipschitz), tuple(state.cache)


def _where_tree(flag: Any, new: Any, old: Any) -> Any:
    """``new`` where the scalar ``flag`` holds, else ``old``, over a tensor or tuple of them."""
    if isinstance(new, tuple):
        return tuple(kops.where(flag, a, b) for a, b in zip(new, old))
    return kops.where(flag, new, old)


def _check_ranges(
    *,
    learning_rate,
    b1,
    weight_decay,
    precond_lr,
    precond_init_scale,
    balance_probability,
    update_clip_value,
    max_size_triangular,
    min_ndim_triangular,
    max_skew_triangular,
    seed,
    probability,
) -> None:
    """ValueError naming the option and the value for anything out of range."""
    # Keras takes any float (it refuses other types itself); a NaN, infinite or negative one
    # turned the weights to NaN or climbed the loss from the first step. Schedules and
    # callables are the user's to keep in range.
    if is_real_number(learning_rate) and not (learning_rate >= 0 and math.isfinite(learning_rate)):
        raise ValueError(
            "learning_rate must be finite and >= 0 (or a schedule or callable); got "
            f"{learning_rate!r}."
        )
    if not max_size_triangular >= 0:
        raise ValueError(f"max_size_triangular must be >= 0; got {max_size_triangular!r}.")
    if not (min_ndim_triangular >= 0 and float(min_ndim_triangular).is_integer()):
        raise ValueError(
            f"min_ndim_triangular must be a whole number >= 0; got {min_ndim_triangular!r}."
        )
    if not max_skew_triangular >= 0:
        raise ValueError(f"max_skew_triangular must be >= 0; got {max_skew_triangular!r}.")
    if not 0 <= b1 < 1:
        raise ValueError(f"b1 must be in [0, 1); got {b1!r}.")
    # Infinities pass the comparisons below and reach the weights as inf or NaN.
    if weight_decay is not None and not (weight_decay >= 0 and math.isfinite(weight_decay)):
        raise ValueError(f"weight_decay must be finite and >= 0; got {weight_decay!r}.")
    if not (precond_lr >= 0 and math.isfinite(precond_lr)):
        raise ValueError(f"precond_lr must be finite and >= 0; got {precond_lr!r}.")
    if precond_init_scale is not None and not (
        precond_init_scale > 0 and math.isfinite(precond_init_scale)
    ):
        raise ValueError(
            f"precond_init_scale must be finite and > 0, or None; got {precond_init_scale!r}."
        )
    if not 0 <= balance_probability <= 1:
        raise ValueError(f"balance_probability must be in [0, 1]; got {balance_probability!r}.")
    if not (update_clip_value > 0 and math.isfinite(update_clip_value)):
        raise ValueError(f"update_clip_value must be finite and > 0; got {update_clip_value!r}.")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int in [0, {native.MAX_SEED}]; got {seed!r}.")
    if not 0 <= seed <= native.MAX_SEED:
        raise ValueError(f"seed must be an int in [0, {native.MAX_SEED}]; got {seed!r}.")
    if not (probability is None or callable(probability)):
        if not is_real_number(probability):
            raise ValueError(
                "preconditioner_update_probability must be a float in [0, 1], a schedule or "
                f"None; got {probability!r}."
            )
        if not 0 <= probability <= 1:
            raise ValueError(
                f"preconditioner_update_probability must be in [0, 1]; got {probability!r}."
            )
