"""Param-group options of :class:`kron.torch.Kron`: validation and the core's option records.

A group is the dict torch keeps per param group, with every option filled in from the
optimizer's defaults. :func:`check_types`, :func:`check_ranges` and :func:`core_records` raise
``ValueError`` naming the option and the value given; :func:`core_records` also builds the
:class:`~kron.core.LayoutOptions` and :class:`~kron.core.StepOptions` that
:func:`kron.core.kron_step` takes; :func:`cached_records` keeps them per distinct set of
:data:`RECORD_KEYS` values. :func:`new_group` and :func:`check_settings` check what
``add_param_group`` and the constructor are given.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch

from kron.core import DECISION_RULES, FitOptions, LayoutOptions, StepOptions
from kron.core.layout import MERGE_RULES
from kron.core.option_types import as_python_number, check_option_types, is_real_number
from kron.torch.functional import CLIPPING_NAMES, HEAVYBALL_CLIPPING, clipper

PRECONDITIONER_TYPES = ("whitening", "newton")
HVP_METHODS = ("double_backward", "finite_difference")
NONFINITE_POLICIES = ("skip", "raise")
# The floating-point dtypes the factors, the momentum and the parameters may have: the step
# promotes them with float32, which torch refuses for every float8 dtype.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The seed is mixed into the counter-based draws as one 64-bit word (functional.seed_for).
SEED_LIMIT = 2**64

# Group options that the core's option records are built from or that are checked with them
# (:func:`core_records`): a group whose values here change is checked again on its next step.
# The others are checked when the group is added and then read as they are on every step.
RECORD_KEYS = (
    "b1",
    "preconditioner_update_probability",
    "max_size_triangular",
    "min_ndim_triangular",
    "memory_save_mode",
    "momentum_into_precond_update",
    "precond_init_scale",
    "mu_dtype",
    "precond_dtype",
    "merge_dims",
    "split",
    "store_triu_as_line",
    "delayed",
    "exp_avg_input",
    "gradient_clipping",
    "gradient_clip_value",
    "update_clipping",
    "update_clip_value",
    "preconditioner_mode",
    "whiten_grad",
    "max_skew",
    "block_size",
    "decision_rule",
    "beta_lipschitz",
    "damping",
    "damping_rule",
    "norm_bound",
    "balance_probability",
    "preconditioner_type",
    "hvp_method",
)


# Options that take True or False; those that may also be None (an automatic choice); options
# that take a real number (a 0-d tensor too, for lr); and those that may also be None.
BOOL_OPTIONS = (
    "momentum_into_precond_update",
    "split",
    "store_triu_as_line",
    "delayed",
    "exp_avg_input",
    "stochastic_schedule",
    "caution",
    "mars",
    "decoupled_weight_decay",
)
OPTIONAL_BOOL_OPTIONS = ("cached", "whiten_grad")
NUMBER_OPTIONS = (
    "lr",
    "b1",
    "weight_decay",
    "precond_lr",
    "warmup_steps",
    "mars_gamma",
    "max_size_triangular",
    "min_ndim_triangular",
    "gradient_clip_value",
    "update_clip_value",
    "max_skew",
    "beta_lipschitz",
    "damping",
    "balance_probability",
)
OPTIONAL_NUMBER_OPTIONS = ("precond_init_scale", "block_size")

# heavyball's names for options a param group may carry (the constructor takes them too).
GROUP_ALIASES = {"beta": "b1", "q_dtype": "precond_dtype", "storage_dtype": "mu_dtype"}
_MISSING = object()  # a default no value equals: both names given must agree


def torch_dtype(value: Any, name: str) -> torch.dtype | None:
    """``value`` (one of :data:`FLOAT_DTYPES`, its name such as ``"bfloat16"``, or None) as a
    ``torch.dtype`` or None; ``ValueError`` naming option ``name`` otherwise. A float8 dtype is
    refused here: it would pass construction and fail at the first step."""
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        value = getattr(torch, value)
    if value is None or (isinstance(value, torch.dtype) and value in FLOAT_DTYPES):
        return value
    raise ValueError(
        f"{name} must be a floating-point torch.dtype ({_dtype_names()}), its name or None; got "
        f"{value!r}."
    )


def _dtype_names() -> str:
    return ", ".join(str(dtype) for dtype in FLOAT_DTYPES)


def check_parameter_dtype(p: torch.Tensor, index: int, gi: int) -> None:
    """``ValueError`` naming parameter ``index`` of group ``gi`` unless its dtype is one of
    :data:`FLOAT_DTYPES` or complex (stepped as its real view). An integer or bool parameter
    would otherwise be refused only by the step's in-place update, after the other parameters
    of its group had moved."""
    if p.dtype in FLOAT_DTYPES or p.is_complex():
        return
    raise ValueError(
        f"Kron does not support {p.dtype} parameters (parameter {index} of group {gi}, shape "
        f"{tuple(p.shape)}); accepted: {_dtype_names()} and complex dtypes."
    )


def check_seed(seed: Any) -> int:
    """``seed`` as an int; ``ValueError`` unless it is one in ``[0, 2**64)``, the values that
    seed distinct draws (the draws mask the seed to 64 bits, so -1 would be 2**64 - 1)."""
    if (
        isinstance(seed, bool)
        or not isinstance(seed, numbers.Integral)
        or not 0 <= seed < SEED_LIMIT
    ):
        raise ValueError(f"seed must be an int in [0, 2**64); got {seed!r}.")
    return int(seed)


def check_settings(nonfinite: Any, resync: Any) -> None:
    """``ValueError`` unless ``nonfinite`` is one of :data:`NONFINITE_POLICIES` and ``resync`` a
    non-negative int or None (two of the options kept on the optimizer, not in its groups)."""
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(
            f"Unknown nonfinite {nonfinite!r}; accepted: {', '.join(NONFINITE_POLICIES)}."
        )
    if resync is not None and (
        isinstance(resync, bool) or not isinstance(resync, int) or resync < 0
    ):
        raise ValueError(f"resync must be a non-negative int or None; got {resync!r}.")


def check_hvp_methods(groups: Iterable[dict[str, Any]]) -> None:
    """``ValueError`` when Newton-type groups name different ``hvp_method`` values: one pass
    over the closure computes the Hessian-vector products of them all."""
    first_of: dict[Any, int] = {}
    for gi, group in enumerate(groups):
        if group["preconditioner_type"] == "newton":
            first_of.setdefault(group["hvp_method"], gi)
    if len(first_of) > 1:
        found = ", ".join(f"{method!r} (group {gi})" for method, gi in first_of.items())
        raise ValueError(f"Newton-type groups must share one hvp_method; got {found}.")


def is_number(value: Any) -> bool:
    """A real number (not a bool) or a one-element real tensor."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool
    return is_real_number(value)


