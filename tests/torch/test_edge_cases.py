"""Edge cases found in review: dtypes, Newton corner cases, partial steps, validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kron.core import clip_l2, clip_rms, mars_correction
from kron.torch import Kron
from kron.torch.functional import OPS, clipper, hessian_vector_products


def test_float64_parameters_are_not_rounded_through_float32():
    p = nn.Parameter(torch.tensor([1.0 + 1e-12, 2.0], dtype=torch.float64))
    before = p.detach().clone()
    opt = Kron([p], lr=0.0)
    p.grad = torch.ones(2, dtype=torch.float64)
    opt.step()
    assert torch.equal(p.detach(), before)


def test_finite_differences_replay_dropout_and_restore_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 1))
    x = torch.randn(32, 6)
    params = list(model.parameters())
    probes = [torch.randn_like(p) for p in params]
    before = [p.detach().clone() for p in params]

    def closure():
        return (model(x) ** 2).mean()

    torch.manual_seed(1)
    _, _, exact = hessian_vector_products(closure, params, params, probes, "double_backward")
    torch.manual_seed(1)
    _, _, approx = hessian_vector_products(closure, params, params, probes, "finite_difference")
    for a, b in zip(exact, approx):
        assert torch.linalg.norm(a - b) <= 0.05 * torch.linalg.norm(a) + 1e-4
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


def test_newton_with_unused_and_frozen_parameters():
    torch.manual_seed(0)
    w, unused, frozen = (nn.Parameter(torch.randn(4, 3)) for _ in range(3))
    opt = Kron(
        [w, unused, frozen],
        lr=0.01,
        preconditioner_type="newton",
        preconditioner_update_probability=1.0,
    )
    frozen.grad = torch.ones(4, 3)  # a stale gradient from before it was frozen
    frozen.requires_grad_(False)
    frozen_before, unused_before = frozen.detach().clone(), unused.detach().clone()
    w_before = w.detach().clone()
    for _ in range(3):
        opt.step(lambda: (w**2).sum() + (frozen * w).sum())
    assert torch.equal(frozen.detach(), frozen_before)
    assert torch.equal(unused.detach(), unused_before)
    assert (w.detach() - w_before).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["double_backward", "finite_difference"])
def test_newton_products_of_gradients_that_do_not_depend_on_the_parameters(method):
    """A Newton group the loss does not use, and a parameter the loss is linear in, have zero
    Hessian-vector products; double backward raised (autograd refuses an empty input list and
    a gradient without a graph) instead."""
    used, unused = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3, 3))
    x = torch.randn(5, 4)
    opt = Kron(
        [{"params": [used]}, {"params": [unused], "preconditioner_type": "newton"}],
        hvp_method=method,
    )
    before = unused.detach().clone()
    opt.step(lambda: (x @ used).square().sum())
    assert [g["step"] for g in opt.param_groups] == [1, 0]
    assert torch.equal(unused.detach(), before)

    linear, curved = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    probes = [torch.ones(3), torch.ones(3)]
    _, _, hvps = hessian_vector_products(
        lambda: (2 * linear).sum() + curved.square().sum(),
        [linear, curved],
        [linear, curved],
        probes,
        method,
    )
    torch.testing.assert_close(hvps[0], torch.zeros(3), rtol=0, atol=1e-6)
    torch.testing.assert_close(hvps[1], torch.full((3,), 2.0), rtol=1e-3, atol=0)


def test_mixed_hvp_methods_are_rejected_when_the_groups_are_made():
    """One pass over the closure computes every Newton group's products, so their hvp_method
    must agree; the mix was accepted and refused only by the first step."""
    a, b, c = (nn.Parameter(torch.ones(2, 2)) for _ in range(3))
    message = r"one hvp_method; got 'double_backward' \(group 0\), 'finite_difference' \(group 1\)"
    with pytest.raises(ValueError, match=message):
        Kron(
            [
                {"params": [a], "hvp_method": "double_backward"},
                {"params": [b], "hvp_method": "finite_difference"},
            ],
            preconditioner_type="newton",
        )
    opt = Kron([a], preconditioner_type="newton")
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [b], "hvp_method": "finite_difference"})
    assert len(opt.param_groups) == 1
    # A whitening group's hvp_method is never used, so it may differ.
    opt.add_param_group(
        {"params": [c], "hvp_method": "finite_difference", "preconditioner_type": "whitening"}
    )
    opt.add_param_group({"params": [b]})
    # A group edited after it was added is still caught, before anything steps.
    opt.param_groups[2]["hvp_method"] = "finite_difference"
    with pytest.raises(ValueError, match=r"'finite_difference' \(group 2\)"):
        opt.step(lambda: (a * b * c).sum())
    assert torch.equal(a.detach(), torch.ones(2, 2)) and not opt.state


def test_raise_mode_updates_nothing_when_any_gradient_is_bad():
    a, b = nn.Parameter(torch.ones(3, 3)), nn.Parameter(torch.ones(3, 3))
    opt = Kron([{"params": [a]}, {"params": [b]}], nonfinite="raise", lr=0.1)
    a.grad, b.grad = torch.ones(3, 3), torch.full((3, 3), float("nan"))
    with pytest.raises(FloatingPointError, match="parameter 0 of group 1"):
        opt.step()
    assert torch.equal(a.detach(), torch.ones(3, 3))
    assert [g["step"] for g in opt.param_groups] == [0, 0]


def test_a_huge_finite_gradient_leaves_parameters_and_preconditioner_finite():
    """A gradient spike of 1e25 is finite, so it is stepped, but the fit's squares overflow
    float32: the factors and Lipschitz estimates keep their values instead of turning inf or NaN,
    and the parameters stay finite through the spike and the steps after it."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(32, 16))
    opt = Kron([w], lr=1e-3, preconditioner_update_probability=1.0)
    for _ in range(5):
        w.grad = torch.randn(32, 16)
        opt.step()
    before = [f.clone() for f in opt.state[w]["factors"] + opt.state[w]["lipschitz"]]
    w.grad = torch.randn(32, 16) * 1e25
    opt.step()
    assert opt.state[w]["skipped"] == 0  # finite, so not skipped
    for new, old in zip(opt.state[w]["factors"] + opt.state[w]["lipschitz"], before):
        assert torch.equal(new, old)
    for _ in range(3):
        w.grad = torch.randn(32, 16)
        opt.step()
    assert torch.isfinite(w).all()
    assert all(torch.isfinite(f).all() for f in opt.state[w]["factors"])


