"""How a parameter's shape becomes Kronecker factors (algorithm.md §2.2-2.3).

A :class:`Plan` is pure Python, computed once per ``(shape, LayoutOptions)`` and cached. It says:

1. the *work shape*: the parameter with size-1 axes squeezed out (a scalar becomes ``(1,)``), and,
   with ``merge_dims``, a tensor of order > 2 reshaped to its squarest 2-D view (or by another
   merge rule: kron_torch's, heavyball's);
2. the *block grid*: with ``block_size`` set, every work axis longer than ``block_size`` is cut
   into blocks of ``block_size`` (the last one zero-padded), except an axis longer than
   ``max_size`` (and, with ``whole_vectors``, a vector's), which stays whole and diagonal; every
   block gets its own factors;
3. per block axis, whether its factor is a dense ``n×n`` matrix or a diagonal (a vector).

Tensors handed to the core always have the *blocked* layout ``(B, *block_shape)``: ``B`` counts
blocks (1 when nothing is split) and front ends may stack several same-plan parameters along it.
Padding is tracked by :meth:`Plan.mask` so that it never enters any statistic.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

MEMORY_SAVE_MODES = (None, "one_diag", "smart_one_diag", "one_triu", "all_diag")
MERGE_RULES = (False, True, "first_last", "heavyball")


@dataclass(frozen=True)
class LayoutOptions:
    """Rules that pick dense or diagonal factors. Both families of the peers are expressible.

    psgd_torch's rule is ``max_size`` + ``max_skew``; kron_torch's is ``max_size`` (its
    ``max_size_triangular``) + ``min_ndim_dense`` (its ``min_ndim_triangular``) +
    ``memory_save_mode`` with ``max_skew=inf``. An axis of size ``n`` in a block of ``N`` elements,
    of a parameter with ``ndim`` axes (before squeezing) whose axis is ``n_axis`` long before
    tiling, is diagonal iff any of these holds:

    * ``n == 1``; ``n_axis > max_size``; ``n * n > max_skew * N``; ``ndim < min_ndim_dense``;
    * ``whole_vectors`` is set and the parameter has one axis after squeezing;
    * ``memory_save_mode`` marks it: ``"one_diag"`` the largest axis (the last one on ties),
      ``"smart_one_diag"`` the largest axis if it is strictly larger than the second largest,
      ``"one_triu"`` every axis but the smallest, ``"all_diag"`` every axis.

    Attributes:
      max_size: longest axis that may get a dense factor; a longer one is diagonal and is not
        cut into blocks. Default ``inf``.
      max_skew: an axis whose square exceeds ``max_skew`` times the block size gets a diagonal
        factor. ``1.0`` (default) makes vectors and the long side of a rectangular matrix diagonal;
        ``inf`` disables the rule; ``0`` makes everything diagonal.
      min_ndim_dense: tensors of lower order get only diagonal factors. Default 0.
      memory_save_mode: one of ``None``, ``"one_diag"``, ``"smart_one_diag"``, ``"one_triu"``,
        ``"all_diag"``. Default ``None``.
      merge_dims: ``True`` reshapes tensors of order > 2 (after squeezing) to their squarest 2-D
        view, over every split point; ``"first_last"`` is kron_torch's rule, which looks at the
        unsqueezed shape and picks ``(prod(shape[:-1]), shape[-1])`` unless
        ``(shape[0], prod(shape[1:]))`` has the smaller signed difference ``cols − rows``;
        ``"heavyball"`` is heavyball 1.5's ``dim_merger`` (see :func:`heavyball_merge`), on the
        unsqueezed shape with ``merge_size`` as its limit, and ``min_ndim_dense`` then counts
        the merged axes, as heavyball's does. Default ``False``.
      merge_size: the limit of the ``"heavyball"`` rule; ``None`` (default) is ``max_size``.
        A front end that tiles by its size limit (and so sets ``max_size`` to ``inf``) passes
        the limit here.
      block_size: cut axes longer than this (and no longer than ``max_size``) into blocks with
        their own factors. Default ``None`` (never split).
      whole_vectors: a parameter with one axis after squeezing (a vector, ``(1, n)``, a scalar)
        gets one diagonal factor over the whole axis, never cut into blocks: eformer's 1-D
        path. Default False.
    """

    max_size: float = math.inf
    max_skew: float = 1.0
    min_ndim_dense: int = 0
    memory_save_mode: str | None = None
    merge_dims: bool | str = False
    block_size: int | None = None
    merge_size: float | None = None
    whole_vectors: bool = False

    def __post_init__(self) -> None:
        merge = self.merge_dims
        # A bool or a rule's name: 1 == True, so membership alone would take 1 (or 0) and keep it.
        if not (isinstance(merge, bool) or (isinstance(merge, str) and merge in MERGE_RULES)):
            raise ValueError(
                f"Unknown merge_dims {self.merge_dims!r}; accepted: "
                f"{', '.join(repr(m) for m in MERGE_RULES)}."
            )
        if not isinstance(self.whole_vectors, bool):
            raise ValueError(f"whole_vectors must be True or False; got {self.whole_vectors!r}.")
        if not self.max_size >= 0:  # 0: every axis diagonal, as in the peers
            raise ValueError(f"max_size must be >= 0; got {self.max_size!r}.")
        if self.merge_size is not None and not self.merge_size >= 0:
            raise ValueError(f"merge_size must be >= 0 or None; got {self.merge_size!r}.")
        if not self.max_skew >= 0:
            raise ValueError(f"max_skew must be >= 0 (inf disables it); got {self.max_skew!r}.")
        if not self.min_ndim_dense >= 0:
            raise ValueError(f"min_ndim_dense must be >= 0; got {self.min_ndim_dense!r}.")
        if self.memory_save_mode not in MEMORY_SAVE_MODES:
            raise ValueError(
                f"Unknown memory_save_mode {self.memory_save_mode!r}; accepted: "
                f"{', '.join(repr(m) for m in MEMORY_SAVE_MODES)}."
            )
        if self.block_size is not None and (
            isinstance(self.block_size, bool)
            or not isinstance(self.block_size, numbers.Integral)
            or self.block_size < 1
        ):
            raise ValueError(f"block_size must be a positive int or None; got {self.block_size!r}.")
        if self.block_size is not None:  # a NumPy integer is stored as the int it stands for
            object.__setattr__(self, "block_size", int(self.block_size))


@dataclass(frozen=True)
class Plan:
    """The factor layout of one parameter shape. See the module docstring."""

    shape: tuple[int, ...]
    work_shape: tuple[int, ...]
    grid: tuple[int, ...]
    block_shape: tuple[int, ...]
    dense: tuple[bool, ...]

    @property
    def num_blocks(self) -> int:
        return math.prod(self.grid)

    @property
    def order(self) -> int:
        return len(self.block_shape)

    @property
    def padded(self) -> bool:
        return any(g * b != n for g, b, n in zip(self.grid, self.block_shape, self.work_shape))

    def to_blocks(self, x: Any, ops: Any, stacked: bool = False) -> Any:
        """``x`` of shape ``shape`` -> ``(B, *block_shape)``, zero-padded. With ``stacked``, ``x``
        is ``(S, *shape)`` (S same-shape parameters) and the result ``(S·B, *block_shape)``."""
        stack = x.shape[0] if stacked else 1
        x = ops.reshape(x, (stack, *self.work_shape))
        if self.num_blocks == 1:
            return ops.reshape(x, (stack, *self.block_shape))
        k = self.order
        x = ops.pad_end(x, (0, *(g * b - n for g, b, n in self._axes())))
        x = ops.reshape(x, (stack, *(d for g, b, _ in self._axes() for d in (g, b))))
        x = ops.permute(x, (0, *range(1, 2 * k + 1, 2), *range(2, 2 * k + 1, 2)))
        return ops.reshape(x, (stack * self.num_blocks, *self.block_shape))

    def from_blocks(self, y: Any, ops: Any, stacked: bool = False) -> Any:
        """Inverse of :meth:`to_blocks`: ``(S·B, *block_shape)`` -> ``shape`` (``(S, *shape)`` with
        ``stacked``), padding dropped."""
        stack = y.shape[0] // self.num_blocks
        out_shape = (stack, *self.shape) if stacked else self.shape
        if self.num_blocks == 1:
            return ops.reshape(y, out_shape)
        k = self.order
        y = ops.reshape(y, (stack, *self.grid, *self.block_shape))
        y = ops.permute(y, (0, *(i for j in range(1, k + 1) for i in (j, k + j))))
        y = ops.reshape(y, (stack, *(g * b for g, b, _ in self._axes())))
        y = ops.slice_front(y, (stack, *self.work_shape))
        return ops.reshape(y, out_shape)

    def mask(self) -> np.ndarray | None:
        """``(B, *block_shape)`` float64 array, 1 on real entries and 0 on padding; ``None`` if
        nothing is padded."""
        if not self.padded:
            return None
        from kron.core.ops import get_ops

        return self.to_blocks(np.ones(self.shape), get_ops("numpy"))

    def _axes(self) -> list[tuple[int, int, int]]:
        return list(zip(self.grid, self.block_shape, self.work_shape))


def squarest_split(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view ``(prod(shape[:j]), prod(shape[j:]))`` closest to square (first on ties)."""
    best = None
    for j in range(1, len(shape)):
        rows, cols = math.prod(shape[:j]), math.prod(shape[j:])
        imbalance = abs(math.log(rows) - math.log(cols))
        if best is None or imbalance < best[0] - 1e-12:
            best = (imbalance, (rows, cols))
    assert best is not None
    return best[1]


