"""Running a task with an optax optimizer (``kron.optax`` or ``optax.adamw``).

The session builds the torch problem of the seed (the data source), ports it to JAX
(:mod:`jax_problems`), and compiles one train step, ``(params, state, batch) -> (params, state,
loss)``, before the first timed step, so training seconds exclude compilation (the record's
``wall_seconds`` include it). The two float64 tasks run under ``jax.enable_x64(True)``, the
others under ``jax.enable_x64(False)``: a float32 task then computes as it would in a float32
program (psgdax, for one, fails to trace with x64 on), and the process's own setting is left as
it was.
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
        self._x64 = config.task.float64
        torch.manual_seed(config.seed)
        with jax.enable_x64(self._x64):
            self._build(config)

    def _build(self, config: RunConfig) -> None:
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
        with jax.enable_x64(self._x64):
            self.params, self.state, loss = self._step(self.params, self.state, batch)
        return float(loss)

    def evaluate(self) -> dict[str, float]:
        with jax.enable_x64(self._x64):
            return self.problem.evaluate(self.params)