def test_a_group_without_gradients_keeps_its_clock():
    a = nn.Parameter(torch.ones(3, 3))
    opt = Kron([a], preconditioner_update_probability=0.25)
    opt.step()  # no gradient
    assert opt.param_groups[0]["step"] == 0 and opt.param_groups[0]["decision_total"] == 0.0


def test_stacked_state_cache_stays_bounded_and_sees_replaced_entries():
    params = [nn.Parameter(torch.randn(4, 4)) for _ in range(5)]
    opt = Kron(params, lr=0.01, preconditioner_update_probability=1.0)
    for step in range(12):
        for i, p in enumerate(params):
            p.grad = torch.randn(4, 4) if (step + i) % 3 else None
        opt.step()
    assert len(opt._stacks) == 1  # one bucket: one remembered stack, whatever the subset
    for p in params:
        p.grad = torch.zeros(4, 4)
    target = opt.state[params[0]]
    dtype = target["factors"][0].dtype
    target["factors"][0] = 7 * torch.eye(4, dtype=dtype).expand(1, 4, 4).clone()
    opt.param_groups[0]["lr"] = 0.0
    opt.param_groups[0]["preconditioner_update_probability"] = 1e-6  # no fit: Q stays as set
    opt.step()
    torch.testing.assert_close(opt.state[params[0]]["factors"][0][0], 7 * torch.eye(4, dtype=dtype))


def test_state_updated_in_place_matches_state_restacked_every_step():
    """Steady-state steps copy into the remembered stack; forcing a fresh stack on every step
    (each entry replaced by a copy) must give bit-identical parameters and state, including on
    steps where one parameter's gradient is not finite (steps 7 and 12, one a fit at p = 0.3)."""

    def run(restack: bool) -> tuple[list[torch.Tensor], dict]:
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(6, 5)) for _ in range(3)] + [
            nn.Parameter(torch.randn(5))
        ]
        opt = Kron(params, lr=0.05, preconditioner_update_probability=0.3, seed=3)
        for step in range(25):
            gen = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            if step in (7, 12):
                params[1].grad[2, 3] = float("nan")
            opt.step()
            if restack:
                for state in opt.state.values():
                    for key in ("factors", "lipschitz", "cache"):
                        state[key] = [t.clone() for t in state[key]]
                    state["momentum"] = state["momentum"].clone()
        return [p.detach().clone() for p in params], opt.state_dict()["state"]

    (fast, fast_state), (slow, slow_state) = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))
    for index, entry in fast_state.items():
        for key in ("factors", "cache"):
            assert all(torch.equal(a, b) for a, b in zip(entry[key], slow_state[index][key]))
        assert torch.equal(entry["momentum"], slow_state[index]["momentum"])
        for key in ("count", "skipped"):
            assert torch.equal(entry[key], slow_state[index][key])
    assert fast_state[1]["skipped"].item() == 2 and fast_state[0]["skipped"].item() == 0
    assert fast_state[1]["count"].item() == 23 and fast_state[0]["count"].item() == 25