def first_last_split(shape: tuple[int, ...]) -> tuple[int, int]:
    """kron_torch's 2-D view: ``(prod(shape[:-1]), shape[-1])`` unless ``(shape[0],
    prod(shape[1:]))`` has a smaller signed difference ``cols − rows`` (so, unlike
    :func:`squarest_split`, it favours views with more rows than columns)."""
    last = (math.prod(shape[:-1]), shape[-1])
    first = (shape[0], math.prod(shape[1:]))
    return last if last[1] - last[0] <= first[1] - first[0] else first


def heavyball_merge(shape: tuple[int, ...], limit: float) -> tuple[int, ...]:
    """heavyball 1.5's ``utils.dim_merger``: axis 0 is kept, and the other axes, from the last,
    are folded into one while their product stays within ``limit``; an axis that would take it
    past starts the next fold (or, after an empty fold, stays alone). The folds are listed in
    heavyball's order, the one left open at the end last, and the tensor is reshaped to that
    shape: a reshape that, from four axes on, need not merge neighbours ((4, 5, 6, 7) at 40
    becomes (4, 7, 30)), as in heavyball."""
    folds, current = [], 1
    for n in reversed(shape[1:]):
        if current * n <= limit:
            current *= n
        elif current > 1:
            folds.append(current)
            current = n
        else:
            folds.append(n)
    merged = [*shape[:1], *reversed(folds)]
    if current > 1 or not merged:
        merged.append(current)
    return tuple(merged)


