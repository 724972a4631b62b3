"""kron.torch.Kron on an accelerator: the same trajectory as on the CPU, no host synchronisation
inside ``step()``, compiled steps, bf16 storage, checkpoints across devices, flat memory."""

from __future__ import annotations

import io
import os

import pytest
import torch
from tests.torch._compiled_step import run_training_step
from tests.torch._device_path import EVERY_STEP_BRANCH
from torch import nn

from kron.core import GEOMETRIES
from kron.torch import Kron
from kron.torch.functional import Streams

DEVICE = torch.device(os.environ.get("KRON_TEST_DEVICE", "cuda"))
CPU = torch.device("cpu")
TEACHER = torch.randn(8, 3, generator=torch.Generator().manual_seed(42))


def make_model(device, dtype=torch.float32, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    )
    return model.to(device=device, dtype=dtype)


def batch(step: int, model: nn.Module):
    """Inputs and the labels a fixed linear teacher gives them, on the model's device."""
    p = next(model.parameters())
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(step))
    return x.to(device=p.device, dtype=p.dtype), (x @ TEACHER).argmax(1).to(p.device)


def loss_of(model, step):
    """The loss in the parameters' dtype, widened from bf16 (a float64 run must not pass through
    float32, whose rounding differs between devices)."""
    x, y = batch(step, model)
    logits = model(x)
    return nn.functional.cross_entropy(
        logits.to(torch.promote_types(logits.dtype, torch.float32)), y
    )


def train(model, opt, steps, start=0):
    losses = []
    for step in range(start, start + steps):
        opt.zero_grad()
        loss = loss_of(model, step)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return [float(loss) for loss in losses]


@pytest.fixture
def cpu_noise(monkeypatch):
    """Every draw made on the CPU generator and moved to the tensor's device, so runs on two
    devices see the same noise (their generators are different algorithms)."""
    normal, low_bits = Streams.normal, Streams.low_bits

    def normal_from_cpu(self, shape, dtype, device, words):
        return normal(self, shape, dtype, CPU, words).to(device)

    def low_bits_from_cpu(self, shape, device, words):
        return low_bits(self, shape, CPU, words).to(device)

    monkeypatch.setattr(Streams, "normal", normal_from_cpu)
    monkeypatch.setattr(Streams, "low_bits", low_bits_from_cpu)


def run_on(device, steps=12, **options):
    model = make_model(device, torch.float64)
    opt = Kron(model.parameters(), lr=1e-2, preconditioner_update_probability=0.5, **options)
    train(model, opt, steps)
    return [p.detach().to(CPU) for p in model.parameters()]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_every_geometry_follows_the_cpu_trajectory_in_float64(cpu_noise, geometry):
    options = dict(preconditioner_mode=geometry, precond_dtype=torch.float64, compile=False)
    for on_device, on_cpu in zip(run_on(DEVICE, **options), run_on(CPU, **options)):
        torch.testing.assert_close(on_device, on_cpu, rtol=1e-10, atol=1e-12)


def test_compiled_default_step_follows_the_cpu_trajectory(cpu_noise):
    """The default on an accelerator compiles the math (``compile=None``)."""
    options = dict(precond_dtype=torch.float64, mars=True, caution=True, delayed=True)
    for on_device, on_cpu in zip(run_on(DEVICE, **options), run_on(CPU, **options)):
        torch.testing.assert_close(on_device, on_cpu, rtol=1e-9, atol=1e-11)


def test_newton_steps_follow_the_cpu_trajectory(cpu_noise):
    def run(device):
        model = make_model(device, torch.float64)
        opt = Kron(
            model.parameters(),
            lr=1e-2,
            preconditioner_type="newton",
            preconditioner_update_probability=0.5,
            precond_dtype=torch.float64,
        )
        for step in range(8):
            opt.step(lambda step=step: loss_of(model, step))
        return [p.detach().to(CPU) for p in model.parameters()]

    for on_device, on_cpu in zip(run(DEVICE), run(CPU)):
        torch.testing.assert_close(on_device, on_cpu, rtol=1e-9, atol=1e-11)