def test_a_parameter_steps_the_same_stacked_or_alone_when_its_mate_missed_a_step():
    """A stack whose counts differ (one parameter had no gradient on step 0) computed the
    momentum's weights in float32 where a shared count gives a float64 number: the other
    parameter's trajectory depended on stack_params (and Kron and DistributedKron differed)."""

    def run(stack_params: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(8, 8)) for _ in range(2)]
        opt = Kron(params, lr=0.01, stack_params=stack_params)
        for step in range(10):
            gen = torch.Generator().manual_seed(100 + step)
            for i, p in enumerate(params):
                p.grad = None if step == 0 and i == 1 else torch.randn(8, 8, generator=gen)
            opt.step()
        return [t.detach().clone() for p in params for t in (p, opt.state[p]["momentum"])]

    assert all(torch.equal(a, b) for a, b in zip(run(True), run(False)))


def test_a_cached_parameter_steps_the_same_stacked_or_alone_when_a_fresh_mate_joins():
    """A stack holds a cache only when every member has one, so a mate stepped for the first
    time left the others' fit without their cache: in bfloat16 that rounds differently, and
    the others' parameters depended on stack_params (1.6e-4 apart at lr 0.01)."""

    def run(stack_params: bool) -> list[torch.Tensor]:
        params = [
            nn.Parameter(torch.randn(5, 4, generator=torch.Generator().manual_seed(i)))
            for i in range(3)
        ]
        opt = Kron(params, lr=0.01, cached=True, stack_params=stack_params)
        for step in range(6):
            gen = torch.Generator().manual_seed(100 + step)
            for i, p in enumerate(params):
                p.grad = None if step < 3 and i == 1 else torch.randn(5, 4, generator=gen)
            opt.step()
        return [p.detach().clone() for p in params]

    assert all(torch.equal(a, b) for a, b in zip(run(True), run(False)))


@pytest.mark.parametrize("mate_is_fresh", [False, True])
def test_an_edited_precond_dtype_converts_the_factors_on_the_next_step(mate_is_fresh):
    """The factors kept their dtype, unless a same-shape parameter without state joined the
    stack, which then converted every factor in it."""
    a, b = nn.Parameter(torch.randn(6, 6)), nn.Parameter(torch.randn(6, 6))
    opt = Kron([a, b], preconditioner_update_probability=1.0)
    a.grad, b.grad = torch.randn(6, 6), None if mate_is_fresh else torch.randn(6, 6)
    opt.step()
    before = opt.state[a]["factors"][0].clone()
    opt.param_groups[0].update(precond_dtype=torch.float32, preconditioner_update_probability=1e-9)
    a.grad, b.grad = torch.randn(6, 6), torch.randn(6, 6)
    opt.step()  # no fit: a's factors are its bfloat16 ones, converted
    for p in (a, b):
        assert [f.dtype for f in opt.state[p]["factors"]] == [torch.float32] * 2
        assert all(lip.dtype == torch.float32 for lip in opt.state[p]["lipschitz"])
    assert before.dtype == torch.bfloat16
    assert torch.equal(opt.state[a]["factors"][0], before.float())


def test_an_edited_mu_dtype_converts_the_momentum_on_the_next_step():
    p = nn.Parameter(torch.randn(5, 4))
    opt = Kron([p], mu_dtype=torch.bfloat16)
    p.grad = torch.randn(5, 4)
    opt.step()
    assert opt.state[p]["momentum"].dtype == torch.bfloat16
    opt.param_groups[0]["mu_dtype"] = None  # the parameter's own dtype
    p.grad = torch.randn(5, 4)
    opt.step()
    assert opt.state[p]["momentum"].dtype == torch.float32


def test_a_tensor_precond_lr_edited_in_place_is_used():
    """Schedulers edit a tensor lr in place; a tensor precond_lr so edited was held at its
    first value."""

    def run(edit):
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(5, 4))
        opt = Kron([p], precond_lr=torch.tensor(0.1), preconditioner_update_probability=1.0)
        for step in range(4):
            p.grad = torch.randn(5, 4, generator=torch.Generator().manual_seed(step))
            opt.step()
            if step == 1:
                edit(opt.param_groups[0])
        return p.detach().clone()

    in_place = run(lambda group: group["precond_lr"].fill_(0.5))
    replaced = run(lambda group: group.update(precond_lr=torch.tensor(0.5)))
    unchanged = run(lambda group: None)
    assert torch.equal(in_place, replaced) and not torch.equal(in_place, unchanged)


def test_a_step_under_autocast_keeps_the_precond_dtype():
    """Under ``torch.autocast`` the factor products ran in bfloat16 even with float32 factors."""

    def run(autocast: bool):
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(16, 12))
        opt = Kron([p], precond_dtype=torch.float32, preconditioner_update_probability=1.0)
        for step in range(3):
            p.grad = torch.randn(16, 12, generator=torch.Generator().manual_seed(step))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                opt.step()
        return p.detach().clone()

    assert torch.equal(run(True), run(False))


