"""Tasks on scikit-learn's bundled digits (1797 images of 8×8, no download): rotated and scaled
logistic regression, tanh autoencoder and the harder CNN (benchmarks.md §3.4, §3.6, §3.7)."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from .base import Task, generator, random_orthogonal


@lru_cache(maxsize=1)
def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as ``(1797, 64)`` float64 in [0, 1] and ``(1797,)`` int64 labels, in a fixed
    shuffled order (seed 0): the first 1500 are the training set, the last 297 the test set."""
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    x = torch.as_tensor(data.data, dtype=torch.float64) / 16.0
    y = torch.as_tensor(data.target, dtype=torch.int64)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    return x[order], y[order]


TRAIN = 1500
_F_STAR: dict[tuple[int, float], float] = {}  # f* per (seed, l2): a Newton solve each


class RotatedLogistic:
    """Softmax regression (W 64×10, b 10, ½·1e-4·‖W‖²) on digits features mixed by a random
    rotation R and scaled per feature by 10^U(−3, 3): x ↦ (x R)·s. Full batch of 1500, float64.

    The input covariance is a left Kronecker factor of the Hessian, so a dense 64×64 factor can
    undo both the rotation and the six decades of scaling; a diagonal method sees only the
    scaling. Metric: f − f*, with f* from a damped Newton solve at build time.
    """

    l2 = 1e-4

    def __init__(self, seed: int) -> None:
        x, y = load_digits()
        gen = generator(seed)
        rot = random_orthogonal(64, gen)
        scale = 10.0 ** (6.0 * torch.rand(64, generator=gen, dtype=torch.float64) - 3.0)
        self.x = (x[:TRAIN] @ rot) * scale
        self.y = y[:TRAIN]
        self.w = torch.zeros(64, 10, dtype=torch.float64, requires_grad=True)
        self.b = torch.zeros(10, dtype=torch.float64, requires_grad=True)
        self.parameters = [self.w, self.b]
        key = (seed, self.l2)
        if key not in _F_STAR:
            _F_STAR[key] = newton_minimizer(self.x, self.y, self.l2)[0]
        self.f_star = _F_STAR[key]

    def _f(self, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.x @ w + b, self.y) + 0.5 * self.l2 * w.pow(2).sum()

    def loss(self, step: int) -> torch.Tensor:
        return self._f(self.w, self.b)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        return {"excess_loss": self._f(self.w, self.b).item() - self.f_star}


def softmax_hessian(x: torch.Tensor, wt: torch.Tensor, l2: float) -> torch.Tensor:
    """Hessian of the regularised softmax loss at ``W̃ = [W; b]`` (``(d + 1) × 10``) for inputs
    ``x`` (``n × d``): ``mean_n (x̃ₙx̃ₙᵀ) ⊗ (diag pₙ − pₙpₙᵀ)`` plus ``l2`` on the W block, with
    ``x̃ = [x, 1]``; ``(10(d + 1), 10(d + 1))``, row-major in W̃. Assembled in closed form, which
    is far cheaper than 650 autograd passes."""
    xt = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    n, d = xt.shape
    p = torch.softmax(xt @ wt, dim=1)
    curv = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    outer = (xt[:, :, None] * xt[:, None, :]).reshape(n, d * d)
    hess = (outer.T @ curv.reshape(n, 100)).view(d, d, 10, 10).permute(0, 2, 1, 3)
    hess = hess.reshape(d * 10, d * 10) / n
    decay = torch.ones(d, 10, dtype=x.dtype)
    decay[-1] = 0.0  # no penalty on the bias row
    return hess + torch.diag(l2 * decay.reshape(-1))


