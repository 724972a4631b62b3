"""JAX versions of the tasks that have a JAX runner, built from the torch problem of the same seed.

A port takes the data (matrices, inputs, initial weights) from the torch problem, so both
frameworks train on identical problems, and draws each step's batch from that problem's own
generators (``sample_noise``, ``sample_indices``), so both see identical batches. Only the loss
and the metric are rewritten, as pure functions of a parameter pytree.

Ported: the five full-batch or cheap problems (``kron_quadratic``, ``kron_quadratic_noisy``,
``rosenbrock``, ``deep_linear``, ``logistic``). The recurrent, convolutional and language-model
tasks are torch modules whose JAX twins would be a second model zoo to keep equal; they run on
the torch runner only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .tasks.digits import RotatedLogistic
from .tasks.synthetic import DeepLinear, KronQuadratic, RotatedRosenbrock


@dataclass(frozen=True)
class JaxProblem:
    """One task instance as pure functions.

    Attributes:
        params: the initial parameter pytree (numpy arrays, the torch problem's dtypes); its
            leaves are in the order of the torch problem's ``parameters``.
        loss: ``(params, batch) -> scalar``, differentiable in ``params``.
        batch: ``step -> batch`` (host arrays or ``None``), drawn from the torch problem's
            generators; called once per step, in order.
        evaluate: ``params -> {metric: float}`` on fixed data.
    """

    params: Any
    loss: Callable[[Any, Any], jax.Array]
    batch: Callable[[int], Any]
    evaluate: Callable[[Any], dict[str, float]]


def _numpy(tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().copy()


def _quadratic(problem: KronQuadratic) -> JaxProblem:
    a, b, w_star = _numpy(problem.a), _numpy(problem.b), _numpy(problem.w_star)
    f0 = problem.f0

    def relative(w):
        d = w - w_star
        return 0.5 * jnp.sum(d * (a @ d @ b)) / f0

    def loss(params, noise):
        f = relative(params["w"])
        return f if noise is None else f + jnp.sum(noise * params["w"])

    def batch(step):
        noise = problem.sample_noise()
        return None if noise is None else _numpy(noise)

    return JaxProblem(
        {"w": _numpy(problem.w)},
        loss,
        batch,
        lambda params: {"rel_loss": float(relative(params["w"]))},
    )


def _rosenbrock(problem: RotatedRosenbrock) -> JaxProblem:
    rot = _numpy(problem.rot)

    def f(params, _batch=None):
        z = rot @ params["x"]
        odd, even = z[0::2], z[1::2]
        return jnp.sum(100.0 * (even - odd**2) ** 2 + (1.0 - odd) ** 2)

    return JaxProblem(
        {"x": _numpy(problem.x)}, f, lambda step: None, lambda params: {"f": float(f(params))}
    )


def _deep_linear(problem: DeepLinear) -> JaxProblem:
    x, y, power = jnp.asarray(problem.x.numpy()), jnp.asarray(problem.y.numpy()), problem.y_power

    def forward(layers, inputs):
        for weight in layers:  # torch.nn.Linear: inputs @ weightᵀ
            inputs = inputs @ weight.T
        return inputs

    def loss(params, idx):
        return jnp.mean((forward(params["layers"], x[idx]) - y[idx]) ** 2) / power

    def evaluate(params):
        return {"rel_mse": float(jnp.mean((forward(params["layers"], x) - y) ** 2) / power)}

    layers = [_numpy(layer.weight) for layer in problem.layers]
    return JaxProblem(
        {"layers": layers}, loss, lambda step: _numpy(problem.sample_indices()), evaluate
    )


class SoftmaxParams(NamedTuple):
    """Weights ``(64, 10)`` and bias ``(10,)``, in the torch problem's parameter order."""

    w: Any
    b: Any


def _logistic(problem: RotatedLogistic) -> JaxProblem:
    x, y, l2, f_star = _numpy(problem.x), _numpy(problem.y), problem.l2, problem.f_star

    def f(params, _batch=None):
        logits = x @ params.w + params.b
        log_p = jax.nn.log_softmax(logits, axis=1)
        nll = -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=1))
        return nll + 0.5 * l2 * jnp.sum(params.w**2)

    return JaxProblem(
        SoftmaxParams(_numpy(problem.w), _numpy(problem.b)),
        f,
        lambda step: None,
        lambda params: {"excess_loss": float(f(params)) - f_star},
    )


PORTS: dict[str, Callable[[Any], JaxProblem]] = {
    "kron_quadratic": _quadratic,
    "kron_quadratic_noisy": _quadratic,
    "rosenbrock": _rosenbrock,
    "deep_linear": _deep_linear,
    "logistic": _logistic,
}


def check_portable(task: Any, runner: str) -> None:
    """Raise unless ``task`` trains at a constant lr without clipping (all the ported tasks do;
    the JAX and Keras runners implement nothing else)."""
    if task.schedule != "constant" or task.grad_clip is not None:
        raise ValueError(
            f"task {task.name!r} uses schedule {task.schedule!r} and grad_clip "
            f"{task.grad_clip}; the {runner} runner supports only a constant learning rate "
            "without clipping (the ported tasks)"
        )


def port(task_name: str, problem: Any) -> JaxProblem:
    """The JAX version of ``problem`` (an instance of task ``task_name``)."""
    try:
        return PORTS[task_name](problem)
    except KeyError:
        raise ValueError(
            f"task {task_name!r} has no JAX runner; tasks with one: {', '.join(PORTS)}"
        ) from None