def test_in_place_edits_of_state_are_seen_by_the_next_step():
    p = nn.Parameter(torch.ones(4, 4))
    opt = Kron([p], lr=0.1, preconditioner_update_probability=1e-6, seed=0)
    for _ in range(3):
        p.grad = torch.ones(4, 4)
        opt.step()
    held = opt.state[p]["momentum"]
    held.zero_()
    p.grad = torch.zeros(4, 4)
    opt.step()  # zero gradient into zeroed momentum: nothing moves
    assert torch.equal(opt.state[p]["momentum"], torch.zeros(4, 4))
    assert opt.state[p]["momentum"] is held  # the step wrote into the tensor the user holds


def test_rejected_param_group_leaves_the_optimizer_unchanged():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = Kron([a])
    with pytest.raises(ValueError, match="Invalid b1"):
        opt.add_param_group({"params": [b], "b1": 2.0})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [b], "b1": 0.5})
    assert len(opt.param_groups) == 2


def test_non_positive_clip_thresholds_are_rejected():
    with pytest.raises(ValueError, match="update_clip_value must be > 0"):
        Kron([nn.Parameter(torch.ones(2))], update_clip_value=-1.0)
    with pytest.raises(ValueError, match="gradient_clip_value must be > 0"):
        Kron([nn.Parameter(torch.ones(2))], gradient_clipping="rms", gradient_clip_value=0.0)


def test_schedule_values_are_checked_every_step():
    p = nn.Parameter(torch.ones(2, 2))
    opt = Kron([p], preconditioner_update_probability=lambda step: 0.0)
    p.grad = torch.ones(2, 2)
    with pytest.raises(ValueError, match=r"gave 0\.0 for step count 0 of group 0"):
        opt.step()


def test_newton_automatic_init_scale_comes_from_the_hessian():
    """With H = 4I and Gaussian v the rule (E v²)^¼ (E h⁴)^(-1/8) gives
    Q₀ ≈ (3·4⁴)^(-1/8)·I ≈ 0.437·I whatever θ is (it once came from the gradient instead)."""
    for start in (1e-3, 1.0):
        w = nn.Parameter(torch.full((64,), start, dtype=torch.float64))
        opt = Kron(
            [w],
            lr=0.0,
            preconditioner_type="newton",
            precond_init_scale=None,
            precond_dtype=torch.float64,
            preconditioner_update_probability=1.0,
            precond_lr=1e-12,
        )
        opt.step(lambda w=w: 2.0 * (w**2).sum())
        scale = opt.state[w]["factors"][0].mean().item()
        assert scale == pytest.approx(0.5 * 3 ** (-1 / 8), rel=0.05), (start, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_finite_rows_equals_isfinite_all_including_overflowing_rows(dtype):
    from kron.core import finite_rows
    from kron.torch.functional import OPS

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 50, generator=gen).to(dtype)
    big = torch.finfo(dtype).max
    x[1] = big  # a row whose plain sum overflows but is finite
    x[2, 3] = float("nan")
    x[3, 0], x[3, 1] = float("inf"), float("-inf")  # inf - inf: NaN either way
    x[4, 7] = float("-inf")
    marks = torch.rand(64, 50, generator=gen) < 0.01
    x[8:][marks[8:]] = float("inf")
    expected = torch.isfinite(x).all(1)
    assert torch.equal(finite_rows(x, OPS), expected)
    assert expected[1] and not expected[2:5].any() and not expected[8:].all()


def test_finite_rows_survives_torch_compile():
    """Keras's PyTorch backend compiles the whole train step, the finiteness test included; a
    test that a compiler may simplify (``sum(x·0) == 0`` becomes True) would let a NaN through."""
    from kron.core import finite_rows
    from kron.torch.functional import OPS

    x = torch.ones(4, 6)
    x[1, 2], x[2, 0] = float("nan"), float("-inf")
    compiled = torch.compile(lambda t: finite_rows(t, OPS), dynamic=False)
    assert compiled(x).tolist() == [True, False, False, True]


def complex_run(steps: int, state: dict | None = None):
    """Kron on one complex (5, 3) parameter, fitting ``z`` in ``A z ≈ b`` (complex least squares);
    with ``state`` the optimizer resumes from it. Returns the parameter, losses and optimizer."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(8, 5, dtype=torch.complex128, generator=gen)
    b = torch.randn(8, 3, dtype=torch.complex128, generator=gen)
    z = torch.zeros(5, 3, dtype=torch.complex128, requires_grad=True)
    opt = Kron([z], lr=0.03)
    if state is not None:
        z.data.copy_(state["z"])
        opt.load_state_dict(state["opt"])
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (a @ z - b).abs().pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return z.detach().clone(), losses, opt


def test_a_complex_parameter_is_stepped_as_its_real_view():
    """As torch.optim does: the real and imaginary parts are one real tensor ``(*shape, 2)``,
    so the trajectory is the real view's, bit for bit (before, the imaginary part of the
    gradient was dropped)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(8, 5, dtype=torch.complex128, generator=gen)
    b = torch.randn(8, 3, dtype=torch.complex128, generator=gen)
    real = torch.zeros(5, 3, 2, dtype=torch.float64, requires_grad=True)
    opt = Kron([real], lr=0.03)
    for _ in range(30):
        opt.zero_grad()
        (a @ torch.view_as_complex(real) - b).abs().pow(2).mean().backward()
        opt.step()
    z, losses, opt = complex_run(30)
    torch.testing.assert_close(torch.view_as_real(z), real.detach(), rtol=0, atol=0)
    assert losses[-1] < 0.5 * losses[0]
    assert z.imag.abs().max() > 0.01
    assert opt.state[opt.param_groups[0]["params"][0]]["momentum"].shape == (5, 3, 2)


