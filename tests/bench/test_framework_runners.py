"""The JAX and Keras runners: each port computes the torch problem's loss on the same batches,
optax and Keras runs reproduce torch ones where the math is the same, and the command line plans
JAX runs."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from kron.bench.cli import build_parser, plan
from kron.bench.jax_problems import PORTS, check_portable, port
from kron.bench.jax_session import JaxSession
from kron.bench.optimizers import for_framework, get_optimizer
from kron.bench.runner import RunConfig, run
from kron.bench.tasks import TASKS
from kron.bench.tiers import TIERS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("name", list(PORTS))
def test_port_matches_the_torch_loss_gradient_and_metric(name):
    """Two problems of one seed: the torch loss and gradients of steps 1-3 equal the port's on
    the port's batches (each problem draws from its own generator, in the same order)."""
    task = TASKS[name]
    torch_problem = task.build(0)
    jax_problem = port(name, task.build(0))
    params = jax.tree.map(jax.numpy.asarray, jax_problem.params)
    for step in range(1, 4):
        for p in torch_problem.parameters:
            p.grad = None
        expected = torch_problem.loss(step)
        expected.backward()
        value, grads = jax.value_and_grad(jax_problem.loss)(params, jax_problem.batch(step))
        np.testing.assert_allclose(float(value), expected.item(), rtol=1e-5)
        torch_grads = [p.grad.numpy() for p in torch_problem.parameters]
        for got, want in zip(jax.tree.leaves(grads), torch_grads):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-7)
    (metric,) = jax_problem.evaluate(params).values()
    (expected_metric,) = torch_problem.evaluate().values()
    assert metric == pytest.approx(expected_metric, rel=1e-5, abs=1e-12)


def test_optax_adamw_reproduces_torch_adamw():
    """Same problem, same batches, same Adam math: the two runs' metrics agree, which checks the
    JAX session end to end (batches, step order, evaluation points)."""
    task = TASKS["deep_linear"]
    jax_run = run(RunConfig(task, get_optimizer("adamw_jax"), 3e-3, 0, 100))
    torch_run = run(RunConfig(task, get_optimizer("adamw"), 3e-3, 0, 100))
    np.testing.assert_allclose(
        jax_run["history"]["rel_mse"], torch_run["history"]["rel_mse"], rtol=1e-3
    )
    assert jax_run["versions"]["jax"] == jax.__version__


def test_kron_jax_run_is_deterministic_and_learns():
    task = TASKS["kron_quadratic"]
    config = RunConfig(task, get_optimizer("kron_jax"), None, 0, 300)
    first, second = run(config), run(config)
    assert first["history"]["rel_loss"] == second["history"]["rel_loss"]
    assert first["history"]["rel_loss"][-1] < 0.5 * first["history"]["rel_loss"][0]
    assert first["config"]["framework"] == "jax" and math.isfinite(first["outcome"]["final"])


def test_ports_keep_their_tasks_float64_flag():
    for name in PORTS:
        leaves = jax.tree.leaves(port(name, TASKS[name].build(0)).params)
        assert {leaf.dtype.type for leaf in leaves} == {
            np.float64 if TASKS[name].float64 else np.float32
        }


@pytest.mark.parametrize("name", ["kron_quadratic", "logistic"])
def test_a_jax_run_computes_in_its_task_dtype_and_leaves_the_x64_setting(name):
    """The tests run with x64 on (conftest); a float32 task's session computes in float32
    under ``jax.enable_x64(False)``, a float64 task's in float64, and neither changes the
    process's setting."""
    session = JaxSession(RunConfig(TASKS[name], get_optimizer("kron_jax"), None, 0, 3))
    loss = session.train_step(1)
    (leaf, *_) = jax.tree.leaves(session.params)
    assert leaf.dtype == (np.float64 if TASKS[name].float64 else np.float32)
    assert math.isfinite(loss) and jax.config.jax_enable_x64


@pytest.mark.parametrize("peer", ["psgdax", "heavyball"])
def test_peer_run_is_deterministic_and_learns(peer):
    """The peers CI installs (kron_torch needs triton, a 1 GB wheel, and is left out)."""
    config = RunConfig(TASKS["kron_quadratic"], get_optimizer(peer), 3e-3, 0, 300)
    first, second = run(config), run(config)
    assert first["history"]["rel_loss"] == second["history"]["rel_loss"]
    assert first["history"]["rel_loss"][-1] < 0.5 * first["history"]["rel_loss"][0]
    assert first["versions"][peer] == importlib.metadata.version(peer)


def test_a_task_without_a_port_raises_naming_the_ported_ones():
    with pytest.raises(ValueError, match=r"no JAX runner.*kron_quadratic"):
        port("xor16", TASKS["xor16"].build(0))
    # The LM's warm-up/cosine schedule and clipping are refused before anything is built.
    with pytest.raises(ValueError, match=r"'warmup_cosine' and grad_clip 1.0; the Keras runner"):
        check_portable(TASKS["char_lm"], "Keras")
    check_portable(TASKS["logistic"], "JAX")  # a ported task passes