def check_types(group: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the option for a value of the wrong type (see
    :func:`kron.core.option_types.check_option_types`); ``lr`` and the other numbers may also be
    one-element tensors."""
    check_option_types(
        numbers={key: group[key] for key in NUMBER_OPTIONS},
        optional_numbers={key: group[key] for key in OPTIONAL_NUMBER_OPTIONS},
        flags={key: group[key] for key in BOOL_OPTIONS},
        optional_flags={key: group[key] for key in OPTIONAL_BOOL_OPTIONS},
        is_number=is_number,
    )


def group_with_our_names(group: dict[str, Any]) -> dict[str, Any]:
    """A param group with heavyball's option names (:data:`GROUP_ALIASES`) replaced by ours;
    ``ValueError`` if a group gives both names different values."""
    renamed = {k: v for k, v in group.items() if k not in GROUP_ALIASES}
    for alias, name in GROUP_ALIASES.items():
        if group.get(alias) is None:
            continue
        if name in group:  # both given: they must agree
            renamed[name] = merge_alias(group[name], name, group[alias], alias, default=_MISSING)
        else:
            renamed[name] = group[alias]
    return renamed


def new_group(param_group: dict[str, Any], settings: Iterable[str], gi: int) -> dict[str, Any]:
    """``param_group``, given to ``add_param_group`` as group ``gi``, with our option names
    (:func:`group_with_our_names`), its ``params`` a list (a lone tensor listed, a generator
    read once; a set is left for torch to refuse) and NumPy numbers as Python ones, which
    ``torch.load(weights_only=True)`` reads. ``ValueError`` when it sets one of the
    optimizer-wide ``settings`` (or ``foreach``), or holds a sparse parameter or one of a dtype
    the step cannot take."""
    param_group = group_with_our_names(param_group)
    # heavyball's foreach is stack_params, one value for the whole optimizer too.
    global_only = [name for name in (*settings, "foreach") if name in param_group]
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
            check_parameter_dtype(p, index, gi)
    # NumPy numbers are kept as Python ones: torch.load(weights_only=True) reads no others.
    param_group = {k: as_python_number(v) for k, v in param_group.items()}
    param_group["params"] = params
    return param_group


def merge_alias(value: Any, name: str, alias: Any, alias_name: str, default: Any = None) -> Any:
    """One option given under either of two names (kron_torch's and heavyball's): the alias wins
    when it is given; if ``value`` is also away from its ``default``, the two must agree. Options
    named ``*dtype`` agree as torch dtypes (``"float32"`` is ``torch.float32``)."""
    if alias is None:
        return value
    if name.endswith("dtype"):
        agree = torch_dtype(alias, alias_name) == torch_dtype(value, name)
    else:
        agree = alias == value
    if value != default and not agree:
        raise ValueError(
            f"{alias_name} and {name} name the same option; give one (got {alias_name}={alias!r}, "
            f"{name}={value!r})."
        )
    return alias


def check_ranges(group: dict[str, Any]) -> None:
    """Raise ``ValueError`` for a numeric option out of range (the records check the rest)."""
    for key in ("lr", "weight_decay", "precond_lr", "mars_gamma"):
        if not (group[key] >= 0 and math.isfinite(group[key])):
            raise ValueError(f"Invalid {key}: {group[key]!r} (must be finite and >= 0).")
    for key in ("warmup_steps", "min_ndim_triangular"):
        if not (group[key] >= 0 and float(group[key]).is_integer()):
            raise ValueError(f"Invalid {key}: {group[key]!r} (must be a whole number >= 0).")
    if not 0 <= group["b1"] < 1:
        raise ValueError(f"Invalid b1: {group['b1']!r} (must be in [0, 1)).")
    if not group["max_size_triangular"] >= 0:
        raise ValueError(
            f"Invalid max_size_triangular: {group['max_size_triangular']!r} (must be >= 0)."
        )
    if (
        group["split"]
        and group["block_size"] is None
        and not math.isfinite(group["max_size_triangular"])
    ):
        raise ValueError("split=True needs a finite max_size_triangular or a block_size.")


def _check_clipping(group: dict[str, Any], kind: str) -> None:
    """``{kind}_clipping`` and ``{kind}_clip_value`` make a clip, or ``ValueError`` names them."""
    spec, threshold = group[f"{kind}_clipping"], group[f"{kind}_clip_value"]
    if spec is not None and not callable(spec) and spec not in CLIPPING_NAMES:
        raise ValueError(
            f"{kind}_clipping must be None, a callable or one of {', '.join(CLIPPING_NAMES)}; "
            f"got {spec!r}."
        )
    if isinstance(spec, str) and spec in HEAVYBALL_CLIPPING:  # with heavyball's threshold
        return
    if spec is not None and not callable(spec) and not threshold > 0:
        raise ValueError(
            f"{kind}_clip_value must be > 0 for {kind}_clipping={spec!r}; got {threshold!r}."
        )
    clipper(spec, threshold)


def core_records(group: dict[str, Any]) -> tuple[LayoutOptions, StepOptions]:
    """The core's option records for a group with every option filled in; ``ValueError``
    naming the option and value for anything the records or this front end do not accept (a
    range named as :func:`check_ranges` names it, for a record option edited between steps
    too)."""
    check_ranges(group)
    if group["preconditioner_type"] not in PRECONDITIONER_TYPES:
        raise ValueError(
            f"Unknown preconditioner_type {group['preconditioner_type']!r}; accepted: "
            f"{', '.join(PRECONDITIONER_TYPES)}."
        )
    if group["hvp_method"] not in HVP_METHODS:
        raise ValueError(
            f"Unknown hvp_method {group['hvp_method']!r}; accepted: {', '.join(HVP_METHODS)}."
        )
    if group["decision_rule"] not in DECISION_RULES:
        raise ValueError(
            f"Unknown decision_rule {group['decision_rule']!r}; accepted: "
            f"{', '.join(DECISION_RULES)}."
        )
    probability = group["preconditioner_update_probability"]
    if not (
        probability is None
        or callable(probability)
        or (is_number(probability) and 0 < probability <= 1)
    ):
        raise ValueError(
            "preconditioner_update_probability must be in (0, 1], a callable or None; got "
            f"{probability!r}."
        )
    scale = group["precond_init_scale"]
    if scale is not None and not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"precond_init_scale must be finite and > 0, or None; got {scale!r}.")
    if not 0 <= group["balance_probability"] <= 1:
        raise ValueError(
            f"balance_probability must be in [0, 1]; got {group['balance_probability']!r}."
        )
    merge = group["merge_dims"]
    if not (isinstance(merge, bool) or (isinstance(merge, str) and merge in MERGE_RULES)):
        # 1 == True: the rules' membership test alone would take 1 (or 0) and store it.
        raise ValueError(
            f"Unknown merge_dims {merge!r}; accepted: {', '.join(map(repr, MERGE_RULES))}."
        )
    torch_dtype(group["mu_dtype"], "mu_dtype")
    torch_dtype(group["precond_dtype"], "precond_dtype")
    for kind in ("gradient", "update"):
        _check_clipping(group, kind)
    block = group["block_size"]
    if group["split"] and block is None:
        block = group["max_size_triangular"]
        if not float(block).is_integer():
            raise ValueError(
                "split=True with block_size=None tiles by max_size_triangular, which must then "
                f"be a whole number; got {block!r}."
            )
        block = int(block)
    layout = LayoutOptions(
        # split without a block_size turns the size limit into the tile: every axis is cut to
        # fit rather than going diagonal past it (the core's rule for a long axis).
        max_size=(
            math.inf
            if group["split"] and group["block_size"] is None
            else group["max_size_triangular"]
        ),
        max_skew=group["max_skew"],
        min_ndim_dense=group["min_ndim_triangular"],
        memory_save_mode=group["memory_save_mode"],
        merge_dims=group["merge_dims"],
        block_size=block,
        # heavyball merges up to max_size_triangular, which split has just turned into the tile.
        merge_size=group["max_size_triangular"] if group["merge_dims"] == "heavyball" else None,
    )
    whiten = group["whiten_grad"]
    whiten_momentum = (not whiten) if whiten is not None else group["momentum_into_precond_update"]
    step = StepOptions(
        layout=layout,
        fit=FitOptions(
            geometry=group["preconditioner_mode"],
            beta_lipschitz=group["beta_lipschitz"],
            damping=group["damping"],
            damping_rule=group["damping_rule"],
            norm_bound=group["norm_bound"],
        ),
        beta=group["b1"],
        momentum_rule="debiased_ema",
        whiten_momentum=whiten_momentum,
        precondition_momentum=group["exp_avg_input"],
        cache=False,  # decided per step, see decisions.group_context
        fit_before_apply=not group["delayed"],
        clip_rms=None,
        clip_max=None,
    )
    if group["store_triu_as_line"] and step.fit.geometry != "EQ":
        raise ValueError(
            "store_triu_as_line=True needs preconditioner_mode='EQ', the geometry whose dense "
            f"factors are upper-triangular; got {group['preconditioner_mode']!r}."
        )
    return layout, step


def cached_records(
    cache: dict[tuple, tuple[LayoutOptions, StepOptions]], group: dict[str, Any]
) -> tuple[LayoutOptions, StepOptions]:
    """:func:`core_records` for ``group``, kept in ``cache`` (the optimizer's) per distinct set of
    :data:`RECORD_KEYS` values; raises ``ValueError`` on a bad value. Values are keyed with their
    types: ``1 == True``, so ``merge_dims=1`` would otherwise find the records of
    ``merge_dims=True``, unchecked."""
    key = tuple((type(group[name]), group[name]) for name in RECORD_KEYS)
    try:
        records = cache.get(key)
    except TypeError:  # an unhashable value (a dataclass schedule, a list): build, not cache
        return core_records(group)
    if records is None:
        if len(cache) > 64:  # options changed by hand many times; start afresh
            cache.clear()
        records = cache[key] = core_records(group)
    return records


__all__ = [
    "FLOAT_DTYPES",
    "GROUP_ALIASES",
    "HVP_METHODS",
    "NONFINITE_POLICIES",
    "PRECONDITIONER_TYPES",
    "RECORD_KEYS",
    "SEED_LIMIT",
    "cached_records",
    "check_hvp_methods",
    "check_parameter_dtype",
    "check_ranges",
    "check_seed",
    "check_settings",
    "check_types",
    "core_records",
    "group_with_our_names",
    "merge_alias",
    "new_group",
    "torch_dtype",
]
