"""The PSGD-Kron math, written once for every front end (see ``docs/core.md``).

Pure functions over arrays: every function takes an ``ops`` backend (:mod:`kron.core.ops`), returns
new arrays, takes its randomness as input arrays, and never branches on array values. The one
exception to the first, on the caller's request: ``kron_step(donate_momentum=True)`` and
``update_momentum(in_place=True)`` may update the momentum in place. Nothing here imports a
framework.
"""

from kron.core.clipping import (
    cautious,
    clip_elementwise,
    clip_l2,
    clip_rms,
    l2_clip_factor,
    mars_correction,
    norm_per_parameter,
    rms_clip_factor,
    rms_per_parameter,
    shrink_factor,
    soft_clip,
)
from kron.core.finite import FLOAT16_OVERFLOW, finite_rows, nonzero_rows, overflow_limit
from kron.core.fitting import (
    DAMPING_RULES,
    GEOMETRIES,
    STATE_IS_P,
    FitOptions,
    balance,
    canonical_geometry,
    damp,
    fit,
    lipschitz_update,
)
from kron.core.init import (
    fourth_moment,
    init_factors,
    init_lipschitz,
    scale_from_moments,
    shared_scale,
)
from kron.core.kron_product import (
    apply_factors,
    cache_preconditioner,
    gram,
    mode_product,
    precondition,
    solve_transpose,
)
from kron.core.layout import MEMORY_SAVE_MODES, LayoutOptions, Plan, make_plan
from kron.core.norms import NORM_BOUNDS, norm_lower_bound
from kron.core.ops import Ops, get_ops
from kron.core.procrustes import procrustes_repeat3, procrustes_step2, procrustes_step3
from kron.core.schedules import (
    DECISION_RULES,
    accumulator_decision,
    bernoulli_decision,
    counter_decision,
    exponential_schedule,
    heavyball_schedule,
    probability_at,
)
from kron.core.step import (
    MOMENTUM_RULES,
    StepOptions,
    TensorState,
    kron_step,
    select_state,
    update_momentum,
)

__all__ = [
    "DAMPING_RULES",
    "DECISION_RULES",
    "FLOAT16_OVERFLOW",
    "GEOMETRIES",
    "MEMORY_SAVE_MODES",
    "MOMENTUM_RULES",
    "NORM_BOUNDS",
    "STATE_IS_P",
    "FitOptions",
    "LayoutOptions",
    "Ops",
    "Plan",
    "StepOptions",
    "TensorState",
    "accumulator_decision",
    "apply_factors",
    "balance",
    "bernoulli_decision",
    "cache_preconditioner",
    "canonical_geometry",
    "cautious",
    "clip_elementwise",
    "clip_l2",
    "clip_rms",
    "counter_decision",
    "damp",
    "exponential_schedule",
    "finite_rows",
    "fit",
    "fourth_moment",
    "get_ops",
    "gram",
    "heavyball_schedule",
    "init_factors",
    "init_lipschitz",
    "kron_step",
    "l2_clip_factor",
    "lipschitz_update",
    "make_plan",
    "mars_correction",
    "mode_product",
    "nonzero_rows",
    "norm_lower_bound",
    "norm_per_parameter",
    "overflow_limit",
    "precondition",
    "probability_at",
    "procrustes_repeat3",
    "procrustes_step2",
    "procrustes_step3",
    "rms_clip_factor",
    "rms_per_parameter",
    "scale_from_moments",
    "select_state",
    "shared_scale",
    "shrink_factor",
    "soft_clip",
    "solve_transpose",
    "update_momentum",
]
