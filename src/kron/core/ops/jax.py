"""JAX backend: the NumPy backend with ``jax.numpy`` swapped in, plus the few spellings that
differ (triangular solve, finfo, immutable arrays). It never changes JAX's global configuration:
float64 works when the caller has enabled ``jax_enable_x64``."""

from __future__ import annotations

import jax.numpy as jnp
import jax.scipy.linalg

from kron.core.ops.numpy import NumpyOps


class JaxOps(NumpyOps):
    name = "jax"
    xp = jnp

    def eps(self, dtype):
        return float(jnp.finfo(dtype).eps)

    def tiny(self, dtype):
        return float(jnp.finfo(dtype).tiny)

    def solve_lower(self, lower, rhs):
        return jax.scipy.linalg.solve_triangular(lower, rhs, lower=True)
