"""Models, data and measurements shared by the distributed tests (imported by the workers too)."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from kron.torch import Kron

GLOBAL_BATCH = 16


def mlp(dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """Weights of four shapes (a 24×24 pair stacks into one bucket), so owners differ by cost."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 24),
        nn.Tanh(),
        nn.Linear(24, 24),
        nn.Tanh(),
        nn.Linear(24, 24),
        nn.Tanh(),
        nn.Linear(24, 3),
    ).to(dtype)


def global_batch(step: int, dtype: torch.dtype = torch.float64):
    """The batch of ``step``: the same on every rank; each rank trains on its slice."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=dtype)
    return x, torch.sin(x[:, :3] * 2.0)


def local_batch(step: int, rank: int, world: int, dtype: torch.dtype = torch.float64):
    x, y = global_batch(step, dtype)
    size = GLOBAL_BATCH // world
    return x[rank * size : (rank + 1) * size], y[rank * size : (rank + 1) * size]


def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).pow(2).mean()


def fp64_options(**extra) -> dict:
    """Kron options of the fp64 tests: fp64 preconditioner; fits on every other step, so that
    steps without a fit and the cached path run too."""
    return dict(
        lr=0.02,
        precond_dtype=torch.float64,
        preconditioner_update_probability=0.5,
        **extra,
    )


def reference(steps: int, options: dict, first: int = 0, model=None, opt=None):
    """Single-process Kron on the global batches: ``(model, optimizer)`` after ``steps`` steps."""
    model = model or mlp()
    opt = opt or Kron(model.parameters(), **options)
    for step in range(first, first + steps):
        opt.zero_grad()
        loss(model, *global_batch(step)).backward()
        opt.step()
    return model, opt


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def digest(tensors) -> str:
    """SHA-256 of the tensors' bytes, shapes and dtypes: equal digests mean bit-identical."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(float((x - y).abs().max()) for x, y in zip(a, b))
