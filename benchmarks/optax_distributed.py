"""kron.optax on a mesh: optimizer-state bytes per device and jitted step time on 1, 4 and 8
devices, for the 12-layer 256-wide MLP of optax_step.py, unrolled and as a scanned stack.

Each device count runs in its own process (``XLA_FLAGS=--xla_force_host_platform_device_count=N``
must be set before JAX starts). In a worker, for every (model, parameter placement, optimizer)
cell the script places the params on a 1-D mesh ``("dp",)``, builds the state with the
optimizer's spec helper, compiles ``step(params, state, x, y)`` (forward, backward, update,
apply) with those shardings, and reports:

* the bytes of the optimizer state held by device 0 (the sum over ``addressable_shards`` on it),
  and of the params;
* the mean time per step over ``--steps`` steps, the median of ``--repeats`` windows;
* the compile time, and XLA's temporary buffer size per device (``memory_analysis``).

Placements: ``replicated`` (pure data parallelism: every device holds all params; only the
factor stacks are split, ZeRO-1 style) and ``fsdp`` (weights split over "dp" on their first
256-wide axis, so the momentum is split too). Optimizers: ``kron`` (psgdax contract, update
probability 1 so every step fits P) and ``quad`` (eformer contract, bfloat16 state), both with
``pipeline_axis_name="dp"``; on 1 device also ``kron``/``quad`` without an axis (per-leaf state).

Host devices share the machine's cores: on a 2-core CPU, 4 or 8 "devices" are threads of one
process, not parallel hardware, so the step times show the overhead of the partitioned program,
not a speed-up. The bytes are what a real mesh would hold per device.

    python benchmarks/optax_distributed.py --json benchmarks/results/optax_distributed_cpu.json
    python benchmarks/optax_distributed.py \
        --markdown-from benchmarks/results/optax_distributed_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

AXIS = "dp"
DEVICE_COUNTS = (1, 4, 8)


def _models():
    """name -> (params, loss, input width, scanned_layers tree or None), as in optax_step.py."""
    import jax

    sys.path.insert(0, str(Path(__file__).parent))
    from optax_step import mlp_loss, mlp_params, scanned_loss, scanned_params

    key = jax.random.PRNGKey(0)
    scanned = {"body": {"w": True, "b": True}, "head": {"w": False, "b": False}}
    return {
        "MLP 12x256 (unrolled)": (mlp_params(key, [256] * 13 + [10]), mlp_loss, 256, None),
        "MLP 12x256 (scanned)": (scanned_params(key, 256, 12), scanned_loss, 256, scanned),
    }


def _param_specs(params, placement: str, devices: int):
    """``P()`` everywhere (replicated), or FSDP: the first axis that is not a scanned-layer
    axis and divides by the device count is split over "dp"."""
    import jax
    from jax.sharding import PartitionSpec

    def spec(path, x) -> PartitionSpec:
        if placement == "replicated":
            return PartitionSpec()
        scanned = any(getattr(k, "key", None) == "body" for k in path)
        axes = [None] * x.ndim
        for i in range(1 if scanned else 0, x.ndim):
            if x.shape[i] % devices == 0:
                axes[i] = AXIS
                break
        return PartitionSpec(*axes)

    return jax.tree_util.tree_map_with_path(spec, params)


def _optimizer(name: str, devices: int, scanned, specs, sharded: bool):
    import kron.optax as ko

    axis = (
        dict(pipeline_axis_name=AXIS, pipeline_axis_size=devices, params_partition_specs=specs)
        if sharded
        else {}
    )
    if name == "kron":
        options = dict(
            learning_rate=1e-3,
            preconditioner_update_probability=1.0,
            scanned_layers=scanned,
            **axis,
        )
        return ko.kron(**options), ko.kron_partition_specs, options
    options = dict(learning_rate=1e-3, scanned_layers=scanned, **axis)
    return ko.quad(**options), ko.get_opt_state_partition_specs, options


def _cell(model, placement, opt_name, sharded, devices, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding, PartitionSpec

    from kron.optax.sharding import bytes_on

    params, loss, width, scanned = model
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((128, width)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 128))
    mesh = jax.make_mesh((devices,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
    is_spec = lambda s: isinstance(s, PartitionSpec)  # noqa: E731
    specs = _param_specs(params, placement, devices)
    tx, specs_of, options = _optimizer(opt_name, devices, scanned, specs, sharded)

    def step(params, state, x, y):
        grads = jax.grad(loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    with jax.set_mesh(mesh):
        named = lambda tree: jax.tree.map(  # noqa: E731
            lambda s: NamedSharding(mesh, s), tree, is_leaf=is_spec
        )
        param_shardings = named(specs)
        # From host copies: the step donates its params, which must not alias the model's.
        params = jax.device_put(jax.tree.map(np.asarray, params), param_shardings)
        state_shardings = named(specs_of(params, **options))
        state = jax.jit(tx.init, out_shardings=state_shardings)(params)
        jitted = jax.jit(
            step,
            in_shardings=(param_shardings, state_shardings, None, None),
            out_shardings=(param_shardings, state_shardings),
            donate_argnums=(0, 1),
        )
        start = time.perf_counter()
        compiled = jitted.lower(params, state, x, y).compile()
        compile_s = time.perf_counter() - start
        memory = compiled.memory_analysis()
        device0 = mesh.devices.flat[0]
        state_bytes = bytes_on(device0, state)
        param_bytes = bytes_on(device0, params)
        for _ in range(args.warmup):
            params, state = compiled(params, state, x, y)
        jax.block_until_ready(params)
        windows = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for _ in range(args.steps):
                params, state = compiled(params, state, x, y)
            jax.block_until_ready(params)
            windows.append((time.perf_counter() - start) / args.steps * 1e3)
        finite = all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))
    return {
        "devices": devices,
        "placement": placement,
        "optimizer": opt_name if sharded else f"{opt_name} (no axis)",
        "state_bytes_device0": state_bytes,
        "param_bytes_device0": param_bytes,
        "ms_per_step": statistics.median(windows),
        "compile_s": compile_s,
        "temp_bytes_per_device": getattr(memory, "temp_size_in_bytes", None),
        "finite": finite,
    }


def worker(args: argparse.Namespace) -> None:
    """Measure every cell on this process's devices; one JSON row per line on stdout."""
    import jax

    devices = jax.device_count()
    for model_name, model in _models().items():
        for placement in ("replicated", "fsdp"):
            if devices == 1 and placement == "fsdp":
                continue  # one device: nothing to split, the same as replicated
            for opt_name in ("kron", "quad"):
                for sharded in (True, False) if devices == 1 else (True,):
                    row = _cell(model, placement, opt_name, sharded, devices, args)
                    row["model"] = model_name
                    print(json.dumps(row), flush=True)


