"""Checks of what :class:`kron.keras.Kron` is given, each raising ``ValueError`` that names the
option or variable and the value.

* options, at construction: :func:`check_options` (types, then ranges), :func:`dtype_name` and
  :func:`choice`; the core's option records validate the rest;
* the variables, at ``build``: :func:`check_floating`;
* the gradients, at ``apply``: :func:`check_gradient_shapes`;
* what a ``preconditioner_update_probability`` callable returns, in each step:
  :func:`probability_value`;
* a saved state, at ``load_own_variables``: :func:`check_saved_count` and
  :func:`check_saved_shapes`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import keras
import numpy as np
from keras import ops as kops

from kron.core.option_types import as_python_number, check_option_types, is_real_number
from kron.keras import native

NONFINITE_POLICIES = ("skip", "raise")
UPDATE_CLIPPINGS = ("rms", "value", None)
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")

# The options that change how many optimizer variables there are, or their shapes.
COUNT_OPTIONS = (
    "learning_rate (a float is saved as a variable, a schedule is not), use_ema, "
    "gradient_accumulation_steps, cached, preconditioner_mode (PRO4P and QUAD4P keep no cache) "
    "and merge_dims (one factor per axis)"
)
SHAPE_OPTIONS = (
    "max_size_triangular, min_ndim_triangular, max_skew_triangular, memory_save_mode, "
    "merge_dims and block_size"
)


def _variable_name(variable: Any) -> str:
    """The Keras path of a variable, or the name of a plain ``tf.Variable`` (which has none)."""
    return getattr(variable, "path", None) or str(variable.name)


# -- options ---------------------------------------------------------------------------------


def dtype_name(value: Any, name: str, default: str | None) -> str | None:
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


def choice(value: Any, name: str, accepted: tuple) -> Any:
    if value not in accepted:
        raise ValueError(f"Unknown {name} {value!r}; accepted: {', '.join(map(repr, accepted))}.")
    return value


def check_options(
    *,
    learning_rate,
    b1,
    weight_decay,
    preconditioner_update_probability,
    max_size_triangular,
    min_ndim_triangular,
    momentum_into_precond_update,
    precond_lr,
    precond_init_scale,
    whiten_grad,
    max_skew_triangular,
    block_size,
    cached,
    update_clip_value,
    beta_lipschitz,
    damping,
    balance_probability,
    decoupled_weight_decay,
    seed,
) -> None:
    """The types of Kron's own number and flag options, then the ranges of those it keeps."""
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
    check_ranges(
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


def check_ranges(
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


# -- variables and gradients -----------------------------------------------------------------


def check_floating(variables: list) -> None:
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


def check_gradient_shapes(grads: list, variables: list) -> None:
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


def probability_value(value: Any, step: Any) -> Any:
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


# -- saved state -----------------------------------------------------------------------------


def check_saved_count(name: str, saved: int, expected: int) -> None:
    """ValueError unless as many optimizer variables were saved as this optimizer has."""
    if saved != expected:
        raise ValueError(
            f"Kron optimizer {name!r} cannot load the saved state: {saved} variables were "
            f"saved and this optimizer has {expected}. The count follows the model's trainable "
            f"variables and the options {COUNT_OPTIONS}; create the optimizer with the options "
            "it was saved with."
        )


def check_saved_shapes(name: str, variables: list, values: list) -> None:
    """ValueError for the first saved value whose shape is not its variable's (checked before
    anything is assigned, so a refused store leaves the optimizer as it was)."""
    for index, (variable, value) in enumerate(zip(variables, values)):
        saved, expected = tuple(np.shape(value)), tuple(variable.shape)
        if saved != expected:
            raise ValueError(
                f"Kron optimizer {name!r} cannot load the saved state: variable {index} "
                f"({_variable_name(variable)!r}) was saved with shape {saved} and this "
                f"optimizer's has shape {expected}. The shapes follow the model's trainable "
                f"variables and the options {SHAPE_OPTIONS}; create the optimizer with the "
                "options it was saved with."
            )
