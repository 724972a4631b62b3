"""kron.optax: PSGD-Kron for JAX as optax transformations.

psgdax's contract: :func:`kron`, :func:`scale_by_kron` (and :func:`kron_partition_specs`, the
specs of their state on a mesh). eformer's: :func:`quad`, :func:`skew`, :func:`scale_by_quad`,
:func:`scale_by_skew`, :func:`get_opt_state_partition_specs`, and its state records
:class:`DenseState` and :class:`LeafState` through :func:`white_kron_states`. All share one state
type, :class:`KronState`. Importing this module creates no device arrays.
"""

from kron.optax.alias import kron, kron_partition_specs, static_args
from kron.optax.quad_skew import (
    get_opt_state_partition_specs,
    quad,
    scale_by_quad,
    scale_by_skew,
    skew,
)
from kron.optax.state import KronState, leaf_key
from kron.optax.transform import scale_by_kron
from kron.optax.white_kron_state import DenseState, LeafState, white_kron_states

__all__ = [
    "DenseState",
    "KronState",
    "LeafState",
    "get_opt_state_partition_specs",
    "kron",
    "kron_partition_specs",
    "leaf_key",
    "quad",
    "scale_by_kron",
    "scale_by_quad",
    "scale_by_skew",
    "skew",
    "static_args",
    "white_kron_states",
]
