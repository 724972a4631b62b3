"""Time of one n×n matrix product in float32 and in bfloat16, per framework, on this machine.

The preconditioner's products are most of a Kron step on a CPU (benchmarks/RESULTS.md), so the
speed of a bfloat16 product decides whether bfloat16 factors pay. Each variant multiplies two
fresh-looking (1, n, n) standard normal matrices, as the batched factor products do; times are
the median of ``--repeats`` windows of ``--calls`` calls, the windows taken in turn across the
variants so that load from other processes hits each alike. Variants:

* torch: ``a @ b`` in float32; in bfloat16 with the float32 inputs cast first and the result
  cast back (what a float32 momentum meets at bfloat16 factors).
* JAX (jitted): float32; bfloat16 ``jnp.matmul`` (XLA's bfloat16 dot); bfloat16 inputs with
  ``preferred_element_type=float32`` (float32 accumulation, what ``kron.core``'s JAX backend uses
  for half-precision products).
* TensorFlow (``tf.function``): float32 and bfloat16 ``tf.matmul`` (Keras's TensorFlow backend).

    python benchmarks/bf16_products.py --json benchmarks/results/bf16_products_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np


def torch_variants(a: np.ndarray, b: np.ndarray, threads: int) -> dict[str, Callable[[], object]]:
    import torch

    torch.set_num_threads(threads)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ha, hb = ta.bfloat16(), tb.bfloat16()
    return {
        "torch float32": lambda: ta @ tb,
        "torch bfloat16 (cast in and out)": lambda: (ta.bfloat16() @ tb.bfloat16()).float(),
        "torch bfloat16": lambda: ha @ hb,
    }


def jax_variants(a: np.ndarray, b: np.ndarray) -> dict[str, Callable[[], object]]:
    import jax
    import jax.numpy as jnp

    fa, fb = jnp.asarray(a), jnp.asarray(b)
    ha, hb = fa.astype(jnp.bfloat16), fb.astype(jnp.bfloat16)
    plain = jax.jit(jnp.matmul)
    accumulate = jax.jit(
        lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32).astype(x.dtype)
    )
    return {
        "JAX float32": lambda: plain(fa, fb).block_until_ready(),
        "JAX bfloat16 (XLA's dot)": lambda: plain(ha, hb).block_until_ready(),
        "JAX bfloat16 (float32 accumulation)": lambda: accumulate(ha, hb).block_until_ready(),
    }


def tf_variants(a: np.ndarray, b: np.ndarray) -> dict[str, Callable[[], object]]:
    import tensorflow as tf

    fa, fb = tf.constant(a), tf.constant(b)
    ha, hb = tf.cast(fa, tf.bfloat16), tf.cast(fb, tf.bfloat16)
    product = tf.function(tf.matmul)
    return {
        "TensorFlow float32": lambda: product(fa, fb).numpy(),
        "TensorFlow bfloat16": lambda: product(ha, hb).numpy(),
    }


def measure(n: int, args: argparse.Namespace) -> dict[str, float]:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((1, n, n)).astype(np.float32)
    b = rng.standard_normal((1, n, n)).astype(np.float32)
    variants: dict[str, Callable[[], object]] = {}
    frameworks = {
        "torch": lambda: torch_variants(a, b, args.threads),
        "jax": lambda: jax_variants(a, b),
        "tensorflow": lambda: tf_variants(a, b),
    }
    for name in args.frameworks:
        variants.update(frameworks[name]())
    for run in variants.values():
        for _ in range(5):
            run()
    windows: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                run()
            windows[name].append((time.perf_counter() - start) / args.calls * 1e3)
    return {name: statistics.median(w) for name, w in windows.items()}


def table(results: dict[int, dict[str, float]]) -> str:
    lines = ["| n | product | ms | × float32 of its framework |", "|---|---|---|---|"]
    for n, row in results.items():
        for name, ms in row.items():
            framework = name.split(" ")[0]
            base = row[f"{framework} float32"]
            lines.append(f"| {n} | {name} | {ms:.3f} | {ms / base:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512, 1024])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument(
        "--frameworks",
        nargs="+",
        default=["torch", "jax", "tensorflow"],
        choices=["torch", "jax", "tensorflow"],
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = {n: measure(n, args) for n in args.sizes}
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": platform.processor() or platform.machine(),
                    "args": vars(args),
                    "ms": {str(n): row for n, row in results.items()},
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
