"""Whole jitted train-step time and compile time: kron.optax against psgdax and optax.adamw.

Every optimizer runs in this one process on the same model and batches. For each (model, update
probability, optimizer) cell the script compiles ``step(params, state, x, y)`` (forward, backward,
optimizer update, apply) and reports the compile time, then the mean time per step over
``--steps`` steps, as the median of ``--repeats`` windows taken in turn across optimizers (so
load from other processes hits every optimizer alike). Results go to stdout as a Markdown table
and to ``--json``.

    python benchmarks/optax_step.py --json benchmarks/results/optax_step_cpu.json

``--factor-dtypes float32 bfloat16`` adds each Kron variant with ``precond_dtype=bfloat16`` (its
rows are named ``... (bfloat16 factors)`` and compared with psgdax at the same dtype).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kron.optax

BATCH = 128


def mlp_params(key: jax.Array, sizes: list[int]) -> dict:
    keys = jax.random.split(key, len(sizes) - 1)
    return {
        f"layer{i}": {
            "w": jax.random.normal(k, (m, n)) / np.sqrt(m),
            "b": jnp.zeros(n),
        }
        for i, (k, m, n) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
    }


def mlp_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    h = x
    names = sorted(params, key=lambda name: int(name[5:]))
    for name in names[:-1]:
        h = jax.nn.relu(h @ params[name]["w"] + params[name]["b"])
    logits = h @ params[names[-1]]["w"] + params[names[-1]]["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def scanned_params(key: jax.Array, width: int, depth: int) -> dict:
    keys = jax.random.split(key, 2)
    return {
        "body": {
            "w": jax.random.normal(keys[0], (depth, width, width)) / np.sqrt(width),
            "b": jnp.zeros((depth, width)),
        },
        "head": {"w": jax.random.normal(keys[1], (width, 10)) / np.sqrt(width), "b": jnp.zeros(10)},
    }


def scanned_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    def layer(h, wb):
        w, b = wb
        return jax.nn.relu(h @ w + b), None

    h, _ = jax.lax.scan(layer, x, (params["body"]["w"], params["body"]["b"]))
    logits = h @ params["head"]["w"] + params["head"]["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def models() -> dict[str, tuple[dict, Callable, int, object]]:
    """name -> (params, loss, input width, scanned_layers tree or None)."""
    key = jax.random.PRNGKey(0)
    deep = scanned_params(key, 256, 12)
    scanned = {"body": {"w": True, "b": True}, "head": {"w": False, "b": False}}
    return {
        "MLP 256-512-512-10": (mlp_params(key, [256, 512, 512, 10]), mlp_loss, 256, None),
        "MLP 12x256 (unrolled)": (
            mlp_params(key, [256] * 13 + [10]),
            mlp_loss,
            256,
            None,
        ),
        "MLP 12x256 (scanned)": (deep, scanned_loss, 256, scanned),
    }


def optimizers(
    probability: float, scanned: object, factor_dtypes: tuple[str, ...] = ("float32",)
) -> dict[str, Callable[[], optax.GradientTransformation]]:
    """The optimizers of one cell by row name; a Kron variant once per factor dtype."""
    try:
        import psgdax
    except ImportError:
        psgdax = None
    made: dict[str, Callable[[], optax.GradientTransformation]] = {}
    for dtype_name in factor_dtypes:
        suffix = "" if dtype_name == "float32" else f" ({dtype_name} factors)"
        dtype = jnp.dtype(dtype_name)
        made["kron.optax" + suffix] = lambda dtype=dtype: kron.optax.kron(
            learning_rate=1e-3,
            preconditioner_update_probability=probability,
            scanned_layers=scanned,
            precond_dtype=dtype,
        )
        if psgdax is not None:
            # A fresh key each time: psgdax's default key is one array made at import, which
            # the first donated step would delete for every later instance.
            made["psgdax" + suffix] = lambda dtype=dtype: psgdax.kron(
                learning_rate=1e-3,
                preconditioner_update_probability=probability,
                scanned_layers=scanned,
                precond_dtype=dtype,
                key=jax.random.PRNGKey(42),
            )
    made["optax.adamw"] = lambda: optax.adamw(1e-3)
    return made


def make_step(tx: optax.GradientTransformation, loss: Callable) -> Callable:
    """The jitted train step. Params and optimizer state are donated, as training loops do
    (Flax's examples, MaxText): without donation every step also copies the whole state into
    fresh output buffers, which charges each optimizer for its state size rather than its math."""

    def step(params, state, x, y):
        grads = jax.grad(loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def compiled_run(make: Callable, params0: dict, loss: Callable, x, y, best: dict | None) -> dict:
    """A fresh transformation from ``make``, its params and state, and its train step compiled
    afresh: ``{"compiled", "params", "state", "compile_s", "gflop", "windows": []}``.
    ``compile_s`` is the shorter of this compile and ``best``'s (an earlier run of the same
    optimizer): one compile varies by ±20 % with the machine's load. ``gflop`` is XLA's count
    per step (every branch of a ``lax.cond`` included)."""
    tx = make()
    params = jax.tree.map(jnp.copy, params0)
    state = tx.init(params)
    start = time.perf_counter()
    compiled = make_step(tx, loss).lower(params, state, x, y).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {
        "compiled": compiled,
        "params": params,
        "state": state,
        "compile_s": compile_s if best is None else min(compile_s, best["compile_s"]),
        "gflop": cost.get("flops", float("nan")) / 1e9,
        "windows": [],
    }


def time_in_turn(runs: dict[str, dict], x, y, args: argparse.Namespace) -> None:
    """``args.warmup`` steps of each run, then ``args.repeats`` windows of ``args.steps`` steps,
    taken in turn across the runs so that load from other processes hits every one alike;
    each window's mean ms per step is appended to its run's ``windows``."""
    for run in runs.values():
        for _ in range(args.warmup):
            run["params"], run["state"] = run["compiled"](run["params"], run["state"], x, y)
        jax.block_until_ready(run["params"])
    for _ in range(args.repeats):
        for run in runs.values():
            start = time.perf_counter()
            for _ in range(args.steps):
                run["params"], run["state"] = run["compiled"](run["params"], run["state"], x, y)
            jax.block_until_ready(run["params"])
            run["windows"].append((time.perf_counter() - start) / args.steps * 1e3)


def measure(args: argparse.Namespace) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for model_name, (params0, loss, width, scanned) in models().items():
        if args.models and model_name not in args.models:
            continue
        x = jnp.asarray(rng.standard_normal((BATCH, width)), jnp.float32)
        y = jnp.asarray(rng.integers(0, 10, BATCH))
        for probability in args.probabilities:
            runs: dict[str, dict] = {}
            # Each optimizer's step is compiled afresh ``--compiles`` times, in turn across the
            # optimizers, and the shortest time is kept.
            for _ in range(args.compiles):
                for name, make in optimizers(probability, scanned, args.factor_dtypes).items():
                    runs[name] = compiled_run(make, params0, loss, x, y, runs.get(name))
            time_in_turn(runs, x, y, args)
            for name, run in runs.items():
                rows.append(
                    {
                        "model": model_name,
                        "probability": probability,
                        "optimizer": name,
                        "ms_per_step": statistics.median(run["windows"]),
                        "compile_s": run["compile_s"],
                    }
                )
                print(
                    f"{model_name} p={probability} {name}: "
                    f"{rows[-1]['ms_per_step']:.2f} ms, compile {run['compile_s']:.2f} s",
                    flush=True,
                )
    return rows


def table(rows: list[dict]) -> str:
    """One line per (model, p, factor dtype); float32 factors only keep the original layout."""
    cells: dict[tuple, dict] = {}
    for row in rows:
        cells.setdefault((row["model"], row["probability"]), {})[row["optimizer"]] = row
    suffixes = sorted(
        {name.removeprefix("kron.optax") for cell in cells.values() for name in cell}
        & {"", *(f" ({d} factors)" for d in ("bfloat16", "float16"))}
    )
    with_dtype = suffixes != [""]
    head = "| model | p |" + (" factors |" if with_dtype else "")
    lines = [
        head + " kron.optax ms | psgdax ms | adamw ms | ours / psgdax | ours / adamw "
        "| compile ours s | compile psgdax s |",
        "|---|---|" + ("---|" if with_dtype else "") + "---|---|---|---|---|---|---|",
    ]
    for (model, p), cell in cells.items():
        adam = cell["optax.adamw"]
        for suffix in suffixes:
            ours, peer = cell.get("kron.optax" + suffix), cell.get("psgdax" + suffix)
            if ours is None:
                continue
            peer_ms = f"{peer['ms_per_step']:.2f}" if peer else "n/a"
            ratio = f"{ours['ms_per_step'] / peer['ms_per_step']:.2f}" if peer else "n/a"
            peer_compile = f"{peer['compile_s']:.1f}" if peer else "n/a"
            dtype = f" {suffix.strip(' ()').removesuffix(' factors') or 'float32'} |"
            lines.append(
                f"| {model} | {p} |{dtype if with_dtype else ''} {ours['ms_per_step']:.2f} "
                f"| {peer_ms} | {adam['ms_per_step']:.2f} | {ratio} "
                f"| {ours['ms_per_step'] / adam['ms_per_step']:.2f} "
                f"| {ours['compile_s']:.1f} | {peer_compile} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compiles", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--models", nargs="+", default=None, help="model names (default: all)")
    parser.add_argument("--probabilities", nargs="+", type=float, default=[1.0, 0.03])
    parser.add_argument(
        "--factor-dtypes",
        nargs="+",
        default=["float32"],
        choices=["float32", "bfloat16"],
        help="precond_dtype of the Kron variants (default: float32 only)",
    )
    args = parser.parse_args()
    args.factor_dtypes = tuple(args.factor_dtypes)
    rows = measure(args)
    print(table(rows))
    if args.json:
        versions = {"jax": jax.__version__, "optax": optax.__version__}
        try:
            import importlib.metadata as metadata

            versions["psgdax"] = metadata.version("psgdax")
        except Exception:
            versions["psgdax"] = None
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": platform.processor() or platform.machine(),
                    "devices": str(jax.devices()),
                    "versions": versions,
                    "args": vars(args),
                    "rows": rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
