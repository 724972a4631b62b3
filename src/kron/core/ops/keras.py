"""Keras 3 backend: every primitive through ``keras.ops``, so one class serves TensorFlow, JAX and
PyTorch. Arrays are the active Keras backend's native tensors (``tf.Tensor``, ``jax.Array``,
``torch.Tensor``); under ``tf.function`` or ``jax.jit`` these methods only build the graph, so the
Python cost of ``keras.ops``' dtype handling is paid at trace time.

Where ``keras.ops`` differs from NumPy it is handled here: dtypes are Keras's standardised names
(``"float32"``), a Python number stays a number until it meets an array (``maximum(0.5, 2)`` is
``2``), and ``eps``/``tiny`` read ``ml_dtypes.finfo`` so ``bfloat16`` works.
"""

from __future__ import annotations

import keras
import ml_dtypes
from keras import ops as kops

_HALF = ("bfloat16", "float16")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class KerasOps:
    name = "keras"

    def asarray(self, x, dtype=None):
        return kops.convert_to_tensor(x, dtype=dtype)

    def zeros(self, shape, like):
        return kops.zeros(shape, dtype=self.dtype(like))

    def ones(self, shape, like):
        return kops.ones(shape, dtype=self.dtype(like))

    def eye(self, n, like):
        return kops.eye(n, dtype=self.dtype(like))

    def arange(self, n, like):
        return kops.arange(n)

    def astype(self, x, dtype):
        if _is_number(x):  # kept at full precision: converted straight to the target dtype
            return kops.convert_to_tensor(x, dtype=dtype)
        return kops.cast(x, dtype)

    def dtype(self, x):
        return keras.backend.standardize_dtype(x.dtype)

    def eps(self, dtype):
        return float(ml_dtypes.finfo(keras.backend.standardize_dtype(dtype)).eps)

    def tiny(self, dtype):
        return float(ml_dtypes.finfo(keras.backend.standardize_dtype(dtype)).tiny)

    def reshape(self, x, shape):
        return kops.reshape(x, shape)

    def moveaxis(self, x, source, destination):
        return kops.moveaxis(x, source, destination)

    def permute(self, x, axes):
        return kops.transpose(x, axes)

    def pad_end(self, x, widths):
        return kops.pad(x, [(0, w) for w in widths])

    def slice_front(self, x, sizes):
        return x[tuple(slice(0, s) for s in sizes)]

    def matmul(self, a, b):
        if keras.backend.backend() == "jax" and self.dtype(a) in _HALF and self.dtype(b) in _HALF:
            # XLA:CPU's own half-precision dot is slower than float32 there; kron.core's JAX
            # backend accumulates in float32 instead (benchmarks/RESULTS.md: a bfloat16 Kron
            # took longer than a float32 one on Keras's JAX backend before this).
            from kron.core.ops import get_ops

            return get_ops("jax").matmul(a, b)
        return _same_dtype(kops.matmul, "matmul", a, b)

    def mT(self, x):
        return kops.swapaxes(x, -1, -2)

    def triu(self, x):
        return kops.triu(x)

    def diagonal(self, x):
        return kops.diagonal(x, axis1=-2, axis2=-1)

    def add_diagonal(self, x, values, into=None):
        values = values if isinstance(values, (int, float)) else kops.expand_dims(values, -1)
        return x + kops.eye(x.shape[-1], dtype=self.dtype(x)) * values

    def solve_lower(self, lower, rhs):
        return kops.solve_triangular(lower, rhs, lower=True)

    def where(self, cond, x, y, into=None):
        return kops.where(cond, x, y)

    def sqrt(self, x):
        return kops.sqrt(x)

    def exp(self, x):
        return kops.exp(x)

    def log(self, x):
        return kops.log(x)

    def log1p(self, x):
        return kops.log1p(x)

    def tanh(self, x):
        return kops.tanh(x)

    def sign(self, x):
        return kops.sign(x)

    def abs(self, x):
        return kops.abs(x)

    def maximum(self, x, y):
        return _binary(kops.maximum, max, "maximum", x, y)

    def minimum(self, x, y):
        return _binary(kops.minimum, min, "minimum", x, y)

    def clip(self, x, lo, hi):
        return kops.clip(x, lo, hi)

    def floor(self, x):
        return kops.floor(x)

    def isfinite(self, x):
        return kops.isfinite(x)

    def sum(self, x, axis=None, keepdims=False):
        return kops.sum(x, axis=axis, keepdims=keepdims)

    def mean(self, x, axis=None, keepdims=False):
        return kops.mean(x, axis=axis, keepdims=keepdims)

    def norm(self, x, axis=None, keepdims=False):
        return kops.sqrt(kops.sum(x * x, axis=axis, keepdims=keepdims))

    def lerp(self, start, end, weight, in_place=False):
        return start + weight * (end - start)

    def addcmul(self, x, scale, y, into=None):
        return x + scale * y

    def max(self, x, axis=None, keepdims=False):
        return kops.max(x, axis=axis, keepdims=keepdims)

    def max_abs(self, x, axis):
        # NaN read as inf, as in the NumPy/JAX backend: a maximum split over devices drops NaN.
        return kops.max(kops.where(kops.isnan(x), float("inf"), kops.abs(x)), axis=axis)

    def argmax(self, x, axis):
        return kops.argmax(x, axis=axis)

    def take_rows(self, x, index):
        index = kops.broadcast_to(kops.reshape(index, (-1, 1, 1)), (x.shape[0], 1, x.shape[-1]))
        return kops.take_along_axis(x, index, axis=-2)


def _binary(tensor_fn, scalar_fn, torch_name, x, y):
    """Elementwise max/min where either side may be a Python number. Two numbers stay a number;
    a number meeting an array is converted to the array's dtype (not to ``floatx``), so a float64
    array is compared with the full-precision number and a float32 one is not promoted."""
    x_number, y_number = _is_number(x), _is_number(y)
    if x_number and y_number:
        return scalar_fn(x, y)
    if y_number:
        y = kops.convert_to_tensor(y, dtype=keras.backend.standardize_dtype(x.dtype))
    elif x_number:
        x = kops.convert_to_tensor(x, dtype=keras.backend.standardize_dtype(y.dtype))
    return _same_dtype(tensor_fn, torch_name, x, y)


def _same_dtype(keras_fn, torch_name, x, y):
    """``keras_fn(x, y)``, except on the PyTorch backend for two arrays of one dtype, where
    ``torch.<torch_name>`` runs instead: Keras's type promotion turns 64-bit dtypes into 32-bit
    ones on every backend but TensorFlow, so ``keras.ops.matmul``, ``maximum`` and ``minimum``
    of two float64 torch tensors compute in float32 (JAX computes in float64 when x64 is on)."""
    if keras.backend.backend() == "torch":
        x, y = kops.convert_to_tensor(x), kops.convert_to_tensor(y)
        if x.dtype == y.dtype:
            import torch

            return getattr(torch, torch_name)(x, y)
    return keras_fn(x, y)
