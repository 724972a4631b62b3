"""A training step that calls ``optimizer.step()``, run compiled or eager: the shared body of
the CPU and GPU checks that compiling it neither changes the result nor recompiles every step."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kron.torch import Kron


def run_training_step(
    model: nn.Module, batch: Callable[[int], tuple], compile_fn: Callable, steps: int
) -> tuple[list[torch.Tensor], list[int]]:
    """The parameters after ``steps`` steps of ``Kron`` (lr 1e-2, update probability 0.5) with
    the training step passed through ``compile_fn`` (the identity for eager), and dynamo's count
    of distinct graphs after each step (counted from a reset)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    opt = Kron(model.parameters(), lr=1e-2, preconditioner_update_probability=0.5)

    def train_step(x, y):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    step_fn = compile_fn(train_step)
    graphs = []
    for step in range(steps):
        step_fn(*batch(step))
        graphs.append(counters["stats"]["unique_graphs"])
    return [p.detach() for p in model.parameters()], graphs