def test_a_complex_parameter_resumes_from_a_state_dict(tmp_path):
    straight, _, _ = complex_run(20)
    z, _, opt = complex_run(10)
    torch.save({"z": z, "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    resumed, _, _ = complex_run(10, torch.load(tmp_path / "ckpt.pt", weights_only=True))
    torch.testing.assert_close(resumed, straight, rtol=0, atol=0)


def test_newton_type_names_a_complex_parameter():
    z = torch.zeros(3, 3, dtype=torch.complex64, requires_grad=True)
    opt = Kron([z], preconditioner_type="newton")
    with pytest.raises(ValueError, match=r"complex parameters \(parameter 0 of group 0"):
        opt.step(lambda: z.abs().pow(2).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("spec", "core_clip"), [("rms", clip_rms), ("l2_norm", clip_l2)])
@pytest.mark.parametrize("scales", [(0.1, 0.2, 0.3), (0.1, 5.0, 0.3), (4.0, 5.0, 6.0)])
def test_the_update_clip_reading_norms_on_the_host_equals_the_cores(dtype, spec, core_clip, scales):
    """The CPU fast path reads the norms and skips the multiply when no row is over the limit;
    rows over it are scaled exactly as the core's clip scales them."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 8, generator=gen, dtype=dtype) * torch.tensor(scales, dtype=dtype).view(
        -1, 1, 1
    )
    limit = 1.1 if spec == "rms" else 11.0
    expected = core_clip(x, limit, OPS)
    for read_norms in (True, False):
        clipped = clipper(spec, limit, in_place=True, read_norms=read_norms)(x.clone())
        torch.testing.assert_close(clipped, expected, rtol=0, atol=0)


def test_raise_mode_checks_the_gradients_the_closure_computes():
    w = nn.Parameter(torch.ones(3, 3))
    opt = Kron([w], nonfinite="raise")

    def nan_closure():
        opt.zero_grad()
        loss = (w * float("nan")).sum()
        loss.backward()
        return loss

    with pytest.raises(FloatingPointError, match="parameter 0 of group 0"):
        opt.step(nan_closure)
    assert torch.equal(w.detach(), torch.ones(3, 3)) and not opt.state

    def finite_closure():
        opt.zero_grad()
        loss = (w * w).sum()
        loss.backward()
        return loss

    w.grad = torch.full((3, 3), float("nan"))  # stale: the closure replaces it
    opt.step(finite_closure)
    assert not torch.equal(w.detach(), torch.ones(3, 3))


def test_a_sparse_gradient_is_named_before_anything_steps_even_in_raise_mode():
    dense = nn.Parameter(torch.ones(4, 4))
    embedding = nn.Embedding(10, 4, sparse=True)
    for nonfinite in ("skip", "raise"):
        opt = Kron([{"params": [dense]}, {"params": embedding.parameters()}], nonfinite=nonfinite)
        dense.grad = torch.ones(4, 4)
        embedding(torch.tensor([1, 2])).sum().backward()
        with pytest.raises(ValueError, match=r"sparse gradients \(parameter 0 of group 1"):
            opt.step()
        assert torch.equal(dense.detach(), torch.ones(4, 4))  # the first group did not step
        embedding.zero_grad(set_to_none=True)


def test_a_sparse_parameter_is_refused_and_leaves_the_optimizer_unchanged():
    opt = Kron([nn.Parameter(torch.ones(2))])
    sparse = nn.Parameter(torch.eye(3).to_sparse())
    with pytest.raises(ValueError, match=r"sparse parameters \(parameter 1 of the new group"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2)), sparse]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.uint8, torch.bool])
def test_a_parameter_that_is_not_floating_point_is_refused_before_anything_steps(dtype):
    """An integer or bool parameter was accepted; the step then moved the float parameter of
    its group and made state for both before the in-place update of the integer one failed
    ("result type BFloat16 can't be cast to the desired output type Long"), with the group's
    clock still at 0."""
    weight, counter = nn.Parameter(torch.ones(2, 2)), torch.zeros(3, dtype=dtype)
    message = rf"does not support {dtype} parameters \(parameter 1 of group 0, shape \(3,\)\)"
    with pytest.raises(ValueError, match=message + r"; accepted: torch.float16, .*complex"):
        Kron([weight, counter])
    opt = Kron([weight])
    with pytest.raises(ValueError, match=rf"{dtype} parameters \(parameter 0 of group 1"):
        opt.add_param_group({"params": [counter]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float64, torch.complex32, torch.complex64]
)
def test_every_float_and_complex_parameter_dtype_steps(dtype):
    p = torch.ones(2, 2, dtype=dtype, requires_grad=True)
    opt = Kron([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    moved = p.detach().to(torch.complex128) != 1  # ComplexHalf has no comparison of its own
    assert opt.param_groups[0]["step"] == 1 and moved.all()


def test_a_float8_parameter_is_refused():
    """torch promotes no float8 dtype with another, so the step could not update one."""
    p = torch.ones(2, 2).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"torch.float8_e4m3fn parameters \(parameter 0 of"):
        Kron([p])


def test_an_empty_parameter_is_skipped():
    a, empty = nn.Parameter(torch.ones(3, 3)), nn.Parameter(torch.ones(0, 4))
    opt = Kron([a, empty])
    a.grad, empty.grad = torch.ones(3, 3), torch.ones(0, 4)
    opt.step()
    assert not torch.equal(a.detach(), torch.ones(3, 3))
    assert opt.param_groups[0]["step"] == 1 and empty not in opt.state


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
def test_deepcopy_and_pickle_keep_the_optimizer_wide_options(copier):
    import copy
    import pickle

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = Kron(model.parameters(), seed=7, nonfinite="raise", stack_params=False, compile=False)
    model(torch.randn(8, 4)).square().sum().backward()
    opt.step()
    if copier == "deepcopy":
        copied_model, copied = copy.deepcopy((model, opt))
    else:
        copied_model, copied = pickle.loads(pickle.dumps((model, opt)))
    settings = (copied.seed, copied.nonfinite, copied.stack_params, copied.compile)
    assert settings == (7, "raise", False, False)
    for _ in range(3):  # the copy continues the original's run exactly
        x = torch.randn(8, 4)
        for m, o in [(model, opt), (copied_model, copied)]:
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
        for p, q in zip(model.parameters(), copied_model.parameters()):
            assert torch.equal(p, q)


def test_param_groups_take_heavyballs_names():
    w, v = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2, 2))
    opt = Kron([{"params": [w], "beta": 0.0, "q_dtype": "float32"}, {"params": [v]}])
    first, second = opt.param_groups
    assert (first["b1"], first["precond_dtype"], "beta" in first) == (0.0, "float32", False)
    assert second["b1"] == 0.9
    same = nn.Parameter(torch.ones(2, 2))
    reference = Kron([same], b1=0.0, precond_dtype=torch.float32)
    for sign in (1.0, -1.0, 1.0):
        w.grad = sign * torch.arange(4.0).reshape(2, 2)
        same.grad = w.grad.clone()
        opt.step()
        reference.step()
    assert torch.equal(w, same)
    assert opt.state[w]["factors"][0].dtype == torch.float32
    with pytest.raises(ValueError, match="beta and b1 name the same option"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "beta": 0.5, "b1": 0.8})


def test_one_cycle_lr_works_without_cycling_momentum():
    opt = Kron([nn.Parameter(torch.ones(2))])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.1, total_steps=10, cycle_momentum=False
    )
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(9):
        opt.step()
        scheduler.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.1 / 25) and max(lrs) == pytest.approx(0.1)
    assert lrs[-1] < lrs[0]


@pytest.mark.parametrize("name", ["seed", "nonfinite", "stack_params", "compile", "resync"])
def test_an_optimizer_wide_setting_in_a_param_group_is_refused(name):
    """These live on the optimizer; a group's own value would be silently ignored."""
    value = {"seed": 1, "nonfinite": "raise", "stack_params": False}.get(name)
    a, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=f"{name} cannot be set per param group"):
        Kron([{"params": [a]}, {"params": [b], name: value}])
    opt = Kron([a])
    with pytest.raises(ValueError, match=f"{name} cannot be set per param group"):
        opt.add_param_group({"params": [b], name: value})
    assert len(opt.param_groups) == 1


def test_a_float64_gradient_past_float32s_range_is_skipped_with_narrower_factors():
    """The momentum and the products of bfloat16 or float32 factors are at most float32, which
    cannot hold 1e39: the gradient counts as non-finite and changes nothing. Float64 factors
    step it."""
    for precond_dtype, skipped in [(None, 1), (torch.float32, 1), (torch.float64, 0)]:
        q = nn.Parameter(torch.ones(3, 3, dtype=torch.float64))
        opt = Kron([q], precond_dtype=precond_dtype)
        q.grad = torch.full((3, 3), 1e39, dtype=torch.float64)
        opt.step()
        assert opt.state[q]["skipped"].item() == skipped
        assert torch.isfinite(q).all()
        assert torch.equal(q.detach(), torch.ones_like(q)) == bool(skipped)


def test_a_gradient_past_float16s_range_is_skipped_with_float16_factors():
    """Their products would overflow to inf and turn the parameter to NaN (they did): such a
    gradient counts as non-finite, skipped by default and raised by name with
    ``nonfinite="raise"``. The next gradient in range steps as usual."""
    q = nn.Parameter(torch.ones(4, 3))
    opt = Kron([q], lr=1e-3, precond_dtype=torch.float16)
    q.grad = torch.full((4, 3), 1e5)
    opt.step()
    assert opt.state[q]["skipped"].item() == 1 and torch.equal(q.detach(), torch.ones(4, 3))
    q.grad = torch.full((4, 3), 6e4)
    opt.step()
    assert opt.state[q]["skipped"].item() == 1 and torch.all(q < 1.0)
    opt = Kron([q], lr=1e-3, precond_dtype=torch.float16, nonfinite="raise")
    q.grad = torch.full((4, 3), -1e5)
    with pytest.raises(FloatingPointError, match="past float16's range"):
        opt.step()


@pytest.mark.parametrize("precond_dtype", [torch.float32, torch.float64])
def test_bfloat16_momentum_is_rounded_stochastically_from_any_wider_dtype(precond_dtype):
    """Two seeds see the same gradients, so their bfloat16 momenta differ only by rounding."""

    def momentum(seed):
        gen = torch.Generator().manual_seed(0)
        p = nn.Parameter(torch.randn(16, 16, generator=gen))
        opt = Kron([p], mu_dtype=torch.bfloat16, precond_dtype=precond_dtype, seed=seed)
        for _ in range(3):
            p.grad = torch.randn(16, 16, generator=gen)
            opt.step()
        return opt.state[p]["momentum"]

    assert not torch.equal(momentum(0), momentum(1))


def test_newton_with_every_parameter_frozen_steps_nothing():
    model = nn.Linear(4, 2)
    opt = Kron(model.parameters(), preconditioner_type="newton")
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(8, 4)
    loss = opt.step(lambda: model(x).square().mean())
    torch.testing.assert_close(loss, model(x).square().mean())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt.param_groups[0]["step"] == 0


@pytest.mark.parametrize("kind", ["gradient", "update"])
def test_a_clipping_callable_that_works_in_place_leaves_the_gradients_alone(kind):
    """A lone parameter's stacked gradient is a view of ``p.grad``; a callable that clips in
    place (heavyball's do) gets a copy."""
    lone, pair = nn.Parameter(torch.ones(5)), [nn.Parameter(torch.ones(3, 3)) for _ in range(2)]
    opt = Kron([lone, *pair], **{f"{kind}_clipping": lambda g: g.clamp_(-1.0, 1.0)})
    grads = [10 * torch.randn(p.shape) for p in (lone, *pair)]
    for p, g in zip((lone, *pair), grads):
        p.grad = g.clone()
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip((lone, *pair), grads))


