"""Rotated logistic regression: how well can one Kronecker product precondition it?

Kron ends the suite's rotated and scaled logistic regression near an excess loss of 3e-3 whatever
its settings (``benchmarks/logistic_settings.py``). This script measures the Hessian of W at the
minimum (``kron.bench.tasks.digits``: W 64×10, full batch, float64) and prints its condition
number three ways: as it is, after Jacobi (diagonal) scaling, the best a diagonal method such as
Adam can aim for, and after the inverse of its nearest Kronecker product ``A ⊗ B`` (Van Loan and
Pitsianis: the leading singular pair of the rearranged Hessian), what a Kron preconditioner on W
can aim for.

The condition numbers are taken on the space the loss can change in: W moves only through its
class contrasts (adding one vector to every class column leaves the softmax unchanged, and only
the tiny L2 term sees it), so the Hessian is restricted to ``I ⊗ U`` with U an orthonormal basis
of the 9 contrasts. The Jacobi scaling is applied to the whole W and then restricted.

    python benchmarks/logistic_conditioning.py --seeds 3     # about 20 s
"""

from __future__ import annotations

import argparse

import torch

from kron.bench.tasks.digits import RotatedLogistic, newton_minimizer, softmax_hessian

CLASSES, FEATURES = 10, 64


def condition(h: torch.Tensor) -> float:
    eigenvalues = torch.linalg.eigvalsh(h)
    return (eigenvalues[-1] / eigenvalues[0]).item()


def preconditioned(h: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``P^½ H P^½`` for symmetric positive definite P."""
    values, vectors = torch.linalg.eigh(p)
    root = vectors @ torch.diag(values.sqrt()) @ vectors.T
    return root @ h @ root


def nearest_kronecker(h: torch.Tensor, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``A`` (m×m) and ``B`` (n×n) minimising ``‖H − A ⊗ B‖_F``, and the relative residual."""
    rearranged = h.reshape(m, n, m, n).permute(0, 2, 1, 3).reshape(m * m, n * n)
    u, s, vt = torch.linalg.svd(rearranged, full_matrices=False)
    a = (u[:, 0] * s[0].sqrt()).reshape(m, m)
    b = (vt[0] * s[0].sqrt()).reshape(n, n)
    if a.trace() < 0:
        a, b = -a, -b
    residual = (s[1:].pow(2).sum() / s.pow(2).sum()).sqrt().item()
    return (a + a.T) / 2, (b + b.T) / 2, residual


def measure(seed: int) -> dict[str, float]:
    problem = RotatedLogistic(seed)
    _, minimizer = newton_minimizer(problem.x, problem.y, problem.l2)
    h_w = softmax_hessian(problem.x, minimizer, problem.l2)[
        : FEATURES * CLASSES, : FEATURES * CLASSES
    ]
    centring = torch.eye(CLASSES, dtype=h_w.dtype) - 1.0 / CLASSES
    contrasts = torch.linalg.qr(centring)[0][:, : CLASSES - 1].contiguous()
    basis = torch.kron(torch.eye(FEATURES, dtype=h_w.dtype), contrasts)
    restricted = basis.T @ h_w @ basis
    jacobi = torch.diag(torch.diag(h_w).rsqrt())
    a, b, residual = nearest_kronecker(restricted, FEATURES, CLASSES - 1)
    kron_inverse = torch.kron(torch.linalg.inv(a).contiguous(), torch.linalg.inv(b).contiguous())
    eigenvalues = torch.linalg.eigvalsh(restricted)
    return {
        "smallest": eigenvalues[0].item(),
        "largest": eigenvalues[-1].item(),
        "none": condition(restricted),
        "jacobi": condition(basis.T @ jacobi @ h_w @ jacobi @ basis),
        "kronecker": condition(preconditioned(restricted, (kron_inverse + kron_inverse.T) / 2)),
        "residual": residual,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    print(
        "| seed | eigenvalues of H (W's contrasts) | κ, none | κ, Jacobi | κ, nearest A ⊗ B "
        "| its relative residual |\n|---|---|---|---|---|---|"
    )
    for seed in range(args.seeds):
        m = measure(seed)
        print(
            f"| {seed} | {m['smallest']:.1e} … {m['largest']:.1e} | {m['none']:.1e} | "
            f"{m['jacobi']:.1e} | {m['kronecker']:.1e} | {m['residual']:.2f} |"
        )


if __name__ == "__main__":
    main()
