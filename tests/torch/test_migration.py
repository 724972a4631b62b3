"""Continuing kron_torch's run: after :func:`load_kron_torch_state`, ``Kron`` takes kron_torch's
own next steps (steps without a fit, whose update depends on P and the momentum alone), in
kron_torch's geometry and in the ones that keep Q symmetric or keep P; a layout that does not
match is refused by name."""

from __future__ import annotations

import kron_torch  # scripts/test.sh installs it (without triton, which only its GPU path uses)
import pytest
import torch

from kron.torch import KRON_TORCH_OPTIONS, Kron, load_kron_torch_state

# dense, vector, merged to (6, 4), a conv kernel merged to (45, 3), a size-1 axis (kron_torch's
# compiled step fails on 0-d tensors)
SHAPES = [(4, 6), (4,), (2, 3, 4), (5, 3, 3, 3), (1, 7)]
NO_FIT = 1e-9  # both libraries' counter rules: no fit for the rest of the test


def _params(shapes=SHAPES):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in shapes]


def _grads(step: int, shapes=SHAPES):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(shape, generator=gen) for shape in shapes]


def _step(optimizer, params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone()
    optimizer.step()


def _started_run(shapes=SHAPES):
    """kron_torch after 6 steps, all fitting P; then told not to fit again."""
    torch.manual_seed(0)  # kron_torch draws its noise from the global generator
    params = _params(shapes)
    peer = kron_torch.Kron(params, lr=1e-2, preconditioner_update_probability=1.0)
    for step in range(6):
        _step(peer, params, _grads(step, shapes))
    for group in peer.param_groups:
        group["preconditioner_update_probability"] = NO_FIT
    return peer, params


@pytest.mark.parametrize("geometry", ["EQ", "Q0.5EQ1.5", "PRO4P"])
def test_continues_kron_torchs_steps(geometry, capsys):
    peer, peer_params = _started_run()
    ours_params = [torch.nn.Parameter(p.detach().clone()) for p in peer_params]
    options = {**KRON_TORCH_OPTIONS, "lr": 1e-2, "preconditioner_mode": geometry}
    ours = Kron(ours_params, **options, preconditioner_update_probability=NO_FIT)
    load_kron_torch_state(ours, peer.state_dict())
    assert ours.param_groups[0]["step"] == 6
    for step in range(6, 12):
        _step(peer, peer_params, _grads(step))
        _step(ours, ours_params, _grads(step))
    for a, b in zip(peer_params, ours_params):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    capsys.readouterr()  # kron_torch prints its state size on the first step


def test_factors_keep_kron_torchs_preconditioner():
    peer, params = _started_run()
    ours = Kron(
        [torch.nn.Parameter(p.detach().clone()) for p in params],
        merge_dims="first_last",
        precond_dtype=torch.float32,  # kron_torch's, so that P compares to float32 rounding
    )
    load_kron_torch_state(ours, peer.state_dict())
    peer_q = peer.state_dict()["state"][0]["Q"]  # the (4, 6) weight: two dense factors
    ours_q = ours.state_dict()["state"][0]["factors"]
    for q, mine in zip(peer_q, ours_q):
        mine = mine[0]
        torch.testing.assert_close(mine, mine.T)  # Q0.5EQ1.5 keeps Q symmetric
        torch.testing.assert_close(mine.T @ mine, q.T @ q, rtol=1e-5, atol=1e-6)
    # (1, 7): kron_torch's 1×1 factor is folded into the 7×7 one, which keeps its P.
    q_one, q_seven = peer.state_dict()["state"][4]["Q"]
    (mine,) = ours.state_dict()["state"][4]["factors"]
    expected = q_one.square() * (q_seven.T @ q_seven)
    torch.testing.assert_close(mine[0].T @ mine[0], expected, rtol=1e-5, atol=1e-6)


def test_a_layout_that_does_not_match_is_refused(capsys):
    peer, params = _started_run()
    ours = Kron([torch.nn.Parameter(p.detach().clone()) for p in params])  # merge_dims=False
    with pytest.raises(ValueError, match=r"parameter 2 \(shape \(2, 3, 4\)\).*merge_dims"):
        load_kron_torch_state(ours, peer.state_dict())
    with pytest.raises(ValueError, match="groups of"):
        load_kron_torch_state(Kron(params[:2]), peer.state_dict())
    # A convolution kernel: merge_dims=True takes its squarest view, (15, 9), not kron_torch's.
    peer, params = _started_run([(5, 3, 3, 3)])
    squarest = {**KRON_TORCH_OPTIONS, "merge_dims": True}
    ours = Kron([torch.nn.Parameter(params[0].detach().clone())], **squarest)
    with pytest.raises(ValueError, match=r"45×45, 3×3\].*\[15×15, 9×9\]"):
        load_kron_torch_state(ours, peer.state_dict())
    capsys.readouterr()


def test_fits_fall_on_kron_torchs_steps_after_the_load(capsys):
    """kron_torch's fit counter is not in its state dict; it was reset to 0, so at p = 0.3 the
    fits fell three steps off kron_torch's own continuation. It is replayed from the step count."""
    torch.manual_seed(0)
    peer_params = _params([(4, 6)])
    peer = kron_torch.Kron(peer_params, lr=1e-2, preconditioner_update_probability=0.3)
    for step in range(5):
        _step(peer, peer_params, _grads(step, [(4, 6)]))
    ours_params = [torch.nn.Parameter(p.detach().clone()) for p in peer_params]
    ours = Kron(ours_params, **KRON_TORCH_OPTIONS, preconditioner_update_probability=0.3)
    load_kron_torch_state(ours, peer.state_dict())

    def fitted(optimizer, params, key, step) -> bool:
        before = optimizer.state[params[0]][key][0].clone()
        _step(optimizer, params, _grads(step, [(4, 6)]))
        return not torch.equal(before, optimizer.state[params[0]][key][0])

    peer_fits = [fitted(peer, peer_params, "Q", step) for step in range(5, 12)]
    ours_fits = [fitted(ours, ours_params, "factors", step) for step in range(5, 12)]
    assert ours_fits == peer_fits and sum(peer_fits) == 2
    capsys.readouterr()


def test_the_momentum_is_debiased_with_kron_torchs_b1(capsys):
    """kron_torch's buffer is an EMA under its own b1; dividing it by 1 − b1^t with the new
    optimizer's b1 made it 9× too large for b1 0.9 against 0.99."""
    torch.manual_seed(0)
    params = _params([(4, 6)])
    peer = kron_torch.Kron(params, lr=1e-2, b1=0.9)
    for step in range(3):
        _step(peer, params, _grads(step, [(4, 6)]))
    ours = Kron(
        [torch.nn.Parameter(params[0].detach().clone())], **{**KRON_TORCH_OPTIONS, "b1": 0.99}
    )
    load_kron_torch_state(ours, peer.state_dict())
    buffer = peer.state[params[0]]["momentum_buffer"].reshape(4, 6)
    (state,) = ours.state.values()
    torch.testing.assert_close(state["momentum"], buffer / (1 - 0.9**3))
    capsys.readouterr()


def test_weight_decay_on_vectors_is_warned_of(capsys):
    """kron_torch decays only parameters of two or more dimensions."""
    peer, params = _started_run([(4, 6), (4,)])
    ours = Kron(
        [torch.nn.Parameter(p.detach().clone()) for p in params],
        **KRON_TORCH_OPTIONS,
        weight_decay=0.1,
    )
    with pytest.warns(UserWarning, match=r"indices \[1\]\), which kron_torch did not decay"):
        load_kron_torch_state(ours, peer.state_dict())
    capsys.readouterr()
