"""Learning-rate sweep of ``kron.numpy.KronPsgd`` and NumPy Adam, to choose KronPsgd's default lr.

Both optimizers (KronPsgd with every other argument at its default; the Adam of ``kron.demo`` with
β = (0.9, 0.999), ε = 1e-8) run every learning rate of ``--lrs`` on four problems, with ``--seeds``
seeds each. A seed fixes the problem instance (rotations, scales, initial weights, minibatches,
gradient noise) and KronPsgd's ``seed``; both optimizers see the same instance. Reported per
(problem, optimizer, lr): the median over seeds of the problem's final metric (lower is better; a
diverged run counts as ``inf``).

* ``quadratic``: the noise-free rotated quadratic of ``kron.demo`` (32×32, cond(H) = 1e6,
  ``shared/research/benchmarks.md`` §3.1), W₀ = 0, 2000 steps; metric f/f₀ at the end.
* ``noisy_quadratic``: the same problem with additive Gaussian gradient noise of standard deviation
  0.1 × (RMS of the gradient at W₀); metric: mean f/f₀ over the last 10 % of steps (steady state).
* ``logreg``: softmax regression on scikit-learn's bundled digits (first 1500 of a fixed
  permutation, pixels / 16), features mixed by a random orthogonal matrix and then scaled per
  feature by 10^U(−3, 3) (benchmarks.md §3.6); a 64×10 weight and a 10-vector bias from zero,
  loss mean cross-entropy + ½·1e-4·‖W‖², full batch, float64, 2000 steps. Metric: f − f*, with f*
  from damped Newton on the exact 650×650 Hessian.
* ``mlp``: a tanh MLP 64-32-10 on the same 1500 digits (pixels / 16), minibatches of 64, 1000
  steps, 1/√fan-in Gaussian init, float64; metric: cross-entropy on all 1500 training images at
  the end. Loss and gradients of both digit problems are written out by hand in NumPy.

The default lr is chosen by this rule (also printed): for each problem take the best KronPsgd
median; an lr is *near-best* on a problem when its median is within 2× of that best. The
recommended lr is near-best on the most problems; ties go to the lr near-best on more problems by
its worst seed (max over seeds against the best lr's worst seed), then to the smallest geometric
mean, over problems, of median / best median.

Reproduce (about 4 minutes on 2 cores)::

    .venv/bin/python benchmarks/numpy_lr.py --json benchmarks/results/numpy_lr.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kron.demo import Adam, RotatedQuadratic
from kron.numpy import KronPsgd

LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
OPTIMIZERS = ("KronPsgd", "Adam")
NEAR_BEST = 2.0  # an lr is near-best on a problem when its median is within this factor of the best

Params = dict[str, np.ndarray]
Stepper = Callable[[Params, Params], None]


# -- optimizers -------------------------------------------------------------------------------


def make_stepper(optimizer: str, lr: float, seed: int) -> Stepper:
    """``step(params, grads)`` updating every array of ``params`` in place, one iteration."""
    if optimizer == "KronPsgd":
        kron = KronPsgd(lr=lr, seed=seed)

        def kron_step(params: Params, grads: Params) -> None:
            for name, param in params.items():
                kron.step(name, param, grads[name])
            kron.end_iteration()

        return kron_step
    if optimizer == "Adam":
        adams: dict[str, Adam] = {}

        def adam_step(params: Params, grads: Params) -> None:
            for name, param in params.items():
                adams.setdefault(name, Adam(lr)).step(param, grads[name])

        return adam_step
    raise ValueError(f"unknown optimizer {optimizer!r}")


def finite_or_inf(value: float) -> float:
    return float(value) if math.isfinite(value) else math.inf


def rng_for(seed: int, label: str) -> np.random.Generator:
    """An independent generator per (seed, purpose), the same for every optimizer and lr."""
    return np.random.default_rng([seed, zlib.crc32(label.encode())])


# -- problems ---------------------------------------------------------------------------------


class Quadratic:
    """benchmarks.md §3.1, noise-free or with additive gradient noise."""

    def __init__(self, seed: int, steps: int, noise: float = 0.0, tail: float = 0.1):
        self.problem = RotatedQuadratic.make(n=32, cond=1e3, seed=seed)
        self.seed, self.steps, self.noise, self.tail = seed, steps, noise, tail

    def run(self, step: Stepper) -> float:
        w = np.zeros_like(self.problem.target)
        f0, g0 = self.problem.loss_and_grad(w)
        std = self.noise * float(np.sqrt(np.mean(g0 * g0)))
        noise_rng = rng_for(self.seed, "gradient noise")
        tail_start = self.steps - max(1, round(self.tail * self.steps))
        tail: list[float] = []
        for t in range(self.steps):
            _, grad = self.problem.loss_and_grad(w)
            if std:
                grad = grad + std * noise_rng.standard_normal(grad.shape)
            step({"W": w}, {"W": grad})
            if t >= tail_start and self.noise:
                # f after step t; the steady-state metric averages these
                tail.append(self.problem.loss_and_grad(w)[0])
        if not np.isfinite(w).all():
            return math.inf
        if self.noise:
            return finite_or_inf(float(np.mean(tail)) / f0)
        return finite_or_inf(self.problem.loss_and_grad(w)[0] / f0)


def digits(train: int = 1500) -> tuple[np.ndarray, np.ndarray]:
    """The first ``train`` images of a fixed permutation of sklearn's digits, pixels / 16."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))[:train]
    return data.data[order] / 16.0, data.target[order]