def _marked_by_memory_mode(shape: tuple[int, ...], mode: str | None) -> set[int]:
    k = len(shape)
    ascending = sorted(range(k), key=lambda i: shape[i])  # stable: ties keep axis order
    largest = ascending[-1]
    if mode is None:
        return set()
    if mode == "one_diag":
        return {largest}
    if mode == "smart_one_diag":
        sizes = sorted(shape)
        return {largest} if k > 1 and sizes[-1] > sizes[-2] else set()
    if mode == "one_triu":
        return set(range(k)) - {ascending[0]}
    return set(range(k))  # all_diag


@lru_cache(maxsize=4096)
def make_plan(shape: tuple[int, ...], options: LayoutOptions = LayoutOptions()) -> Plan:
    """The :class:`Plan` for a parameter of ``shape`` (any order, including 0-d)."""
    if not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in shape):
        raise ValueError(f"A shape holds whole numbers; got {tuple(shape)!r}.")
    shape = tuple(int(n) for n in shape)
    if any(n < 1 for n in shape):
        raise ValueError(f"Cannot precondition an empty tensor of shape {shape}.")
    order = len(shape)  # what min_ndim_dense counts
    if options.merge_dims == "first_last":
        # kron_torch merges before dropping size-1 axes.
        merged = first_last_split(shape) if len(shape) > 2 else shape
        work = tuple(n for n in merged if n > 1) or (1,)
    elif options.merge_dims == "heavyball":
        # heavyball merges before dropping size-1 axes, and counts the merged tensor's axes.
        limit = options.max_size if options.merge_size is None else options.merge_size
        merged = heavyball_merge(shape, limit)
        work, order = tuple(n for n in merged if n > 1) or (1,), len(merged)
    else:
        work = tuple(n for n in shape if n > 1) or (1,)
        if options.merge_dims and len(work) > 2:
            work = squarest_split(work)
    # max_size speaks of the work axes (squeezed and merged), before tiling: a longer one is
    # diagonal however it would be tiled, and is left whole, since cutting a diagonal saves
    # nothing and would multiply the other axes' dense blocks (a 50257×4096 embedding in
    # 256-blocks: 3152 pairs of 256² factors).
    long = tuple(n > options.max_size or (options.whole_vectors and len(work) == 1) for n in work)
    bs = options.block_size
    grid = tuple(1 if bs is None or n <= bs or lg else -(-n // bs) for n, lg in zip(work, long))
    block = tuple(n if g == 1 else bs for n, g in zip(work, grid))
    size = math.prod(block)
    marked = _marked_by_memory_mode(block, options.memory_save_mode)
    dense = tuple(
        not (
            n == 1
            or long[i]
            or n * n > options.max_skew * size
            or order < options.min_ndim_dense
            or i in marked
        )
        for i, n in enumerate(block)
    )
    return Plan(shape=shape, work_shape=work, grid=grid, block_shape=block, dense=dense)
