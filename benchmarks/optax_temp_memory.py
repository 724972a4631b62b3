"""JAX/optax: what sets the size of a jitted train step's temporary buffer on XLA:CPU?

XLA:CPU allocates one buffer for all of a step's temporaries on every execution, and glibc maps
an allocation above 32 MiB afresh each time (benchmarks/RESULTS.md, "JAX/optax at p = 0.03 with
glibc's heap kept"). This script compiles ``benchmarks/optax_step.py``'s train steps and prints
``compiled.memory_analysis().temp_size_in_bytes`` for ``kron.optax.kron`` under a few settings,
and for psgdax when it is installed.

    python benchmarks/optax_temp_memory.py     # about 1 minute
"""

from __future__ import annotations

import jax.numpy as jnp
from optax_step import BATCH, make_step, models

import kron.optax

# name: (options of kron.optax.kron beyond scanned_layers and the learning rate)
SETTINGS = {
    "defaults, p = 0.03": dict(preconditioner_update_probability=0.03),
    "p = 1 (no fit cond)": dict(preconditioner_update_probability=1.0),
    "p = 0.03, fixed init scale (no init-scale cond)": dict(
        preconditioner_update_probability=0.03, preconditioner_init_scale=1.0
    ),
}


def temp_mib(tx, params, loss, width) -> float:
    state = tx.init(params)
    x, y = jnp.zeros((BATCH, width)), jnp.zeros((BATCH,), jnp.int32)
    compiled = make_step(tx, loss).lower(params, state, x, y).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def main() -> None:
    print("| model | optimizer | temporaries MiB |\n|---|---|---|")
    for name, (params, loss, width, scanned) in models().items():
        for label, options in SETTINGS.items():
            tx = kron.optax.kron(learning_rate=1e-3, scanned_layers=scanned, **options)
            print(f"| {name} | kron.optax, {label} | {temp_mib(tx, params, loss, width):.1f} |")
        try:
            import jax
            import psgdax
        except ImportError:
            continue
        tx = psgdax.kron(
            learning_rate=1e-3,
            preconditioner_update_probability=0.03,
            scanned_layers=scanned,
            key=jax.random.PRNGKey(42),
        )
        print(f"| {name} | psgdax, p = 0.03 | {temp_mib(tx, params, loss, width):.1f} |")


if __name__ == "__main__":
    main()