def test_a_compiled_clipping_callable_serves_many_shapes_and_dtypes():
    """heavyball's clips are compiled with ``fullgraph=True``; called per parameter they would
    recompile for each of these 10 ranks and fail past dynamo's limit of 8. They run eagerly."""
    heavyball_utils = pytest.importorskip("heavyball.utils")
    shapes = [(), (3,), (3, 4), (2, 3, 4), (2, 3, 4, 5)] + [(2,) * n for n in range(5, 10)]
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    params += [nn.Parameter(torch.randn(3, 4).to(torch.bfloat16))]
    opt = Kron(
        params,
        gradient_clipping=heavyball_utils.l2_clip_,
        update_clipping=heavyball_utils.l2_clip_,
    )
    for p in params:
        p.grad = 100 * torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    opt.step()
    for p, b in zip(params, before):
        # An update of L2 norm at most 1 (heavyball's clip_at) times lr 3e-3.
        assert (p.detach().float() - b.float()).norm() <= 3e-3 * 1.01


@pytest.mark.parametrize("change", [dict(block_size=2), dict(merge_dims=True)])
def test_a_layout_option_changed_after_the_first_step_is_named(change):
    p = nn.Parameter(torch.randn(2, 3, 4))
    opt = Kron([p])
    p.grad = torch.randn(2, 3, 4)
    opt.step()
    opt.param_groups[0].update(change)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="cannot change after a parameter's first step"):
        opt.step()
    assert torch.equal(p.detach(), before)