def test_framework_jax_plans_only_ported_tasks_and_jax_optimizers():
    args = build_parser().parse_args(["bench", "--framework", "jax", "--standard"])
    entries = plan(args, TIERS["standard"])
    assert {e.task.name for e in entries} == set(PORTS)
    quadratic = next(e for e in entries if e.task.name == "kron_quadratic")
    # The tier's kron, kron_lr and adamw have JAX twins and psgdax is a JAX peer; SGD and the
    # torch peers have none and are dropped.
    assert [s.name for s in quadratic.optimizers] == [
        "kron_jax",
        "kron_lr_jax",
        "adamw_jax",
        "psgdax",
    ]
    # psgdax cannot trace with x64 on, so the float64 tasks leave it out.
    logistic = next(e for e in entries if e.task.name == "logistic")
    assert [s.name for s in logistic.optimizers] == ["kron_jax", "kron_lr_jax", "adamw_jax"]
    assert for_framework("sgd", "jax") is None
    assert for_framework("kron_jax", "torch") is None
    assert for_framework("kron", "torch").name == "kron"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


KERAS_SCRIPT = """
import json, sys
import numpy as np
from kron.bench.optimizers import get_optimizer
from kron.bench.runner import RunConfig, run
from kron.bench.tasks import TASKS

deep_linear, quadratic = TASKS["deep_linear"], TASKS["kron_quadratic"]
keras_adamw = run(RunConfig(deep_linear, get_optimizer("adamw_keras"), 3e-3, 0, 100))
torch_adamw = run(RunConfig(deep_linear, get_optimizer("adamw"), 3e-3, 0, 100))
kron = [run(RunConfig(quadratic, get_optimizer("kron_keras"), 3e-3, 0, 200)) for _ in range(2)]
print(json.dumps({
    "keras_adamw": keras_adamw["history"]["rel_mse"],
    "torch_adamw": torch_adamw["history"]["rel_mse"],
    "kron": [k["history"]["rel_loss"] for k in kron],
    "versions": kron[0]["versions"],
    "kron_settings": kron[0]["config"]["settings"],
}))
"""


def _python(script: str, backend: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KERAS_BACKEND": backend}
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )


def test_keras_runner_reproduces_adamw_and_runs_kron_keras():
    """In a fresh process (Keras's backend is fixed at import): Keras AdamW's curve equals torch
    AdamW's on the same problem, and kron.keras.Kron's run is deterministic and learns."""
    done = _python(KERAS_SCRIPT, "jax")
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(out["keras_adamw"], out["torch_adamw"], rtol=1e-3)
    first, second = out["kron"]
    assert first == second
    assert first[-1] < 0.5 * first[0]
    assert "keras" in out["versions"]
    # The record carries the optimizer's resolved config, so resume can tell defaults apart.
    settings = out["kron_settings"]
    assert settings["learning_rate"] == pytest.approx(3e-3, rel=1e-6)
    assert settings["momentum_into_precond_update"] is True


def test_keras_runner_refuses_another_backend():
    script = (
        "import keras\n"
        "from kron.bench.optimizers import get_optimizer\n"
        "from kron.bench.runner import RunConfig, run\n"
        "from kron.bench.tasks import TASKS\n"
        "run(RunConfig(TASKS['rosenbrock'], get_optimizer('adamw_keras'), 1e-3, 0, 2))\n"
    )
    done = _python(script, "torch")
    assert done.returncode != 0
    assert "needs the jax backend" in done.stderr and "'torch'" in done.stderr


def test_a_missing_framework_names_the_extras_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "keras" else real(name, *a)
    )
    args = build_parser().parse_args(["bench", "--framework", "keras", "--quick"])
    with pytest.raises(SystemExit, match=r"needs keras.*setup-venv\.sh bench,torch,jax,keras"):
        plan(args, TIERS["quick"])


@pytest.mark.parametrize(
    ("absent", "unavailable"),
    [
        ("jax", {"kron_jax", "kron_lr_jax", "adamw_jax", "psgdax", "kron_keras", "adamw_keras"}),
        ("optax", {"kron_jax", "kron_lr_jax", "adamw_jax", "psgdax"}),
        ("keras", {"kron_keras", "kron_lr_keras", "adamw_keras"}),
    ],
)
def test_a_spec_is_available_only_with_its_runners_packages(monkeypatch, absent, unavailable):
    """``kron bench --list`` said ``yes`` for kron_jax and kron_keras without JAX or Keras."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == absent else real(name, *a)
    )
    for name in unavailable:
        assert not get_optimizer(name).available(), name
    assert get_optimizer("kron").available() and get_optimizer("adamw").available()


def test_keras_runner_picks_jax_over_the_shells_backend():
    """docs/benchmarks.md: ``--framework keras`` runs Keras on JAX; a ``KERAS_BACKEND`` left set
    in the shell made the run fail instead."""
    script = (
        "from kron.bench.keras_session import keras_on_jax\n"
        "print(keras_on_jax().backend.backend())\n"
    )
    done = _python(script, "tensorflow")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "jax"


@pytest.mark.parametrize("name", ["adamw_keras", "kron_keras"])
def test_keras_settings_are_the_same_on_every_call(name):
    """A record is resumed when its settings match the plan's; Keras numbers its optimizers'
    default names by how many the process has built, which must not count as a setting."""
    spec = get_optimizer(name)
    first, second = spec.settings(1e-3, 0), spec.settings(1e-3, 0)
    assert first == second
    assert "name" not in first and first["learning_rate"] == pytest.approx(1e-3)
