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

    def matmul(self, a, b):
        # Half-precision products accumulate in float32 and round once, as GPU and TPU kernels
        # do. XLA:CPU's own bfloat16 dot gives the same values but is the slower path there: a
        # 512×512 product took 2.0 ms against 0.9 ms this way (benchmarks/RESULTS.md, *Matrix
        # products in bfloat16*).
        dtype = jnp.result_type(a, b)
        if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
            return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(dtype)
        return jnp.matmul(a, b)
