"""A two-minute demonstration: KronPsgd against Adam on a rotated, ill-conditioned quadratic.

The problem (``shared/research/benchmarks.md`` §3.1) is ``f(W) = ½ tr((W − W*)ᵀ A (W − W*) B)``
for a 32×32 ``W``, where ``A`` and ``B`` are random rotations of diagonals log-spaced over three
decades. The Hessian ``B ⊗ A`` has condition number 1e6 and is not diagonal, so Adam's diagonal
scaling cannot undo it, while a Kronecker-factored preconditioner can represent its inverse
exactly. Both optimizers get the same learning-rate sweep; the best final loss of each is reported.

Run with ``python -m kron.demo``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kron.numpy import KronPsgd

LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


@dataclass(frozen=True)
class RotatedQuadratic:
    """``f(W) = ½ tr((W − W*)ᵀ A (W − W*) B)`` with ``cond(A) = cond(B) = cond``."""

    a: np.ndarray
    b: np.ndarray
    target: np.ndarray

    @classmethod
    def make(cls, n: int = 32, cond: float = 1e3, seed: int = 0) -> RotatedQuadratic:
        rng = np.random.default_rng(seed)

        def rotated(c: float) -> np.ndarray:
            rotation, _ = np.linalg.qr(rng.standard_normal((n, n)))
            return rotation @ np.diag(np.logspace(0, np.log10(c), n)) @ rotation.T

        return cls(rotated(cond), rotated(cond), rng.standard_normal((n, n)))

    def loss_and_grad(self, w: np.ndarray) -> tuple[float, np.ndarray]:
        d = w - self.target
        ad_b = self.a @ d @ self.b
        return 0.5 * float(np.sum(d * ad_b)), ad_b


class Adam:
    """Plain NumPy Adam (Kingma & Ba), the baseline: ``step(param, grad)`` updates in place."""

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.t, self.m, self.v = 0, 0.0, 0.0

    def step(self, param: np.ndarray, grad: np.ndarray) -> None:
        b1, b2 = self.betas
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad * grad
        m_hat, v_hat = self.m / (1 - b1**self.t), self.v / (1 - b2**self.t)
        param -= self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def relative_loss(
    problem: RotatedQuadratic, step: Callable[[np.ndarray, np.ndarray], None], steps: int
) -> float:
    """``f(W_steps) / f(W_0)`` from ``W_0 = 0``, or ``inf`` if the run diverged."""
    w = np.zeros_like(problem.target)
    start, _ = problem.loss_and_grad(w)
    for _ in range(steps):
        _, grad = problem.loss_and_grad(w)
        step(w, grad)
    final, _ = problem.loss_and_grad(w)
    return final / start if np.isfinite(final) else float("inf")


def kron_stepper(lr: float) -> Callable[[np.ndarray, np.ndarray], None]:
    opt = KronPsgd(lr=lr)

    def step(w: np.ndarray, grad: np.ndarray) -> None:
        opt.step("W", w, grad)
        opt.end_iteration()

    return step


def sweep(problem: RotatedQuadratic, steps: int) -> dict[str, dict[float, float]]:
    """Final relative loss per optimizer and learning rate."""
    return {
        "Adam": {lr: relative_loss(problem, Adam(lr).step, steps) for lr in LEARNING_RATES},
        "KronPsgd": {lr: relative_loss(problem, kron_stepper(lr), steps) for lr in LEARNING_RATES},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args(argv)
    problem = RotatedQuadratic.make(n=args.size)
    started = time.perf_counter()
    results = sweep(problem, args.steps)
    print(
        f"Rotated quadratic {args.size}x{args.size}, cond(H) = 1e6, {args.steps} steps; "
        "final f/f0 per learning rate:\n"
    )
    print("| lr | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for lr in LEARNING_RATES:
        print(f"| {lr:g} | " + " | ".join(f"{results[o][lr]:.2e}" for o in results) + " |")
    best = {name: min(by_lr.values()) for name, by_lr in results.items()}
    print("\nbest: " + ", ".join(f"{name} {value:.2e}" for name, value in best.items()))
    print(
        f"KronPsgd ends {best['Adam'] / best['KronPsgd']:.0f}x below Adam "
        f"({time.perf_counter() - started:.0f} s)."
    )


if __name__ == "__main__":
    main()
