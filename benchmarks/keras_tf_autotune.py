"""Keras on TensorFlow: does tf.data's autotuning stall ``fit``?

Fits ``benchmarks/keras_step.py``'s MLP with Kron (p = 0.03) or Adam on fresh models and prints
the time per step of every timed ``fit`` call (68 steps each, after a warm-up call), for one way
of feeding the same batches:

* ``numpy``: the arrays, which Keras turns into an autotuned tf.data pipeline;
* ``dataset``: a ``tf.data.Dataset`` of the batches, autotuning on (tf.data's default);
* ``no_autotune``: the same dataset with ``options.autotune.enabled = False``.

    python benchmarks/keras_tf_autotune.py numpy kron      # each about 1 minute
    python benchmarks/keras_tf_autotune.py no_autotune kron
"""

from __future__ import annotations

import argparse
import os
import time

os.environ["KERAS_BACKEND"] = "tensorflow"

import keras
import numpy as np
import tensorflow as tf
from keras_step import build_model

from kron.keras import Kron

BATCH, STEPS = 128, 68


def inputs(feed: str) -> dict:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((STEPS * BATCH, 256)).astype(np.float32)
    y = rng.integers(0, 10, STEPS * BATCH).astype(np.int32)
    if feed == "numpy":
        return dict(x=x, y=y, batch_size=BATCH)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    if feed == "no_autotune":
        options = tf.data.Options()
        options.autotune.enabled = False
        dataset = dataset.with_options(options)
    return dict(x=dataset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("feed", choices=("numpy", "dataset", "no_autotune"))
    parser.add_argument("optimizer", choices=("kron", "adam"))
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--calls", type=int, default=3, help="timed fit calls per model")
    args = parser.parse_args()
    data = inputs(args.feed)
    per_step = []
    for _ in range(args.models):
        keras.utils.set_random_seed(0)
        model = build_model("mlp")
        optimizer = (
            Kron(3e-4, preconditioner_update_probability=0.03)
            if args.optimizer == "kron"
            else keras.optimizers.Adam(1e-3)
        )
        model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(**data, epochs=1, verbose=0, shuffle=False)
        for _ in range(args.calls):
            start = time.perf_counter()
            model.fit(**data, epochs=1, verbose=0, shuffle=False)
            per_step.append(1e3 * (time.perf_counter() - start) / STEPS)
    print(f"{args.feed}, {args.optimizer}: ms per step of each fit call:", np.round(per_step, 1))


if __name__ == "__main__":
    main()
