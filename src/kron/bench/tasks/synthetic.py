"""Generated problems: Kron-structured quadratic (clean and noisy), rotated Rosenbrock, deep
linear network (benchmarks.md §3.1–3.3). All float32 except where noted."""

from __future__ import annotations

import torch

from .base import Task, generator, random_orthogonal


def _spd(n: int, cond: float, gen: torch.Generator) -> torch.Tensor:
    """``Q diag(λ) Qᵀ`` with λ log-spaced over ``cond`` and max(λ) = 1; shape ``(n, n)``."""
    q = random_orthogonal(n, gen)
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    eig = eig / eig.max()
    return (q * eig) @ q.T


class KronQuadratic:
    """f(W) = ½ tr((W − W*)ᵀ A (W − W*) B), W ∈ ℝ^{n×n}, cond(A) = cond(B) = 1e3.

    The Hessian B ⊗ A has condition number 1e6 and is not diagonal in any coordinate basis a
    diagonal method can see, but it is exactly one Kronecker product. ``noise`` adds a fresh
    Gaussian linear term ⟨N, W⟩ per step, i.e. gradient noise of std ``noise`` per entry; the
    metric is always the clean relative loss f/f(0).
    """

    def __init__(self, seed: int, n: int = 32, noise: float = 0.0) -> None:
        gen = generator(seed)
        self.a = _spd(n, 1e3, gen).float()
        self.b = _spd(n, 1e3, gen).float()
        self.w_star = torch.randn(n, n, generator=gen)
        self.noise = noise
        self.noise_gen = generator(seed, stream=1)
        self.w = torch.zeros(n, n, requires_grad=True)
        self.parameters = [self.w]
        self.f0 = self._f(torch.zeros(n, n)).item()

    def _f(self, w: torch.Tensor) -> torch.Tensor:
        d = w - self.w_star
        return 0.5 * torch.sum(d * (self.a @ d @ self.b))

    def sample_noise(self) -> torch.Tensor | None:
        """This step's gradient noise ``(n, n)``, or ``None`` on the clean problem."""
        if not self.noise:
            return None
        return torch.randn(self.w.shape, generator=self.noise_gen) * self.noise

    def loss(self, step: int) -> torch.Tensor:
        f = self._f(self.w) / self.f0
        noise = self.sample_noise()
        return f if noise is None else f + torch.sum(noise * self.w)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        return {"rel_loss": (self._f(self.w) / self.f0).item()}


class RotatedRosenbrock:
    """Chained-pairs Rosenbrock Σᵢ 100(z₂ᵢ − z₂ᵢ₋₁²)² + (1 − z₂ᵢ₋₁)² in rotated coordinates
    z = R x, x ∈ ℝ³² a plain vector parameter, x₀ = 0; minimum 0 at z = 1.

    The rotation removes the pairwise separability that lets a diagonal method solve the
    unrotated version. The parameter is 1-D, so Kron's default layout (``min_ndim_triangular=2``)
    gives it a diagonal preconditioner: this task shows what the defaults do with vectors.
    Computed in float64 so that the 1e-10 target is above rounding.
    """

    def __init__(self, seed: int, n: int = 32) -> None:
        self.rot = random_orthogonal(n, generator(seed))
        self.x = torch.zeros(n, dtype=torch.float64, requires_grad=True)
        self.parameters = [self.x]

    def _f(self, x: torch.Tensor) -> torch.Tensor:
        z = self.rot @ x
        odd, even = z[0::2], z[1::2]
        return torch.sum(100.0 * (even - odd**2) ** 2 + (1.0 - odd) ** 2)

    def loss(self, step: int) -> torch.Tensor:
        return self._f(self.x)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        return {"f": self._f(self.x).item()}


class DeepLinear:
    """Six 32×32 linear maps (no bias, PyTorch's default init) fitted to a teacher with singular
    values logspace(−2, 0); 2048 fixed Gaussian inputs, batches of 128 drawn per step. Metric:
    relative MSE on all 2048 points, MSE / E[y²]."""

    def __init__(self, seed: int, n: int = 32, depth: int = 6, samples: int = 2048) -> None:
        gen = generator(seed)
        u, v = random_orthogonal(n, gen).float(), random_orthogonal(n, gen).float()
        self.teacher = (u * torch.logspace(-2, 0, n)) @ v.T
        self.x = torch.randn(samples, n, generator=gen)
        self.y = self.x @ self.teacher.T
        torch.manual_seed(seed)
        self.layers = [torch.nn.Linear(n, n, bias=False) for _ in range(depth)]
        self.parameters = [layer.weight for layer in self.layers]
        self.batch_gen = generator(seed, stream=1)
        self.y_power = self.y.pow(2).mean().item()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def sample_indices(self) -> torch.Tensor:
        """This step's batch: 128 row indices into the fixed inputs."""
        return torch.randint(0, self.x.shape[0], (128,), generator=self.batch_gen)

    def loss(self, step: int) -> torch.Tensor:
        idx = self.sample_indices()
        return (self._forward(self.x[idx]) - self.y[idx]).pow(2).mean() / self.y_power

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        mse = (self._forward(self.x) - self.y).pow(2).mean().item()
        return {"rel_mse": mse / self.y_power}


TASKS = [
    Task(
        name="kron_quadratic",
        title="Kron-structured quadratic 32×32, cond(H) = 1e6",
        criterion="f/f0 ≤ 1e-8 within 2000 steps",
        build=KronQuadratic,
        steps=2000,
        metric="rel_loss",
        target=1e-8,
        eval_every=20,
        adam_lrs=(1e-2, 3e-2, 1e-1),
        sgd_lrs=(0.3, 1.0, 3.0),
        note="Adam (benchmarks.md §3.1): best 9.3e-5 at 2k steps (lr 0.03).",
    ),
    Task(
        name="kron_quadratic_noisy",
        title="Kron-structured quadratic with gradient noise (std 0.002)",
        criterion="mean f/f0 over the last 10% of steps ≤ 3e-3",
        build=lambda seed: KronQuadratic(seed, noise=0.002),
        steps=2000,
        metric="rel_loss",
        target=3e-3,
        rule="final",
        final_window=0.1,
        eval_every=20,
        adam_lrs=(3e-3, 1e-2, 3e-2),
        sgd_lrs=(0.3, 1.0, 3.0),
        note="AdamW measured here: floor 6.3e-3 (lr 1e-2); the target is half of that.",
    ),
    Task(
        name="rosenbrock",
        title="Rotated 32-D Rosenbrock (chained pairs), x0 = 0",
        criterion="f ≤ 1e-10 within 3000 steps",
        build=RotatedRosenbrock,
        steps=3000,
        metric="f",
        target=1e-10,
        eval_every=20,
        adam_lrs=(1e-3, 3e-3, 1e-2),
        sgd_lrs=(1e-4, 3e-4, 1e-3),
        note="Adam (§3.2): best 1.3e-4 at 3k steps (lr 3e-3), never stably below 1e-4.",
        float64=True,
    ),
    Task(
        name="deep_linear",
        title="Deep linear network, 6 × (32×32), teacher singular values 1e-2…1",
        criterion="relative MSE ≤ 1e-5 within 2000 steps",
        build=DeepLinear,
        steps=2000,
        metric="rel_mse",
        target=1e-5,
        eval_every=20,
        adam_lrs=(1e-3, 3e-3, 1e-2),
        sgd_lrs=(0.1, 0.3, 1.0),
        note="Adam (§3.3): 3.8e-4 at 2k steps (lr 3e-3).",
    ),
]
