"""Running a task with a Keras 3 optimizer (``kron.keras.Kron`` or ``keras.optimizers.AdamW``).

Keras runs on its JAX backend here, so the tasks are the JAX ports (:mod:`jax_problems`) and the
train step is the one Keras's own JAX trainer compiles: ``jax.value_and_grad`` of the loss, then
``optimizer.stateless_apply`` on the optimizer's variables, under ``jax.jit``. Compilation happens
before the first timed step. ``KERAS_BACKEND`` is set to ``jax`` when Keras has not been imported
yet; a process that already imported Keras on another backend gets a ``RuntimeError`` (Keras
cannot switch backends in a running process).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
import torch

from .jax_problems import check_portable, port
from .runner import RunConfig


def keras_on_jax():
    """``keras``, imported on its JAX backend whatever ``KERAS_BACKEND`` the shell set; an error
    if this process already imported Keras on another backend."""
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "jax"
    import keras

    if keras.backend.backend() != "jax":
        raise RuntimeError(
            f"the Keras runner needs the jax backend; this process runs Keras on "
            f"{keras.backend.backend()!r} (start a new process with KERAS_BACKEND=jax)"
        )
    return keras


class KerasSession:
    """A Keras run in progress (same interface as ``runner.TorchSession``)."""

    packages = ("keras", "jax")

    def __init__(self, config: RunConfig) -> None:
        check_portable(config.task, "Keras")
        jax.config.update("jax_enable_x64", True)
        keras = keras_on_jax()
        torch.manual_seed(config.seed)
        self.problem = port(config.task.name, config.task.build(config.seed))
        leaves, self._treedef = jax.tree.flatten(self.problem.params)
        variables = [keras.Variable(leaf, dtype=str(leaf.dtype)) for leaf in leaves]
        optimizer = config.optimizer.make(variables, config.lr, config.seed)
        optimizer.build(variables)
        self.trainable = [v.value for v in variables]
        self.optimizer_state = [v.value for v in optimizer.variables]

        def train_step(trainable: list, optimizer_state: list, batch: Any):
            def loss_of(values: list) -> jax.Array:
                return self.problem.loss(jax.tree.unflatten(self._treedef, values), batch)

            loss, grads = jax.value_and_grad(loss_of)(trainable)
            trainable, optimizer_state = optimizer.stateless_apply(
                optimizer_state, grads, trainable
            )
            return trainable, optimizer_state, loss

        first_batch = self.problem.batch(1)
        compiled = jax.jit(train_step).lower(self.trainable, self.optimizer_state, first_batch)
        self._step = compiled.compile()
        self._pending = first_batch

    def train_step(self, step: int) -> float:
        batch = self._pending if step == 1 else self.problem.batch(step)
        self.trainable, self.optimizer_state, loss = self._step(
            self.trainable, self.optimizer_state, batch
        )
        return float(loss)

    def evaluate(self) -> dict[str, float]:
        return self.problem.evaluate(jax.tree.unflatten(self._treedef, self.trainable))
