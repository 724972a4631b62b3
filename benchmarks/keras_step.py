"""Time per ``model.fit`` step of ``kron.keras.Kron`` against Keras's Adam on each Keras backend.

Each backend runs in its own process (Keras picks its backend at import). For each model and
optimizer the script compiles the model (each backend's default: XLA on TensorFlow, ``jax.jit`` on
JAX, eager PyTorch), fits once to warm up (compilation included), then times ``model.fit`` over
windows of whole preconditioner periods and reports the median time per step. The data are the
same random arrays everywhere; TensorFlow gets them as a dataset without tf.data's autotuning
(see ``_dataset_without_autotune``).

    .venv/bin/python benchmarks/keras_step.py --json benchmarks/results/keras_step_cpu.json
    .venv/bin/python benchmarks/keras_step.py --markdown-from benchmarks/results/keras_step_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

BACKENDS = ("tensorflow", "jax", "torch")
# (name, input shape, batch size, number of batches in the data set)
MODELS = {"mlp": ((256,), 128), "cnn": ((28, 28, 1), 64)}
PROBABILITIES = (1.0, 0.03)


def build_model(name: str):
    import keras

    if name == "mlp":  # 256-512-512-10, as in the PyTorch benchmark
        layers = [
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(10),
        ]
    else:  # a small CNN on 28×28 images
        layers = [
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    return keras.Sequential([keras.Input(MODELS[name][0]), *layers])


def time_fit(
    model_name: str,
    optimizer_name: str,
    probability: float,
    windows: int,
    precond_dtype: str = "float32",
) -> dict:
    import keras
    import numpy as np

    from kron.keras import Kron

    keras.utils.set_random_seed(0)
    shape, batch = MODELS[model_name]
    # Steps per window: whole periods of the counter rule (1 fit per 34 steps at p = 0.03).
    steps = 68 if probability < 1 else 20
    rng = np.random.default_rng(0)
    x = rng.standard_normal((steps * batch, *shape)).astype(np.float32)
    y = rng.integers(0, 10, steps * batch).astype(np.int32)
    if optimizer_name == "adam":
        optimizer = keras.optimizers.Adam(1e-3)
    else:
        optimizer = Kron(
            learning_rate=3e-4,
            preconditioner_update_probability=probability,
            precond_dtype=precond_dtype,
        )
    model = build_model(model_name)
    model.compile(
        optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    if keras.backend.backend() == "tensorflow":
        fit = dict(x=_dataset_without_autotune(x, y, batch))
    else:
        fit = dict(x=x, y=y, batch_size=batch)
    fit.update(epochs=1, verbose=0, shuffle=False)
    start = time.perf_counter()
    model.fit(**fit)  # warm-up: compilation and the first window
    warmup = time.perf_counter() - start
    times = []
    for _ in range(windows):
        start = time.perf_counter()
        model.fit(**fit)
        times.append((time.perf_counter() - start) / steps)
    if optimizer_name == "kron" and precond_dtype != "float32":
        optimizer_name = f"kron ({precond_dtype} factors)"
    return {
        "model": model_name,
        "optimizer": optimizer_name,
        "p": probability,
        "ms_per_step": 1e3 * sorted(times)[len(times) // 2],
        "warmup_s": warmup,
    }


def _dataset_without_autotune(x, y, batch: int):
    """``(x, y)`` in batches as a ``tf.data.Dataset`` with tf.data's autotuning off.

    Keras turns NumPy arrays into an autotuned dataset, and on these 2 cores some ``fit`` calls
    of Kron's then end with a stall of about 0.5 s (the "slow mode" in benchmarks/RESULTS.md):
    once per call, so it is not a cost of the step, yet it adds about 7.5 ms to each of a
    window's 68 steps. Without autotuning no call stalls, and Adam's steps are faster too.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).with_options(options)


def run_backend(windows: int, precond_dtype: str) -> list[dict]:
    import keras

    rows = []
    for model_name in MODELS:
        rows.append(time_fit(model_name, "adam", 1.0, windows))
        for probability in PROBABILITIES:
            rows.append(time_fit(model_name, "kron", probability, windows, precond_dtype))
    for row in rows:
        row["backend"] = keras.backend.backend()
        row["device"] = device_name(keras.backend.backend())
    return rows


def device_name(backend: str) -> str:
    """The accelerator the backend computes on, or ``"cpu"``."""
    if backend == "jax":
        import jax

        return jax.devices()[0].device_kind
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    import tensorflow as tf

    return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| backend | model | optimizer | p | ms/step | × Adam | first fit (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    adam = {(r["backend"], r["model"]): r["ms_per_step"] for r in rows if r["optimizer"] == "adam"}
    for r in rows:
        ratio = r["ms_per_step"] / adam[(r["backend"], r["model"])]
        p = "–" if r["optimizer"] == "adam" else f"{r['p']:g}"
        lines.append(
            f"| {r['backend']} | {r['model']} | {r['optimizer']} | {p} | "
            f"{r['ms_per_step']:.1f} | {ratio:.2f} | {r['warmup_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, help="measure this backend only, here")
    parser.add_argument(
        "--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS), help="backends to run"
    )
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument(
        "--precond-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="Kron's factor dtype (default float32, Kron's own default)",
    )
    parser.add_argument("--json", help="write the rows of every backend to this file")
    parser.add_argument("--markdown-from", help="print the table of a JSON file and exit")
    args = parser.parse_args()
    if args.markdown_from:
        with open(args.markdown_from) as f:
            print(markdown(json.load(f)))
        return
    if args.backend:  # child process: Keras imports with KERAS_BACKEND already set
        print(json.dumps(run_backend(args.windows, args.precond_dtype)))
        return
    rows = []
    for backend in args.backends:
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        command = [
            sys.executable,
            __file__,
            *("--backend", backend, "--windows", str(args.windows)),
            *("--precond-dtype", args.precond_dtype),
        ]
        out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
        rows += json.loads(out.strip().splitlines()[-1])
        print(markdown(rows), file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(markdown(rows))


if __name__ == "__main__":
    main()