def softmax_ce(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and its gradient with respect to ``logits``."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = len(labels)
    loss = -float(log_p[np.arange(n), labels].mean())
    d_logits = np.exp(log_p)
    d_logits[np.arange(n), labels] -= 1.0
    return loss, d_logits / n


class LogReg:
    """benchmarks.md §3.6, rotated + scaled: x ↦ (x R) · 10^U(−3,3), softmax regression."""

    l2 = 1e-4

    def __init__(self, seed: int, steps: int, x: np.ndarray, y: np.ndarray):
        rng = rng_for(seed, "logreg features")
        rotation, _ = np.linalg.qr(rng.standard_normal((64, 64)))
        scale = 10.0 ** rng.uniform(-3.0, 3.0, 64)
        self.x, self.y, self.steps = (x @ rotation) * scale, y, steps
        self.onehot = np.eye(10)[y]
        self.f_star = self.newton()

    def loss_and_grad(self, w: np.ndarray, b: np.ndarray) -> tuple[float, Params]:
        ce, d_logits = softmax_ce(self.x @ w + b, self.y)
        loss = ce + 0.5 * self.l2 * float(np.sum(w * w))
        return loss, {"W": self.x.T @ d_logits + self.l2 * w, "b": d_logits.sum(axis=0)}

    def newton(self, iterations: int = 100) -> float:
        """f* by damped Newton with the exact Hessian of θ = [W; b] (65×10, row-major)."""
        xa = np.hstack([self.x, np.ones((len(self.y), 1))])
        n, d = xa.shape
        l2 = np.zeros((d, 10))
        l2[:-1] = self.l2
        theta = np.zeros((d, 10))

        def f(th: np.ndarray) -> float:
            return self.loss_and_grad(th[:-1], th[-1])[0]

        value = f(theta)
        for _ in range(iterations):
            logits = xa @ theta
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            grad = xa.T @ (p - self.onehot) / n + l2 * theta
            # H[(a,i),(b,j)] = (1/n) Σ_n x_a x_b (p_i δ_ij − p_i p_j) + l2 δ
            curv = (p[:, :, None] * np.eye(10) - p[:, :, None] * p[:, None, :]).reshape(n, 100)
            hess = ((xa[:, :, None] * curv[:, None, :]).reshape(n, -1).T @ xa) / n
            hess = hess.reshape(d, 10, 10, d).transpose(0, 1, 3, 2).reshape(d * 10, d * 10)
            hess += np.diag(l2.ravel())
            direction = -np.linalg.lstsq(hess, grad.ravel(), rcond=1e-15)[0].reshape(d, 10)
            decrease = float(np.sum(grad * direction))
            if decrease > -1e-30:
                break
            t = 1.0
            while t > 1e-12:
                candidate = f(theta + t * direction)
                if candidate <= value + 1e-4 * t * decrease:
                    break
                t *= 0.5
            if candidate >= value:
                break
            theta, value = theta + t * direction, candidate
        grads = self.loss_and_grad(theta[:-1], theta[-1])[1]
        self.f_star_grad_norm = float(np.sqrt(sum(np.sum(g * g) for g in grads.values())))
        return value

    def run(self, step: Stepper) -> float:
        params = {"W": np.zeros((64, 10)), "b": np.zeros(10)}
        for _ in range(self.steps):
            _, grads = self.loss_and_grad(params["W"], params["b"])
            step(params, grads)
        if not all(np.isfinite(p).all() for p in params.values()):
            return math.inf
        return finite_or_inf(self.loss_and_grad(params["W"], params["b"])[0] - self.f_star)


class Mlp:
    """tanh MLP 64-32-10 on digits, minibatches of 64; metric: full training-set cross-entropy."""

    def __init__(self, seed: int, steps: int, x: np.ndarray, y: np.ndarray, batch: int = 64):
        self.seed, self.steps, self.x, self.y, self.batch = seed, steps, x, y, batch

    @staticmethod
    def loss_and_grad(params: Params, x: np.ndarray, y: np.ndarray) -> tuple[float, Params]:
        h = np.tanh(x @ params["W1"] + params["b1"])
        loss, d_logits = softmax_ce(h @ params["W2"] + params["b2"], y)
        d_h = (d_logits @ params["W2"].T) * (1.0 - h * h)
        grads = {
            "W1": x.T @ d_h,
            "b1": d_h.sum(axis=0),
            "W2": h.T @ d_logits,
            "b2": d_logits.sum(axis=0),
        }
        return loss, grads

    def run(self, step: Stepper) -> float:
        init = rng_for(self.seed, "mlp init")
        params = {
            "W1": init.standard_normal((64, 32)) / math.sqrt(64),
            "b1": np.zeros(32),
            "W2": init.standard_normal((32, 10)) / math.sqrt(32),
            "b2": np.zeros(10),
        }
        batches = rng_for(self.seed, "mlp batches")
        for _ in range(self.steps):
            index = batches.choice(len(self.y), self.batch, replace=False)
            _, grads = self.loss_and_grad(params, self.x[index], self.y[index])
            step(params, grads)
        if not all(np.isfinite(p).all() for p in params.values()):
            return math.inf
        return finite_or_inf(self.loss_and_grad(params, self.x, self.y)[0])


PROBLEMS = {
    "quadratic": "rotated quadratic 32×32, noise-free: f/f₀ after {steps} steps",
    "noisy_quadratic": (
        "rotated quadratic 32×32, gradient noise 0.1·RMS(g₀): mean f/f₀ over the last 10 % of "
        "{steps} steps"
    ),
    "logreg": "rotated + scaled softmax regression on digits, full batch: f − f* after {steps} "
    "steps",
    "mlp": "tanh MLP 64-32-10 on digits, batch 64: training-set cross-entropy after {steps} steps",
}
DEFAULT_STEPS = {"quadratic": 2000, "noisy_quadratic": 2000, "logreg": 2000, "mlp": 1000}


def build(problem: str, seed: int, steps: int, data: tuple[np.ndarray, np.ndarray]):
    if problem == "quadratic":
        return Quadratic(seed, steps)
    if problem == "noisy_quadratic":
        return Quadratic(seed, steps, noise=0.1)
    if problem == "logreg":
        return LogReg(seed, steps, *data)
    if problem == "mlp":
        return Mlp(seed, steps, *data)
    raise ValueError(f"unknown problem {problem!r}")


# -- sweep, decision, report ------------------------------------------------------------------


def sweep(problems, lrs, seeds, steps_of, log=print) -> dict:
    data = digits() if {"logreg", "mlp"} & set(problems) else None
    results: dict = {}
    for problem in problems:
        started = time.perf_counter()
        instances = [build(problem, seed, steps_of[problem], data) for seed in seeds]
        entry: dict = {
            "description": PROBLEMS[problem].format(steps=steps_of[problem]),
            "steps": steps_of[problem],
            "results": {},
        }
        if problem == "logreg":
            entry["f_star"] = [inst.f_star for inst in instances]
            entry["f_star_grad_norm"] = [inst.f_star_grad_norm for inst in instances]
        for optimizer in OPTIMIZERS:
            by_lr = {}
            for lr in lrs:
                values, seconds = [], []
                for seed, instance in zip(seeds, instances):
                    t0 = time.perf_counter()
                    with np.errstate(all="ignore"):
                        values.append(instance.run(make_stepper(optimizer, lr, seed)))
                    seconds.append(time.perf_counter() - t0)
                by_lr[f"{lr:g}"] = {
                    "median": statistics.median(values),
                    "seeds": values,
                    "seconds": seconds,
                }
            entry["results"][optimizer] = by_lr
        entry["seconds"] = time.perf_counter() - started
        results[problem] = entry
        log(f"  {problem}: {entry['seconds']:.1f} s")
    return results


def ratios_to_best(results: dict, optimizer: str, statistic: str) -> dict[str, dict[str, float]]:
    """``{lr: {problem: value / best value}}`` of a per-lr statistic ("median" or "worst")."""
    out: dict[str, dict[str, float]] = {}
    for problem, entry in results.items():
        values = {
            lr: v["median"] if statistic == "median" else max(v["seeds"])
            for lr, v in entry["results"][optimizer].items()
        }
        best = min(values.values())
        for lr, value in values.items():
            ratio = value / best if best > 0 else (1.0 if value == best else math.inf)
            out.setdefault(lr, {})[problem] = ratio
    return out


def decide(results: dict, optimizer: str = "KronPsgd") -> dict:
    """The lr near-best (median within NEAR_BEST× of the best median) on the most problems.

    Ties go first to the lr near-best on more problems by its worst seed (robustness: a default
    must not be the lr that is good on two seeds and unstable on the third), then to the smaller
    geometric mean over problems of median / best median.
    """
    by_median = ratios_to_best(results, optimizer, "median")
    by_worst = ratios_to_best(results, optimizer, "worst")

    def geomean(values) -> float:
        return math.exp(statistics.fmean(math.log(v) for v in values))

    summary = {
        lr: {
            "near_best": sum(r <= NEAR_BEST for r in ratio.values()),
            "near_best_worst_seed": sum(r <= NEAR_BEST for r in by_worst[lr].values()),
            "geomean_ratio": geomean(ratio.values()),
            "worst_ratio": max(ratio.values()),
            "ratio": ratio,
            "worst_seed_ratio": by_worst[lr],
        }
        for lr, ratio in by_median.items()
    }
    chosen = min(
        summary,
        key=lambda lr: (
            -summary[lr]["near_best"],
            -summary[lr]["near_best_worst_seed"],
            summary[lr]["geomean_ratio"],
        ),
    )
    best_lr = {
        problem: min(
            entry["results"][optimizer], key=lambda lr: entry["results"][optimizer][lr]["median"]
        )
        for problem, entry in results.items()
    }
    return {
        "optimizer": optimizer,
        "criterion": (
            f"most problems with median within {NEAR_BEST:g}x of the best median; ties by most "
            f"problems with worst seed within {NEAR_BEST:g}x of the best worst seed, then by the "
            "geometric mean over problems of median / best median"
        ),
        "best_lr_per_problem": best_lr,
        "per_lr": summary,
        "recommended_lr": chosen,
    }


def markdown(results: dict, decision: dict) -> str:
    problems = list(results)
    lrs = list(results[problems[0]]["results"]["KronPsgd"])
    head = "| lr | " + " | ".join(f"{p} Kron | {p} Adam" for p in problems)
    head += " | Kron near-best (median / worst seed) | Kron geomean ratio |"
    lines = [head, "|---:|" + "---:|" * (2 * len(problems) + 2)]
    for lr in lrs:
        cells = []
        for problem in problems:
            for optimizer in OPTIMIZERS:
                value = results[problem]["results"][optimizer][lr]["median"]
                best = decision["best_lr_per_problem"][problem] == lr and optimizer == "KronPsgd"
                text = f"{value:.2e}"
                cells.append(f"**{text}**" if best else text)
        info = decision["per_lr"][lr]
        n = len(problems)
        cells.append(f"{info['near_best']}/{n} / {info['near_best_worst_seed']}/{n}")
        cells.append(f"{info['geomean_ratio']:.3g}")
        lines.append(f"| {lr} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def strict_json(value):
    """Non-finite floats become the strings "inf", "-inf", "nan" (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def environment() -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "src"], capture_output=True, text=True
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    import sklearn

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "git_commit": commit,
        "src_dirty": dirty,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", nargs="+", choices=list(PROBLEMS), default=list(PROBLEMS))
    parser.add_argument("--lrs", nargs="+", type=float, default=list(LEARNING_RATES))
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 … N−1 (default 3)")
    parser.add_argument(
        "--step-scale",
        type=float,
        default=1.0,
        help="multiply every step budget (2000, 2000, 2000, 1000) by this (default 1)",
    )
    parser.add_argument("--json", type=Path, help="write all numbers here")
    args = parser.parse_args(argv)

    steps_of = {p: max(10, round(s * args.step_scale)) for p, s in DEFAULT_STEPS.items()}
    seeds = list(range(args.seeds))
    started = time.perf_counter()
    print(f"sweeping lr {args.lrs} on {args.problems}, seeds {seeds}")
    results = sweep(args.problems, args.lrs, seeds, steps_of)
    total = time.perf_counter() - started
    decision = decide(results)

    print(f"\nMedian over {len(seeds)} seeds (lower is better; bold: KronPsgd's best):")
    for problem, entry in results.items():
        print(f"  {problem}: {entry['description']}")
    print()
    print(markdown(results, decision))
    print(f"\ncriterion: {decision['criterion']}")
    print(f"best KronPsgd lr per problem: {decision['best_lr_per_problem']}")
    print(f"recommended KronPsgd lr: {decision['recommended_lr']}")
    print(f"total {total:.0f} s")

    report = {
        "command": " ".join(
            ["python benchmarks/numpy_lr.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "learning_rates": [f"{lr:g}" for lr in args.lrs],
        "seeds": seeds,
        "optimizers": {
            "KronPsgd": "kron.numpy.KronPsgd(lr=lr, seed=seed), all else default",
            "Adam": "kron.demo.Adam(lr), betas (0.9, 0.999), eps 1e-8, one per parameter",
        },
        "environment": environment(),
        "total_seconds": total,
        "problems": results,
        "decision": decision,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(strict_json(report), indent=1, allow_nan=False) + "\n")
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
