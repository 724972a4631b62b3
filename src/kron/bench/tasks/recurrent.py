"""Long-memory problems with a tanh RNN: the delayed XOR and the add problem (benchmarks.md
§3.5). Batches are drawn fresh every step from a seeded generator; the metric is the training
loss itself, averaged over each logging interval (``loss``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Task, generator


class TanhRNN(torch.nn.Module):
    """``torch.nn.RNN`` (tanh, one layer, orthogonal recurrent init) plus a linear readout of the
    last hidden state. Input ``(batch, time, features)`` → output ``(batch,)``."""

    def __init__(self, features: int, hidden: int) -> None:
        super().__init__()
        self.rnn = torch.nn.RNN(features, hidden, nonlinearity="tanh", batch_first=True)
        torch.nn.init.orthogonal_(self.rnn.weight_hh_l0)
        self.readout = torch.nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.readout(out[:, -1]).squeeze(-1)


class DelayedXor:
    """Sequences of L symbols ±1 with two marked positions, i₁ ∈ [0, 0.1L) and i₂ ∈ [0.1L, 0.5L);
    the label is the XOR of the two marked symbols (−1 equal, +1 different). Input per time step:
    (symbol, marker). 30 hidden units, batch 128, logistic loss softplus(−y·f)."""

    def __init__(self, seed: int, length: int, hidden: int = 30, batch: int = 128) -> None:
        self.length, self.batch = length, batch
        torch.manual_seed(seed)
        self.net = TanhRNN(2, hidden)
        self.parameters = list(self.net.parameters())
        self.batch_gen = generator(seed, stream=1)
        self.last_loss = float("nan")

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch: inputs ``(batch, L, 2)`` and labels ``(batch,)`` in {−1, +1}."""
        b, n, gen = self.batch, self.length, self.batch_gen
        symbols = torch.randint(0, 2, (b, n), generator=gen).float() * 2 - 1
        first_end = max(1, n // 10)
        i1 = torch.randint(0, first_end, (b,), generator=gen)
        i2 = torch.randint(first_end, n // 2, (b,), generator=gen)
        markers = torch.zeros(b, n)
        rows = torch.arange(b)
        markers[rows, i1] = 1.0
        markers[rows, i2] = 1.0
        labels = torch.where(symbols[rows, i1] == symbols[rows, i2], -1.0, 1.0)
        return torch.stack([symbols, markers], dim=-1), labels

    def loss(self, step: int) -> torch.Tensor:
        x, y = self.sample()
        return F.softplus(-y * self.net(x)).mean()

    def evaluate(self) -> dict[str, float]:
        return {}


class AddProblem:
    """Sequences of T values v ~ U(−1, 1) with two distinct markers in the first half; target
    ½(v₁ + v₂). Input per time step: (value, marker). 20 hidden units, batch 64, MSE; predicting
    0 scores 1/6."""

    def __init__(self, seed: int, length: int, hidden: int = 20, batch: int = 64) -> None:
        self.length, self.batch = length, batch
        torch.manual_seed(seed)
        self.net = TanhRNN(2, hidden)
        self.parameters = list(self.net.parameters())
        self.batch_gen = generator(seed, stream=1)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch: inputs ``(batch, T, 2)`` and targets ``(batch,)``."""
        b, n, gen = self.batch, self.length, self.batch_gen
        values = torch.rand(b, n, generator=gen) * 2 - 1
        # Two distinct positions in the first half: the second is offset from the first by
        # 1…half−1 (mod half), which never lands on the first.
        half = n // 2
        i1 = torch.randint(0, half, (b,), generator=gen)
        i2 = (i1 + torch.randint(1, half, (b,), generator=gen)) % half
        markers = torch.zeros(b, n)
        rows = torch.arange(b)
        markers[rows, i1] = 1.0
        markers[rows, i2] = 1.0
        target = 0.5 * (values[rows, i1] + values[rows, i2])
        return torch.stack([values, markers], dim=-1), target

    def loss(self, step: int) -> torch.Tensor:
        x, y = self.sample()
        return (self.net(x) - y).pow(2).mean()

    def evaluate(self) -> dict[str, float]:
        return {}


def _recurrent(
    name: str, title: str, criterion: str, build, target: float, steps: int, adam_note: str
) -> Task:
    """A long-memory RNN task: stops at ``target`` training loss, Adam and SGD swept alike."""
    return Task(
        name=name,
        title=title,
        criterion=criterion,
        build=build,
        steps=steps,
        metric="loss",
        target=target,
        eval_every=20,
        stop_at_target=True,
        adam_lrs=(3e-4, 1e-3, 3e-3),
        sgd_lrs=(1e-2, 3e-2, 1e-1),
        note=adam_note,
        tags=("long_memory",),
    )


def _xor(length: int, steps: int, adam_note: str) -> Task:
    return _recurrent(
        f"xor{length}",
        f"Delayed XOR, tanh RNN 30 hidden, L = {length}",
        f"training loss (mean over a logging interval) < 0.1 within {steps} steps",
        lambda seed: DelayedXor(seed, length),
        0.1,
        steps,
        adam_note,
    )


def _add(length: int, steps: int, adam_note: str) -> Task:
    return _recurrent(
        f"add{length}",
        f"Add problem, tanh RNN 20 hidden, T = {length}",
        f"training MSE (mean over a logging interval) < 0.01 within {steps} steps",
        lambda seed: AddProblem(seed, length),
        0.01,
        steps,
        adam_note,
    )


TASKS = [
    _xor(16, 3000, "Adam (§3.5): solved in 354–1015 steps."),
    _xor(32, 10_000, "Adam (§3.5): 1 of 6 (lr 1e-3/3e-3, seeds 0–2) within 6k steps."),
    _xor(64, 10_000, "Adam (§3.5): 0 of 2 within 10k steps."),
    _add(50, 5000, "Adam (§3.5): MSE < 0.01 at step 1745 (lr 1e-3); lr 3e-3 fails."),
    _add(100, 5000, "Adam (§3.5): fails at lr 1e-3 and 3e-3 (MSE at chance)."),
]
