"""Per stacked item, what the fit and the front ends check before state is written: finiteness,
and whether a gradient holds anything but zeros."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

FLOAT16_OVERFLOW = 65520.0
"""The smallest magnitude that rounds to infinity in float16: a gradient with an entry this
large is non-finite to float16 factors, whose products it would turn into inf and NaN."""


def overflow_limit(factor_dtype: Any) -> float:
    """The ``limit`` of :func:`finite_rows` for a gradient headed for factors of
    ``factor_dtype`` (a dtype or its name): :data:`FLOAT16_OVERFLOW` for float16, else inf (the
    other factor dtypes have at least float32's range)."""
    try:
        name = np.dtype(factor_dtype).name  # NumPy's and JAX's dtypes and types, and names
    except TypeError:
        name = str(factor_dtype).rsplit(".", 1)[-1]  # torch.float16, or "bfloat16"
    return FLOAT16_OVERFLOW if name == "float16" else math.inf


def finite_rows(x: Any, ops: Any, limit: float = math.inf) -> Any:
    """``(S,)`` booleans: whether ``x[s]`` (``x`` is ``(S, ...)``) holds only finite numbers,
    each below ``limit`` in magnitude when one is given (see :func:`overflow_limit`).

    Computed as ``max|x[s]| < inf`` (``ops.max_abs`` is not finite where an entry is NaN or
    infinite, on a mesh too), and a maximum cannot overflow, so this equals
    ``all(isfinite(x[s]))`` exactly. It is one
    vectorised reduction (two in PyTorch, with no temporary), where ``all(isfinite)`` is not:
    PyTorch's CPU ``isfinite`` is scalar code, and XLA:CPU lowers a boolean ``all`` over 65 536
    entries to five kernels (one fused reduction, then ``sum(x·0) == 0``, checked a 256x256
    gradient 4x faster in JAX, benchmarks/RESULTS.md; the maximum was not timed apart from
    it). ``sum(x·0) == 0``, as cheap, is no longer used: ``torch.compile`` simplifies ``x·0``
    to 0 and the test to True."""
    axes = tuple(range(1, len(x.shape)))
    return (ops.max_abs(x, axes) if axes else ops.abs(x)) < limit


def nonzero_rows(x: Any, ops: Any) -> Any:
    """``(S,)`` booleans: whether ``x[s]`` (``x`` is ``(S, ...)``) has an entry other than zero
    (NaN counts as one: :func:`finite_rows` is what rejects it). One reduction, as in
    :func:`finite_rows`."""
    axes = tuple(range(1, len(x.shape)))
    return (ops.max_abs(x, axes) if axes else ops.abs(x)) > 0