@pytest.mark.parametrize(
    "edit, message",
    [
        ((1, "max_size_triangular", 8), "parameter 0 of group 1"),  # a later group's layout
        ((1, "b1", 1.5), "Invalid b1: 1.5"),  # a later group's option
        ((0, "max_size_triangular", 8), "parameter 1 of group 0"),  # a later bucket's layout
        # Q read as P: the factors have the same shapes, so only the geometry's kind tells.
        ((1, "preconditioner_mode", "PRO4P"), "preconditioner_mode of group 1 was edited"),
    ],
)
def test_a_step_refused_for_an_edited_group_updates_nothing(edit, message):
    """Groups and buckets were checked as they were stepped, so the parameters and clocks
    before the bad one had moved: a retry after fixing the value stepped them twice."""
    a, b, c = (nn.Parameter(torch.randn(shape)) for shape in ((4, 3), (20, 3), (20, 3)))
    opt = Kron([{"params": [a, b]}, {"params": [c]}], stack_params=False)

    def step() -> None:
        for p in (a, b, c):
            p.grad = torch.ones_like(p)
        opt.step()

    step()
    gi, key, value = edit
    kept = opt.param_groups[gi][key]
    opt.param_groups[gi][key] = value
    before = [p.detach().clone() for p in (a, b, c)]
    with pytest.raises(ValueError, match=message):
        step()
    assert all(torch.equal(p.detach(), x) for p, x in zip((a, b, c), before))
    assert [g["step"] for g in opt.param_groups] == [1, 1]
    opt.param_groups[gi][key] = kept
    step()
    assert [opt.state[p]["count"].item() for p in (a, b, c)] == [2, 2, 2]


