"""NumPy backend. Written against a swappable namespace ``xp`` so that array libraries with the
NumPy API (``jax.numpy``) can subclass it and change only what differs."""

from __future__ import annotations

from typing import Any

import numpy as np


class NumpyOps:
    name = "numpy"
    xp: Any = np

    def asarray(self, x, dtype=None):
        return self.xp.asarray(x, dtype=dtype)

    def zeros(self, shape, like):
        return self.xp.zeros(shape, dtype=like.dtype)

    def ones(self, shape, like):
        return self.xp.ones(shape, dtype=like.dtype)

    def eye(self, n, like):
        return self.xp.eye(n, dtype=like.dtype)

    def arange(self, n, like):
        return self.xp.arange(n)

    def astype(self, x, dtype):
        return self.xp.asarray(x, dtype=dtype)  # no copy when x already has that dtype

    def dtype(self, x):
        return x.dtype

    def eps(self, dtype):
        return float(np.finfo(dtype).eps)

    def tiny(self, dtype):
        return float(np.finfo(dtype).tiny)

    def reshape(self, x, shape):
        return self.xp.reshape(x, shape)

    def moveaxis(self, x, source, destination):
        return self.xp.moveaxis(x, source, destination)

    def permute(self, x, axes):
        return self.xp.transpose(x, axes)

    def pad_end(self, x, widths):
        return self.xp.pad(x, [(0, w) for w in widths])

    def slice_front(self, x, sizes):
        return x[tuple(slice(0, s) for s in sizes)]

    def matmul(self, a, b):
        return self.xp.matmul(a, b)

    def mT(self, x):
        return self.xp.swapaxes(x, -1, -2)

    def triu(self, x):
        return self.xp.triu(x)

    def diagonal(self, x):
        return self.xp.diagonal(x, axis1=-2, axis2=-1)

    def add_diagonal(self, x, values, into=None):
        values = values if isinstance(values, (int, float)) else values[..., None]
        return x + self.xp.eye(x.shape[-1], dtype=x.dtype) * values

    def solve_lower(self, lower, rhs):
        # NumPy has no triangular solve; a general solve gives the same answer on a triangular
        # system.
        return np.linalg.solve(lower, rhs)

    def where(self, cond, x, y, into=None):
        return self.xp.where(cond, x, y)

    def sqrt(self, x):
        return self.xp.sqrt(x)

    def exp(self, x):
        return self.xp.exp(x)

    def log(self, x):
        return self.xp.log(x)

    def log1p(self, x):
        return self.xp.log1p(x)

    def tanh(self, x):
        return self.xp.tanh(x)

    def sign(self, x):
        return self.xp.sign(x)

    def abs(self, x):
        return self.xp.abs(x)

    def maximum(self, x, y):
        if _is_number(x) and _is_number(y):  # a NumPy float64 scalar would promote float32 arrays
            return max(x, y)
        return self.xp.maximum(x, y)

    def minimum(self, x, y):
        if _is_number(x) and _is_number(y):
            return min(x, y)
        return self.xp.minimum(x, y)

    def clip(self, x, lo, hi):
        return self.xp.clip(x, lo, hi)

    def floor(self, x):
        return self.xp.floor(x)

    def isfinite(self, x):
        return self.xp.isfinite(x)

    def sum(self, x, axis=None, keepdims=False):
        return self.xp.sum(x, axis=axis, keepdims=keepdims)

    def mean(self, x, axis=None, keepdims=False):
        return self.xp.mean(x, axis=axis, keepdims=keepdims)

    def norm(self, x, axis=None, keepdims=False):
        # Squares past the dtype's range are inf by design (the callers handle it); NumPy's
        # overflow warning would only alarm the user. (No effect on JAX arrays.)
        with np.errstate(over="ignore"):
            return self.xp.sqrt(self.xp.sum(x * x, axis=axis, keepdims=keepdims))

    def lerp(self, start, end, weight, in_place=False):
        return start + weight * (end - start)

    def addcmul(self, x, scale, y, into=None):
        return x + scale * y

    def max(self, x, axis=None, keepdims=False):
        return self.xp.max(x, axis=axis, keepdims=keepdims)

    def max_abs(self, x, axis):
        # NaN is read as inf before the maximum: a maximum split over devices (XLA on a mesh)
        # drops NaN in its cross-device step, while inf survives any maximum. XLA fuses the
        # select into the reduction.
        xp = self.xp
        return xp.max(xp.where(xp.isnan(x), xp.inf, xp.abs(x)), axis=axis)

    def argmax(self, x, axis):
        return self.xp.argmax(x, axis=axis)

    def take_rows(self, x, index):
        return self.xp.take_along_axis(x, index[:, None, None], axis=-2)


def _is_number(x) -> bool:
    return type(x) in (int, float)
