"""Random combinations of KronPsgd's options on parameters of every order: none of them is a
documented conflict, so each must be accepted, train with finite parameters, resume from a
pickled state dict bit for bit, and leave a parameter whose gradient holds a NaN untouched."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.conftest import Conflict, refused_as_documented
from tests.numpy._slots import assert_slot_unchanged

from kron.core import GEOMETRIES
from kron.numpy import KronPsgd

SHAPES = [(), (7,), (5, 3), (1, 9), (16, 4), (3, 4, 5), (2, 1, 6)]
OPTIONS = st.fixed_dictionaries(
    {
        "preconditioner_mode": st.sampled_from(GEOMETRIES),
        "whiten_grad": st.booleans(),
        "momentum": st.sampled_from([0.9, 0.9, 0.0]),
        "update_probability": st.sampled_from([1.0, 0.3]),
        "decision_rule": st.sampled_from(["counter", "bernoulli"]),
        "init_scale": st.sampled_from([None, 1.0]),
        "max_size": st.sampled_from([4, math.inf]),
        "max_skew": st.sampled_from([1.0, math.inf]),
        "min_ndim_dense": st.sampled_from([0, 2]),
        "memory_save_mode": st.sampled_from([None, "one_diag", "smart_one_diag", "all_diag"]),
        "merge_dims": st.booleans(),
        "block_size": st.sampled_from([None, 3]),
        "norm_bound": st.sampled_from(["power", "rowcol", "spd", "subspace"]),
        "damping_rule": st.sampled_from(["elementwise", "mean_abs"]),
        "clip": st.sampled_from([None, 1.0]),
        "clip_rms": st.sampled_from([None, 1.1]),
        "weight_decay": st.sampled_from([0.0, 0.01]),
    }
)
# The combinations of OPTIONS that KronPsgd must refuse: none. docs/numpy.md (§2, §3) refuses
# only single values out of range or unknown names, and every value drawn above is valid on its
# own; whiten_grad=False with momentum=0 is accepted (the momentum is then the gradient), unlike
# in kron.optax. So every combination drawn must be accepted.
CONFLICTS: list[Conflict] = []


def run(opt, params, steps, start=0):
    """``steps`` iterations of a quartic loss from iteration ``start``, in place."""
    for t in range(start, start + steps):
        for name, p in params.items():
            opt.step(name, p, 2 * (p - 0.1 * t) + 0.4 * p**3)
        opt.end_iteration()


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    options=OPTIONS,
    shapes=st.lists(st.sampled_from(SHAPES), min_size=2, max_size=3),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_every_combination_is_accepted_trains_resumes_and_skips(options, shapes, dtype):
    if refused_as_documented(KronPsgd, options, CONFLICTS):
        return
    rng = np.random.default_rng(0)
    start = {f"p{i}": rng.standard_normal(s).astype(dtype) for i, s in enumerate(shapes)}
    straight = copy.deepcopy(start)
    run(KronPsgd(**options), straight, 8)
    assert all(np.isfinite(p).all() for p in straight.values())
    # Every parameter moved (finite alone would pass an update of zeros); tests/numpy/
    # test_parity.py checks the values against kron.core.
    assert all(not np.array_equal(straight[k], start[k]) for k in straight)

    params = copy.deepcopy(start)
    first = KronPsgd(**options)
    run(first, params, 4)
    resumed = KronPsgd(**options)
    resumed.load_state_dict(pickle.loads(pickle.dumps(first.state_dict())))
    run(resumed, params, 4, start=4)
    for name in params:
        np.testing.assert_array_equal(params[name], straight[name])

    before = copy.deepcopy(resumed.state_dict()["slots"]["p0"])
    kept = params["p0"].copy()
    grad = np.ones_like(kept)
    grad[(0,) * grad.ndim] = np.nan
    resumed.step("p0", params["p0"], grad)
    np.testing.assert_array_equal(params["p0"], kept)
    assert_slot_unchanged(before, resumed.state_dict()["slots"]["p0"])
    assert resumed.skipped("p0") == 1
