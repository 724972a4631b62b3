"""Every task builds from a seed, trains a few steps with kron and AdamW, and reports its metric."""

from __future__ import annotations

import math

import pytest
import torch

from kron.bench.optimizers import get_optimizer
from kron.bench.runner import RunConfig, run
from kron.bench.tasks import TASKS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("name", list(TASKS))
def test_task_builds_and_trains(name):
    task = TASKS[name]
    problem = task.build(0)
    assert problem.parameters and all(p.requires_grad for p in problem.parameters)
    assert {p.dtype for p in problem.parameters} == {
        torch.float64 if task.float64 else torch.float32
    }
    before = [p.detach().clone() for p in problem.parameters]
    opt = get_optimizer("kron").make(problem.parameters, None, 0)
    for step in range(1, 3):
        opt.zero_grad()
        loss = problem.loss(step)
        assert loss.ndim == 0 and math.isfinite(loss.item())
        loss.backward()
        opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, problem.parameters))
    metrics = problem.evaluate()
    if task.metric != "loss":
        assert math.isfinite(metrics[task.metric])
    assert task.criterion and task.target > 0 and task.rule in ("reach", "final")


@pytest.mark.parametrize("name", ["kron_quadratic", "xor16", "logistic"])
def test_run_has_one_history_row_per_evaluation(name):
    task = TASKS[name]
    steps = 2 * task.eval_every + 3
    record = run(RunConfig(task, get_optimizer("adamw"), task.adam_lrs[1], 0, steps))
    hist = record["history"]
    assert hist["step"] == [task.eval_every, 2 * task.eval_every, steps]
    assert all(len(column) == 3 for column in hist.values())
    assert all(math.isfinite(v) for v in hist[task.metric])


def test_logistic_optimum_is_below_every_run():
    """f* comes from Newton's method: no optimizer may end below it (up to rounding)."""
    task = TASKS["logistic"]
    record = run(RunConfig(task, get_optimizer("adamw"), 1e-2, 0, 200))
    assert min(record["history"]["excess_loss"]) > -1e-9
    assert record["history"]["excess_loss"][0] > 1e-4


def test_problem_depends_on_seed_only():
    a, b, c = (TASKS["deep_linear"].build(s) for s in (0, 0, 1))
    assert torch.equal(a.loss(1), b.loss(1))
    assert not torch.equal(a.teacher, c.teacher)


def test_xor_batches_have_two_markers_and_balanced_labels():
    problem = TASKS["xor32"].build(0)
    x, y = problem.sample()
    assert x.shape == (128, 32, 2)
    assert torch.all(x[..., 1].sum(dim=1) == 2)
    assert set(y.tolist()) == {-1.0, 1.0}
    # The first marker lies in the first tenth, the second before the middle.
    first = x[..., 1].argmax(dim=1)
    assert torch.all(first < 32 // 10)
    assert torch.all(x[:, 32 // 2 :, 1] == 0)


def test_add_targets_are_the_mean_of_the_marked_values():
    problem = TASKS["add50"].build(0)
    x, y = problem.sample()
    marked = (x[..., 0] * x[..., 1]).sum(dim=1) / 2
    torch.testing.assert_close(marked, y)
    assert torch.all(x[..., 1].sum(dim=1) == 2)


@pytest.mark.parametrize(
    ("name", "lr", "on_momentum", "expected_lr"),
    [
        ("kron", None, False, 3e-3),
        ("kron_momentum", 3e-4, True, 3e-4),
        ("kron_momentum", None, True, 1e-3),
    ],
)
def test_kron_specs_set_the_fitting_target_and_lr(name, lr, on_momentum, expected_lr):
    """``kron`` keeps the defaults (P fitted on the gradient, lr 3e-3); ``kron_momentum`` fits P
    on the momentum, at the given lr or at 1e-3, the best momentum-fitted lr measured."""
    problem = TASKS["deep_linear"].build(0)
    group = get_optimizer(name).make(problem.parameters, lr, 0).param_groups[0]
    assert group["momentum_into_precond_update"] is on_momentum
    assert group["lr"] == expected_lr


def test_jax_specs_record_the_defaults_of_the_function_they_call():
    """An optax transformation hides its hyperparameters, so a JAX record's settings come from
    the signature of the function its spec calls: a changed default reruns the record."""
    settings = get_optimizer("kron_jax").settings(None, 0)
    assert settings["learning_rate"] == 1e-3
    assert settings["whiten_grad"] is True
    assert get_optimizer("kron_lr_jax").settings(3e-4, 0)["learning_rate"] == 3e-4
    # optax.adamw gets every hyperparameter from the spec itself.
    assert get_optimizer("adamw_jax").settings(1e-3, 0) == {}


def test_kron_skew_spec_gives_the_long_side_a_diagonal_factor():
    """``kron_skew`` is Kron with psgd_torch's skew rule, at the given lr or at 1e-3, the
    middle of the grid the planner runs when it does not sweep."""
    problem = TASKS["deep_linear"].build(0)
    spec = get_optimizer("kron_skew")
    group = spec.make(problem.parameters, 3e-3, 0).param_groups[0]
    assert group["max_skew"] == 1.0 and group["lr"] == 3e-3
    assert spec.make(problem.parameters, None, 0).param_groups[0]["lr"] == 1e-3


@pytest.mark.parametrize(("name", "dtype"), [("kron", torch.bfloat16), ("kron_f32", torch.float32)])
def test_kron_f32_spec_is_the_default_with_float32_factors(name, dtype):
    """``kron_f32`` is the default lr (3e-3) with ``precond_dtype=float32``, the other side of
    the measurement that made bfloat16 factors the default."""
    problem = TASKS["deep_linear"].build(0)
    opt = get_optimizer(name).make(problem.parameters, None, 0)
    assert opt.param_groups[0]["lr"] == 3e-3
    problem.loss(0).backward()
    opt.step()
    factors = [f for state in opt.state.values() for f in state["factors"]]
    assert factors and all(f.dtype == dtype for f in factors)
