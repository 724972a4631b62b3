"""PyTorch backend. Every torch spelling (``dim`` for ``axis``, ``movedim``, ``amax``, the
triangular solve) lives here and nowhere else."""

from __future__ import annotations

import torch

_HALF = (torch.bfloat16, torch.float16)


class TorchOps:
    name = "torch"

    def asarray(self, x, dtype=None):
        return torch.as_tensor(x, dtype=dtype)

    def zeros(self, shape, like):
        return torch.zeros(shape, dtype=like.dtype, device=like.device)

    def ones(self, shape, like):
        return torch.ones(shape, dtype=like.dtype, device=like.device)

    def eye(self, n, like):
        return torch.eye(n, dtype=like.dtype, device=like.device)

    def arange(self, n, like):
        return torch.arange(n, device=like.device)

    def astype(self, x, dtype):
        # The core names dtypes it needs by string ("float32"); front ends pass torch dtypes.
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        return x.to(dtype) if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=dtype)

    def dtype(self, x):
        return x.dtype

    def eps(self, dtype):
        return float(torch.finfo(dtype).eps)

    def tiny(self, dtype):
        return float(torch.finfo(dtype).tiny)

    def reshape(self, x, shape):
        return x.reshape(shape)

    def moveaxis(self, x, source, destination):
        return torch.movedim(x, source, destination)

    def permute(self, x, axes):
        return x.permute(axes)

    def pad_end(self, x, widths):
        # torch's pad lists (before, after) pairs starting from the last axis.
        flat = []
        for w in reversed(widths):
            flat += [0, w]
        return torch.nn.functional.pad(x, flat)

    def slice_front(self, x, sizes):
        return x[tuple(slice(0, s) for s in sizes)]

    def matmul(self, a, b):
        # A half-precision batch of one goes through the 2-D product, which reads a transposed
        # operand in place: the batched one copies it first on the CPU (an n×n copy per product,
        # the factors' transposes in every P·x).
        if a.dim() == b.dim() == 3 and a.shape[0] == b.shape[0]:
            if a.dtype in _HALF and a.shape[0] == 1:
                return torch.mm(a[0], b[0]).unsqueeze(0)
            # torch.matmul would broadcast, reshape and view around the same bmm: 5 more
            # dispatches per product, in a step that takes hundreds of them.
            return torch.bmm(a, b)
        return torch.matmul(a, b)

    def mT(self, x):
        return x.transpose(-1, -2)

    def triu(self, x):
        return torch.triu(x)

    def diagonal(self, x):
        return torch.diagonal(x, dim1=-2, dim2=-1)

    def add_diagonal(self, x, values, into=None):
        out = x if into is x else x.clone()
        out.diagonal(dim1=-2, dim2=-1).add_(values)
        return out

    def solve_lower(self, lower, rhs):
        return torch.linalg.solve_triangular(lower, rhs, upper=False)

    def where(self, cond, x, y, into=None):
        cond = torch.as_tensor(cond)
        # A counter kept as a Python number (counter_decision) meets a tensor condition.
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x, device=cond.device)
        if not isinstance(y, torch.Tensor):
            y = torch.as_tensor(y, device=cond.device)
        return torch.where(cond, x, y, out=_writable(into, x, y))

    def sqrt(self, x):
        return torch.sqrt(torch.as_tensor(x))

    def exp(self, x):
        return torch.exp(torch.as_tensor(x))

    def log(self, x):
        return torch.log(torch.as_tensor(x))

    def log1p(self, x):
        return torch.log1p(x)

    def tanh(self, x):
        return torch.tanh(x)

    def sign(self, x):
        return torch.sign(x)

    def abs(self, x):
        return torch.abs(x)

    def maximum(self, x, y):
        return _binary(torch.maximum, max, "min", x, y)

    def minimum(self, x, y):
        return _binary(torch.minimum, min, "max", x, y)

    def clip(self, x, lo, hi):
        return torch.clamp(x, lo, hi)

    def floor(self, x):
        return torch.floor(torch.as_tensor(x))

    def isfinite(self, x):
        return torch.isfinite(x)

    def sum(self, x, axis=None, keepdims=False):
        return x.sum() if axis is None else x.sum(dim=axis, keepdim=keepdims)

    def mean(self, x, axis=None, keepdims=False):
        return x.mean() if axis is None else x.mean(dim=axis, keepdim=keepdims)

    def norm(self, x, axis=None, keepdims=False):
        # One pass and no temporary, where sqrt(sum(x·x)) writes x·x out first.
        return torch.linalg.vector_norm(x, dim=axis, keepdim=keepdims)

    def lerp(self, start, end, weight, in_place=False):
        # torch.lerp is one pass; it needs one dtype throughout (momentum may be stored narrower).
        same = start.dtype == end.dtype and getattr(weight, "dtype", start.dtype) == start.dtype
        if in_place:
            return start.lerp_(end, weight) if same else start.add_(weight * (end - start))
        return torch.lerp(start, end, weight) if same else start + weight * (end - start)

    def addcmul(self, x, scale, y, into=None):
        # One pass: on the CPU every intermediate n×n result is a fresh, page-faulted allocation.
        if isinstance(scale, (int, float)):
            return torch.add(x, y, alpha=scale, out=_writable(into, x, y))
        return torch.addcmul(x, scale, y, out=_writable(into, x, y, scale))

    def max(self, x, axis=None, keepdims=False):
        return x.amax() if axis is None else x.amax(dim=axis, keepdim=keepdims)

    def max_abs(self, x, axis):
        # Two reductions and no temporary, where abs(x).amax() writes |x| out first (and
        # linalg.vector_norm(ord=inf) took several times as long on the CPU).
        return torch.maximum(x.amax(dim=axis), x.amin(dim=axis).neg_())

    def argmax(self, x, axis):
        return x.argmax(dim=axis)

    def take_rows(self, x, index):
        return torch.gather(x, -2, index.view(-1, 1, 1).expand(-1, 1, x.shape[-1]))


def _writable(into, *operands):
    """``into`` when the result of an elementwise op over ``operands`` can be written into it
    unchanged (every tensor operand in its dtype, no type promotion, and their broadcast shape
    its shape), else None."""
    if into is None:
        return None
    tensors = [a for a in operands if isinstance(a, torch.Tensor)]
    if any(a.dtype != into.dtype for a in tensors):
        return None
    return into if _broadcast_shape([a.shape for a in tensors]) == tuple(into.shape) else None


def _broadcast_shape(shapes):
    """The broadcast of ``shapes``, or None where they do not broadcast. Plain Python:
    ``torch.broadcast_shapes`` goes through the symbolic-shape machinery, about 70 µs a call,
    a tenth of a small model's step at update probability 1."""
    result = []
    for axis in range(1, max(len(s) for s in shapes) + 1):
        sizes = {s[-axis] for s in shapes if len(s) >= axis} - {1}
        if len(sizes) > 1:
            return None
        result.append(sizes.pop() if sizes else 1)
    return tuple(reversed(result))


def _binary(tensor_fn, scalar_fn, clamp_side, x, y):
    """Elementwise max/min where either side may be a Python number. Numbers go through
    ``clamp``, which keeps the tensor's precision (``as_tensor(0.9)`` would round to float32)."""
    x_number, y_number = isinstance(x, (int, float)), isinstance(y, (int, float))
    if x_number and y_number:
        return scalar_fn(x, y)
    if y_number:
        return torch.clamp(x, **{clamp_side: y})
    if x_number:
        return torch.clamp(y, **{clamp_side: x})
    return tensor_fn(x, y)