def run_workers(args: argparse.Namespace) -> list[dict]:
    rows = []
    for count in args.devices:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}")
        command = [sys.executable, __file__, "--worker", *_worker_args(args)]
        print(f"# {count} device(s)", flush=True)
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if out.returncode:
            raise RuntimeError(f"worker with {count} devices failed:\n{out.stderr[-4000:]}")
        for line in out.stdout.splitlines():
            if line.startswith("{"):
                rows.append(json.loads(line))
                row = rows[-1]
                print(
                    f"{row['model']} {row['placement']} {row['optimizer']} x{count}: "
                    f"{row['state_bytes_device0'] / 2**10:.0f} KiB, {row['ms_per_step']:.1f} ms",
                    flush=True,
                )
    return rows


def _worker_args(args: argparse.Namespace) -> list[str]:
    return [
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--repeats={args.repeats}",
    ]


def table(rows: list[dict]) -> str:
    """Markdown: one line per cell; ``× 1 device`` divides by the same optimizer's per-leaf
    (no axis) state on one device."""
    baseline = {
        (r["model"], r["optimizer"].split()[0]): r["state_bytes_device0"]
        for r in rows
        if r["devices"] == 1 and r["optimizer"].endswith("(no axis)")
    }
    lines = [
        "| model | optimizer | params | devices | state KiB/device | × 1 device "
        "| params KiB/device | ms/step | compile s | XLA temp MiB/device |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def order(r: dict) -> tuple:
        return (r["model"], r["optimizer"].split()[0], r["placement"] != "replicated", r["devices"])

    for r in sorted(rows, key=order):
        base = baseline.get((r["model"], r["optimizer"].split()[0]))
        ratio = f"{r['state_bytes_device0'] / base:.2f}" if base else "n/a"
        temp = r["temp_bytes_per_device"]
        lines.append(
            f"| {r['model']} | {r['optimizer']} | {r['placement']} | {r['devices']} "
            f"| {r['state_bytes_device0'] / 2**10:.0f} | {ratio} "
            f"| {r['param_bytes_device0'] / 2**10:.0f} | {r['ms_per_step']:.1f} "
            f"| {r['compile_s']:.1f} | {'n/a' if temp is None else f'{temp / 2**20:.1f}'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=list(DEVICE_COUNTS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown-from", default=None, help="print the table of a JSON result")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.markdown_from:
        with open(args.markdown_from) as f:
            print(table(json.load(f)["rows"]))
        return
    rows = run_workers(args)
    print(table(rows))
    if args.json:
        import jax
        import optax

        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(),
                    "versions": {"jax": jax.__version__, "optax": optax.__version__},
                    "args": {k: v for k, v in vars(args).items() if k != "worker"},
                    "rows": rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