def newton_minimizer(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[float, torch.Tensor]:
    """Minimum of the regularised softmax loss and its minimiser ``W̃ = [W; b]`` (65×10), by
    Newton's method with backtracking (float64)."""
    xt = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    n, d = xt.shape
    onehot = F.one_hot(y, 10).to(x.dtype)
    decay = torch.ones(d, 1, dtype=x.dtype)
    decay[-1] = 0.0

    def f(wt: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(xt @ wt, y) + 0.5 * l2 * (decay * wt.pow(2)).sum()

    wt = torch.zeros(d, 10, dtype=x.dtype)
    for _ in range(100):
        p = torch.softmax(xt @ wt, dim=1)
        grad = xt.T @ (p - onehot) / n + l2 * decay * wt
        # The bias direction along 1 is flat (softmax is shift invariant): tiny damping.
        hess = softmax_hessian(x, wt, l2) + 1e-12 * torch.eye(d * 10, dtype=x.dtype)
        direction = torch.linalg.solve(hess, grad.reshape(-1)).view(d, 10)
        value, t = f(wt), 1.0
        while f(wt - t * direction) > value and t > 1e-8:
            t *= 0.5
        wt = wt - t * direction
        if grad.abs().max() < 1e-13:
            break
    return f(wt).item(), wt


class DigitsAutoencoder:
    """64-256-128-64-8-64-128-256-64 tanh autoencoder (linear output), batches of 128 from the
    1500 training images; metric: training sum-of-squares reconstruction error per image
    (``train_sse``), also ``test_sse`` on the 297 held-out images. PCA-8 gets 1.52 / 1.58."""

    widths = (64, 256, 128, 64, 8, 64, 128, 256, 64)

    def __init__(self, seed: int) -> None:
        x, _ = load_digits()
        self.train, self.test = x[:TRAIN].float(), x[TRAIN:].float()
        torch.manual_seed(seed)
        layers: list[torch.nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(self.widths[:-1], self.widths[1:])):
            layers.append(torch.nn.Linear(fan_in, fan_out))
            if i < len(self.widths) - 2:
                layers.append(torch.nn.Tanh())
        self.net = torch.nn.Sequential(*layers)
        self.parameters = list(self.net.parameters())
        self.batch_gen = generator(seed, stream=1)

    def _sse(self, x: torch.Tensor) -> torch.Tensor:
        return (self.net(x) - x).pow(2).sum(dim=1).mean()

    def loss(self, step: int) -> torch.Tensor:
        idx = torch.randint(0, TRAIN, (128,), generator=self.batch_gen)
        return self._sse(self.train[idx])

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        return {"train_sse": self._sse(self.train).item(), "test_sse": self._sse(self.test).item()}


class DigitsCNN:
    """The harder digits CNN: images upsampled to 16×16 and shifted by up to ±2 pixels per batch
    (random, per image); six plain 3×3 conv layers (16-32-32-64-64-64 channels, stride 2 at the
    third and fifth, ReLU, no pooling or normalisation), global average pool, linear 10.
    Batches of 128. Metric: cross-entropy on the 1500 unshifted training images (``train_ce``);
    also test accuracy on the 297 held-out images."""

    channels = (1, 16, 32, 32, 64, 64, 64)
    strides = (1, 1, 2, 1, 2, 1)

    def __init__(self, seed: int) -> None:
        x, y = load_digits()
        images = F.interpolate(x.float().view(-1, 1, 8, 8), size=16, mode="bilinear")
        self.train_x, self.train_y = images[:TRAIN], y[:TRAIN]
        self.test_x, self.test_y = images[TRAIN:], y[TRAIN:]
        torch.manual_seed(seed)
        layers: list[torch.nn.Module] = []
        for c_in, c_out, stride in zip(self.channels[:-1], self.channels[1:], self.strides):
            layers += [torch.nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), torch.nn.ReLU()]
        layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10)]
        self.net = torch.nn.Sequential(*layers)
        self.parameters = list(self.net.parameters())
        self.batch_gen = generator(seed, stream=1)

    def _shifted(self, images: torch.Tensor) -> torch.Tensor:
        """Each image rolled by its own (dy, dx) ∈ [−2, 2]², zero-filled (pad, then crop)."""
        n = images.shape[0]
        shifts = torch.randint(0, 5, (n, 2), generator=self.batch_gen)
        padded = F.pad(images, (2, 2, 2, 2))
        rows = (shifts[:, 0, None] + torch.arange(16))[:, :, None]
        cols = (shifts[:, 1, None] + torch.arange(16))[:, None, :]
        return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)

    def loss(self, step: int) -> torch.Tensor:
        idx = torch.randint(0, TRAIN, (128,), generator=self.batch_gen)
        return F.cross_entropy(self.net(self._shifted(self.train_x[idx])), self.train_y[idx])

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        train_ce = F.cross_entropy(self.net(self.train_x), self.train_y).item()
        test_acc = (self.net(self.test_x).argmax(1) == self.test_y).float().mean().item()
        return {"train_ce": train_ce, "test_acc": test_acc}


TASKS = [
    Task(
        name="logistic",
        title="Logistic regression on digits, features rotated and scaled over 6 decades",
        criterion="f − f* ≤ 1e-6 within 2000 full-batch steps",
        build=RotatedLogistic,
        steps=2000,
        metric="excess_loss",
        target=1e-6,
        eval_every=20,
        adam_lrs=(3e-3, 1e-2, 3e-2),
        sgd_lrs=(1e-8, 1e-7, 1e-6),
        note="Adam (§3.6): 5.0e-3 at 2k steps (lr 3e-2), best 2.9e-3 at 5k (lr 1e-2).",
        float64=True,
    ),
    Task(
        name="autoencoder",
        title="Digits tanh autoencoder 64-256-128-64-8-…-64",
        criterion="train SSE/image ≤ 0.25 within 3000 steps",
        build=DigitsAutoencoder,
        steps=3000,
        metric="train_sse",
        target=0.25,
        eval_every=50,
        adam_lrs=(3e-4, 1e-3, 3e-3),
        sgd_lrs=(1e-3, 3e-3, 1e-2),
        note="Adam (§3.4): train SSE 0.45–0.47 at 3k steps; PCA-8 gets 1.52.",
    ),
    Task(
        name="cnn",
        title="Digits CNN, 16×16 with random ±2 px shifts, 6 plain conv layers",
        criterion="train CE ≤ 0.01 within 1000 steps",
        build=DigitsCNN,
        steps=1000,
        metric="train_ce",
        target=0.01,
        eval_every=25,
        adam_lrs=(3e-4, 1e-3, 3e-3),
        sgd_lrs=(1e-2, 3e-2, 1e-1),
    ),
]
