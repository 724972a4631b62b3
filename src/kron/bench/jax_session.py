"""Running a task with an optax optimizer (``kron.optax`` or ``optax.adamw``).

The session builds the torch problem of the seed (the data source), ports it to JAX
(:mod:`jax_problems`), and compiles one train step, ``(params, state, batch) -> (params, state,
loss)``, before the first timed step, so training seconds exclude compilation (the record's
``wall_seconds`` include it). Float64 is enabled for the process because two tasks are defined in
float64; float32 tasks keep float32 arrays.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
import torch

from .jax_problems import check_portable, port
from .runner import RunConfig


class JaxSession:
    """A JAX run in progress (same interface as ``runner.TorchSession``)."""

    packages = ("jax", "optax")

    def __init__(self, config: RunConfig) -> None:
        check_portable(config.task, "JAX")
        jax.config.update("jax_enable_x64", True)
        torch.manual_seed(config.seed)
        self.problem = port(config.task.name, config.task.build(config.seed))
        transform: optax.GradientTransformation = config.optimizer.make(
            self.problem.params, config.lr, config.seed
        )
        self.params = jax.tree.map(jax.numpy.asarray, self.problem.params)
        self.state = transform.init(self.params)

        def train_step(params: Any, state: Any, batch: Any) -> tuple[Any, Any, jax.Array]:
            loss, grads = jax.value_and_grad(self.problem.loss)(params, batch)
            updates, state = transform.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        first_batch = self.problem.batch(1)
        self._step = jax.jit(train_step).lower(self.params, self.state, first_batch).compile()
        self._pending = first_batch

    def train_step(self, step: int) -> float:
        batch = self._pending if step == 1 else self.problem.batch(step)
        self.params, self.state, loss = self._step(self.params, self.state, batch)
        return float(loss)

    def evaluate(self) -> dict[str, float]:
        return self.problem.evaluate(self.params)
