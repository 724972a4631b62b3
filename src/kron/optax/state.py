"""The optimizer state of :mod:`kron.optax`: a NamedTuple of arrays that also serialises itself.

``to_dict``/``from_dict`` give nested Python containers of NumPy arrays (what ``np.savez`` or a
pickle takes); ``to_json``/``from_json`` a text form that restores every array bit for bit,
bfloat16 included; ``replace`` is ``_replace`` under the name eformer's state classes use.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_ARRAY, _TUPLE = "__array__", "__tuple__"


def leaf_key(key: jax.Array, count: jax.Array, index: int, stream: int) -> jax.Array:
    """The key of random stream ``stream`` of leaf (or stack) ``index`` at step ``count``."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, count), index), stream)


class KronState(NamedTuple):
    """State of :func:`kron.optax.scale_by_kron`, :func:`~kron.optax.scale_by_quad` and
    :func:`~kron.optax.scale_by_skew`.

    Attributes:
      count: int32 scalar, steps taken.
      mu: momentum, shaped like the params, in ``mu_dtype``.
      factors: per leaf, a tuple of ``Q_i`` (``P_i`` for PRO4P/QUAD4P), each ``(S·B, n, n)``
        (dense) or ``(S·B, n)`` (diagonal), where ``S`` is the number of scanned layers (1 for an
        unscanned leaf) and ``B`` the number of blocks per layer; layer ``s`` owns rows
        ``s·B … (s+1)·B - 1``. With ``pipeline_axis_name`` (a stacked state) ``factors``,
        ``lipschitz`` and ``cache`` are instead tuples with one entry per plan, ``(R, …)``,
        ``R`` the plan's rows padded to a multiple of ``pipeline_axis_size``.
      lipschitz: per leaf, a tuple of ``(S·B,)`` Lipschitz estimates (at least float32).
      decision_total: float32 scalar, the counter of the deterministic decision rule.
      needs_scale_init: bool scalar; with an automatic init scale, Q is rescaled on the first
        update with a gradient that is finite and not all zeros (Newton type: on the first
        fit).
      skipped: int32 scalar per leaf, layers whose update was skipped for a non-finite gradient.
      key: the PRNG key every draw is folded from.
      cache: per leaf, ``P_i = Q_iᵀQ_i`` shaped like ``factors`` when caching is on, else ``()``.

    psgdax's field names ``Qs_preconditioners`` and ``Ls_lipschitz`` read ``factors`` and
    ``lipschitz``.
    """

    count: jax.Array
    mu: Any
    factors: Any
    lipschitz: Any
    decision_total: jax.Array
    needs_scale_init: jax.Array
    skipped: Any
    key: jax.Array
    cache: Any = ()

    @property
    def Qs_preconditioners(self) -> Any:
        """psgdax's name for :attr:`factors`."""
        return self.factors

    @property
    def Ls_lipschitz(self) -> Any:
        """psgdax's name for :attr:`lipschitz`."""
        return self.lipschitz

    def replace(self, **changes: Any) -> KronState:
        """A copy with ``changes`` applied."""
        return self._replace(**changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as nested dicts, lists and tuples of NumPy arrays."""
        return {name: jax.tree.map(np.asarray, value) for name, value in self._asdict().items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KronState:
        """Inverse of :meth:`to_dict`; arrays become JAX arrays of the same dtype."""
        return cls(**{name: jax.tree.map(jnp.asarray, data[name]) for name in cls._fields})

    def to_json(self, **kwargs: Any) -> str:
        """The state as JSON; ``kwargs`` go to :func:`json.dumps`."""
        return json.dumps(
            {name: json_value(value) for name, value in self.to_dict().items()}, **kwargs
        )

    @classmethod
    def from_json(cls, text: str) -> KronState:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(
            {name: from_json_value(value) for name, value in json.loads(text).items()}
        )


def json_value(value: Any) -> Any:
    """``value`` (nested dicts, lists, tuples, NumPy arrays and Python scalars) as JSON-ready
    containers; arrays keep their dtype and shape, tuples stay tuples."""
    if isinstance(value, np.ndarray):
        return {_ARRAY: value.tolist(), "dtype": value.dtype.name, "shape": list(value.shape)}
    # Exact types: a NamedTuple or an OrderedDict would come back as a plain tuple or dict, a
    # different pytree, and the restored state would no longer match the params.
    if type(value) is tuple:
        return {_TUPLE: [json_value(v) for v in value]}
    if type(value) is list:
        return [json_value(v) for v in value]
    if type(value) is dict:
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"to_json needs string dict keys; got keys {list(value)!r}.")
        return {k: json_value(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        "to_json handles dicts, lists, tuples, arrays, None and Python scalars (not their "
        f"subclasses); got {type(value).__name__}. "
        "Use to_dict with a pickle-based store for custom pytree nodes."
    )


def from_json_value(value: Any) -> Any:
    """Inverse of :func:`json_value`; arrays come back as NumPy arrays."""
    if isinstance(value, dict) and _ARRAY in value:
        dtype = jnp.dtype(value["dtype"])
        return np.asarray(value[_ARRAY], dtype=dtype).reshape(value["shape"])
    if isinstance(value, dict) and _TUPLE in value:
        return tuple(from_json_value(v) for v in value[_TUPLE])
    if isinstance(value, dict):
        return {k: from_json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json_value(v) for v in value]
    return value


__all__ = ["KronState", "from_json_value", "json_value", "leaf_key"]
