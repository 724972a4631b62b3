"""Checks on KronPsgd's per-parameter state shared by the NumPy tests."""

from __future__ import annotations

import numpy as np


def assert_slot_unchanged(before: dict, after: dict) -> None:
    """Two ``state_dict()["slots"][name]`` entries hold the same factors, Lipschitz estimates and
    momentum, bit for bit."""
    for key in ("factors", "lipschitz"):
        for x, y in zip(before[key], after[key], strict=True):
            np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(before["momentum"], after["momentum"])