@pytest.mark.cuda_only
def test_step_never_synchronises_with_the_host():
    model = make_model(DEVICE)
    opt = Kron(model.parameters(), preconditioner_update_probability=0.3, **EVERY_STEP_BRANCH)
    # Compile outside the checked region (compiling may synchronise): the step exists in two
    # variants, with and without a fit (key index 2), and the random schedule decides which
    # steps fit, so warm up until both have been compiled.
    start = 0
    while {key[2] for key in opt._compiled} != {True, False} and start < 40:
        train(model, opt, 1, start=start)
        start += 1
    assert {key[2] for key in opt._compiled} == {True, False}
    for step in range(start, start + 12):
        opt.zero_grad()
        loss_of(model, step).backward()
        if step == start + 6:  # a non-finite gradient takes the device-side skip path
            next(model.parameters()).grad[0, 0] = float("nan")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    first = next(model.parameters())
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    assert int(opt.state[first]["skipped"]) == 1


def test_compiled_training_step_stops_compiling_and_equals_eager():
    def run(compile_fn):
        model = make_model(DEVICE)
        return run_training_step(model, lambda step: batch(step, model), compile_fn, steps=16)

    compiled, graphs = run(torch.compile)
    eager, _ = run(lambda fn: fn)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # Each (shape stack, fit or not) compiles once in the first steps; later steps reuse them.
    assert graphs[7] == graphs[-1], graphs


@pytest.mark.parametrize(
    ("precond_dtype", "expected"), [(torch.float32, torch.float32), (None, torch.bfloat16)]
)
def test_bf16_parameters_keep_their_preconditioner_dtype_and_learn(precond_dtype, expected):
    model = make_model(DEVICE, torch.bfloat16)
    opt = Kron(model.parameters(), lr=3e-3, precond_dtype=precond_dtype)
    losses = train(model, opt, 150)
    state = opt.state[next(model.parameters())]
    assert all(q.dtype == expected for q in state["factors"])
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10, (losses[:10], losses[-10:])


def test_resume_on_the_device_is_bit_for_bit():
    options = dict(lr=1e-2, preconditioner_update_probability=0.3, stochastic_schedule=True)
    straight = make_model(DEVICE)
    opt = Kron(straight.parameters(), **options)
    train(straight, opt, 20)

    first = make_model(DEVICE)
    opt_first = Kron(first.parameters(), **options)
    train(first, opt_first, 10)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt_first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make_model(DEVICE, seed=1)
    resumed.load_state_dict(saved["model"])
    opt_resumed = Kron(resumed.parameters(), **options)
    opt_resumed.load_state_dict(saved["opt"])
    train(resumed, opt_resumed, 10, start=10)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_a_device_checkpoint_loads_onto_the_cpu_and_back():
    model = make_model(DEVICE)
    opt = Kron(model.parameters(), lr=1e-2)
    train(model, opt, 5)
    on_cpu = make_model(CPU)
    on_cpu.load_state_dict({k: v.to(CPU) for k, v in model.state_dict().items()})
    opt_cpu = Kron(on_cpu.parameters(), lr=1e-2)
    opt_cpu.load_state_dict(opt.state_dict())
    for p in on_cpu.parameters():
        state = opt_cpu.state[p]
        assert state["momentum"].device == CPU
        assert all(q.device == CPU for q in state["factors"])
    losses = train(on_cpu, opt_cpu, 5, start=5)
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    back = Kron(model.parameters(), lr=1e-2)
    back.load_state_dict(opt_cpu.state_dict())
    for p in model.parameters():
        assert all(q.device == p.device for q in back.state[p]["factors"])


@pytest.mark.cuda_only
def test_memory_stays_flat_over_a_thousand_steps():
    model = make_model(DEVICE)
    opt = Kron(model.parameters(), preconditioner_update_probability=0.03)
    train(model, opt, 50)
    torch.cuda.synchronize()
    settled = torch.cuda.memory_allocated()
    train(model, opt, 1000, start=50)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= settled, (settled, torch.cuda.memory_allocated())