def test_preconditioner_mode_moves_freely_between_geometries_of_one_kind():
    """Q0.5EQ1.5 to QUAD and PRO4P to QUAD4P read the factors as what they are (Q, then P), so
    those edits step on; the refusal is only across the kinds."""
    for first, second in (("Q0.5EQ1.5", "QUAD"), ("PRO4P", "QUAD4P")):
        p = nn.Parameter(torch.randn(4, 3))
        opt = Kron([p], preconditioner_mode=first)
        for mode in (first, second):
            opt.param_groups[0]["preconditioner_mode"] = mode
            p.grad = torch.ones_like(p)
            opt.step()
        assert opt.param_groups[0]["step"] == 2 and torch.isfinite(p).all()


def test_mars_switched_on_after_the_first_step_starts_from_a_zero_previous_gradient():
    """As a parameter first stepped with ``mars=True`` would: the correction of its first MARS
    step uses a zero previous gradient. Checked against a run without MARS fed that corrected
    gradient; a previous gradient of g₂ (no correction) or of the momentum would step
    elsewhere."""
    gen = torch.Generator().manual_seed(0)
    grads = [0.05 * torch.randn(3, 3, generator=gen) for _ in range(2)]
    corrected = mars_correction(grads[1][None], torch.zeros(1, 3, 3), 0.9, 0.0025, OPS)[0]
    assert not torch.allclose(corrected, grads[1], rtol=1e-3, atol=0)
    params = []
    for switched in (True, False):
        p = nn.Parameter(torch.ones(3, 3))
        opt = Kron([p], preconditioner_update_probability=1.0, b1=0.9, mars_gamma=0.0025)
        p.grad = grads[0].clone()
        opt.step()
        opt.param_groups[0]["mars"] = switched
        p.grad = (grads[1] if switched else corrected).clone()
        opt.step()
        if switched:
            assert torch.equal(opt.state[p]["previous_grad"], grads[1])
        params.append(p.detach().clone())
    torch.testing.assert_close(params[0], params[1], rtol=1e-6, atol=0)


def _drift_after_zero_gradients(make_optimizer, zero_steps: int = 200) -> float:
    """How far a 16x16 weight moves over ``zero_steps`` steps of all-zero gradients after 20
    steps of a least-squares fit."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(16, 16))
    x, y = torch.randn(64, 16), torch.randn(64, 16)
    optimizer = make_optimizer([weight])
    for _ in range(20):
        optimizer.zero_grad()
        ((x @ weight - y) ** 2).mean().backward()
        optimizer.step()
    trained = weight.detach().clone()
    for _ in range(zero_steps):
        weight.grad = torch.zeros_like(weight)
        optimizer.step()
    return (weight.detach() - trained).norm().item()


def test_a_parameter_with_zero_gradients_coasts_to_a_stop_as_under_adam():
    """Zero gradients (a parameter the loss stopped using, ``zero_grad(set_to_none=False)``)
    leave P as it is, so the update decays with the momentum. P used to grow as fast as the
    momentum shrank: the update stayed at the clip's size for ~150 steps (a drift of 31 here,
    against AdamW's 0.8)."""
    kron = _drift_after_zero_gradients(lambda ps: Kron(ps, lr=1e-2))
    adamw = _drift_after_zero_gradients(lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    one_step = 1e-2 * 1.1 * 16  # a whole update at the RMS clip, in norm
    assert kron < 15 * one_step  # measured 1.5, 8.5 such steps; AdamW's 0.8
    assert adamw < 15 * one_step
