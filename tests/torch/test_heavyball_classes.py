"""heavyball 1.5's ForeachPSGDKron family: the seed's signatures and defaults, and each class as
the Kron configuration it stands for."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from kron.core import heavyball_schedule
from kron.torch import (
    ForeachCachedDelayedPSGDKron,
    ForeachCachedPSGDKron,
    ForeachDelayedPSGD,
    ForeachPSGDKron,
    ForeachPurePSGD,
    Kron,
)
from kron.torch.functional import state_bytes
from kron.torch.heavyball_classes import USE_DEFAULT
from kron.torch.options import torch_dtype

# heavyball 1.5.0's ForeachPSGDKron.__init__, in order (shared/seeds/004, "ForeachPSGDKron").
SEED_SIGNATURE = [
    ("lr", 0.001),
    ("beta", 0.9),
    ("weight_decay", 0.0),
    ("preconditioner_update_probability", None),
    ("max_size_triangular", 2048),
    ("min_ndim_triangular", 2),
    ("memory_save_mode", None),
    ("momentum_into_precond_update", True),
    ("warmup_steps", 1),
    ("merge_dims", False),
    ("split", False),
    ("store_triu_as_line", True),
    ("foreach", True),
    ("q_dtype", "float32"),
    ("stochastic_schedule", True),
    ("storage_dtype", "float32"),
    ("mars", False),
    ("caution", False),
    ("mars_gamma", 0.0025),
    ("delayed", USE_DEFAULT),
    ("cached", USE_DEFAULT),
    ("exp_avg_input", USE_DEFAULT),
    ("gradient_clipping", USE_DEFAULT),
    ("update_clipping", USE_DEFAULT),
    ("precond_init_scale", 1.0),
    ("precond_lr", 0.1),
]
# (class, delayed, cached, exp_avg_input) as the seed's class attributes set them.
VARIANTS = [
    (ForeachPSGDKron, False, False, True),
    (ForeachPurePSGD, False, False, False),
    (ForeachCachedDelayedPSGDKron, True, True, True),
    (ForeachCachedPSGDKron, False, True, True),
    (ForeachDelayedPSGD, True, False, True),
]
TEACHER = torch.randn(8, 3, generator=torch.Generator().manual_seed(42))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def train(make_opt, steps: int = 8, zero_grad: bool = True):
    model = make_model()
    opt = make_opt(model.parameters())
    losses = []
    for step in range(steps):
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(step))
        if zero_grad:
            opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), (x @ TEACHER).argmax(1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return [p.detach() for p in model.parameters()], losses, opt


def assert_same_run(a, b):
    for x, y in zip(a[0], b[0]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def heavyball_as_kron(ps, **changes):
    """Kron set to what ForeachPSGDKron's defaults mean."""
    options = dict(
        lr=0.001,
        b1=0.9,
        preconditioner_update_probability=heavyball_schedule(),
        max_size_triangular=2048,
        momentum_into_precond_update=True,
        warmup_steps=1,
        precond_dtype="float32",
        mu_dtype="float32",
        stochastic_schedule=True,
        cached=False,
        delayed=False,
        update_clipping="soft",
        update_clip_value=1.5,
        preconditioner_mode="EQ",
        precond_init_scale=1.0,
    )
    return Kron(ps, **{**options, **changes})


@pytest.mark.parametrize("cls", [variant[0] for variant in VARIANTS])
def test_each_class_has_the_seeds_signature(cls):
    parameters = list(inspect.signature(cls.__init__).parameters.values())[2:]
    named = [(p.name, p.default) for p in parameters if p.kind is not p.VAR_KEYWORD]
    assert named == SEED_SIGNATURE


@pytest.mark.parametrize(("cls", "delayed", "cached", "exp_avg_input"), VARIANTS)
def test_each_variant_sets_its_class_defaults(cls, delayed, cached, exp_avg_input):
    opt = cls(make_model().parameters())
    group = opt.param_groups[0]
    assert (group["delayed"], group["cached"], group["exp_avg_input"]) == (
        delayed,
        cached,
        exp_avg_input,
    )
    overridden = cls(make_model().parameters(), delayed=not delayed, cached=not cached)
    assert overridden.param_groups[0]["delayed"] is (not delayed)
    assert overridden.param_groups[0]["cached"] is (not cached)
    # None means the class's value too, as heavyball's C.default reads it.
    unset = cls(make_model().parameters(), delayed=None, cached=None, exp_avg_input=None)
    group = unset.param_groups[0]
    assert (group["delayed"], group["cached"], group["exp_avg_input"]) == (
        delayed,
        cached,
        exp_avg_input,
    )


def test_heavyballs_short_names_are_the_same_classes():
    import kron.torch

    for short, long in [
        ("PSGDKron", "ForeachPSGDKron"),
        ("PurePSGD", "ForeachPurePSGD"),
        ("DelayedPSGD", "ForeachDelayedPSGD"),
        ("CachedPSGDKron", "ForeachCachedPSGDKron"),
        ("CachedDelayedPSGDKron", "ForeachCachedDelayedPSGDKron"),
    ]:
        assert getattr(kron.torch, short) is getattr(kron.torch, long)
        assert short in kron.torch.__all__


def test_defaults_follow_the_kron_configuration_they_stand_for():
    ours = train(ForeachPSGDKron)
    assert_same_run(ours, train(heavyball_as_kron))
    assert ours[1][-1] < ours[1][0]


def test_update_clipping_none_turns_the_trust_region_clip_off():
    off = train(lambda ps: ForeachPSGDKron(ps, lr=0.05, update_clipping=None))
    assert_same_run(off, train(lambda ps: heavyball_as_kron(ps, lr=0.05, update_clipping=None)))
    clipped = train(lambda ps: ForeachPSGDKron(ps, lr=0.05))
    assert any(not torch.equal(a, b) for a, b in zip(off[0], clipped[0]))


def test_the_deterministic_schedule_is_heavyballs_accumulator():
    opt = ForeachPSGDKron(make_model().parameters(), stochastic_schedule=False)
    assert opt.param_groups[0]["decision_rule"] == "accumulator"
    assert not opt.param_groups[0]["stochastic_schedule"]


def test_pure_psgd_fits_and_preconditions_the_raw_gradient():
    pure = train(ForeachPurePSGD)
    as_kron = train(
        lambda ps: heavyball_as_kron(ps, exp_avg_input=False, momentum_into_precond_update=False)
    )
    assert_same_run(pure, as_kron)


def _group_dtype(name):
    return lambda opt: torch_dtype(opt.param_groups[0][name], name)


def test_kron_options_pass_through_and_bad_values_are_named():
    opt = ForeachPSGDKron(make_model().parameters(), seed=7, preconditioner_mode="QUAD")
    assert opt.seed == 7 and opt.param_groups[0]["preconditioner_mode"] == "QUAD"
    with pytest.raises(ValueError, match="store_triu_as_line must be True or False; got 'yes'"):
        ForeachPSGDKron(make_model().parameters(), store_triu_as_line="yes")
    with pytest.raises(ValueError, match="memory_save_mode"):
        ForeachPSGDKron(make_model().parameters(), memory_save_mode="sometimes")
    with pytest.raises(TypeError, match="no_such_option"):
        ForeachPSGDKron(make_model().parameters(), no_such_option=1)


@pytest.mark.parametrize(
    "ours, theirs, read",
    [
        ({"b1": 0.8}, {"beta": 0.7}, lambda opt: opt.param_groups[0]["b1"]),
        ({"stack_params": False}, None, lambda opt: opt.stack_params),
        ({"precond_dtype": "float64"}, {"q_dtype": "bfloat16"}, _group_dtype("precond_dtype")),
        ({"mu_dtype": torch.bfloat16}, {"storage_dtype": "float16"}, _group_dtype("mu_dtype")),
    ],
)
def test_our_spelling_of_a_heavyball_option_alone_sets_it_and_both_must_agree(ours, theirs, read):
    """Kron's spelling given alone wins over the class's default for heavyball's; given with
    heavyball's spelling at another value, ``ValueError`` names both."""
    ((name, value),) = ours.items()
    opt = ForeachPSGDKron(make_model().parameters(), **ours)
    assert read(opt) == (getattr(torch, value) if isinstance(value, str) else value)
    if theirs is None:  # foreach's only other value, False, agrees
        return
    ((alias, _),) = theirs.items()
    with pytest.raises(ValueError, match=f"{alias} and {name} name the same option"):
        ForeachPSGDKron(make_model().parameters(), **ours, **theirs)


def test_step_releases_the_gradients_so_zero_grad_is_optional():
    """heavyball's step() consumes the gradients (seed 004: "optimizer.step() already does
    this"), so its users may leave ``zero_grad()`` out; with Kron they would accumulate."""
    without = train(ForeachPSGDKron, zero_grad=False)
    assert_same_run(train(ForeachPSGDKron), without)
    assert all(p.grad is None for p in without[2].param_groups[0]["params"])
    accumulated = train(heavyball_as_kron, zero_grad=False)
    assert not torch.equal(accumulated[0][0], without[0][0])


def test_consume_grad_false_keeps_the_gradients():
    model = make_model()
    opt = ForeachPSGDKron(model.parameters())
    opt.consume_grad = False  # heavyball's instance attribute
    nn.functional.cross_entropy(model(torch.ones(2, 8)), torch.tensor([0, 1])).backward()
    opt.step()
    assert all(p.grad is not None for p in model.parameters())


def digits_losses(make_opt, seed: int, steps: int = 300) -> float:
    """Full-batch cross-entropy on scikit-learn's digits after ``steps`` minibatch steps."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))
    opt = make_opt(model.parameters())
    batches = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(x), (64,), generator=batches)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[index]), y[index]).backward()
        opt.step()
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x), y).item()


@pytest.mark.parametrize("seed", [0, 1])
def test_foreach_psgd_kron_trains_as_heavyball_does(seed, monkeypatch):
    """Against heavyball's own PSGDKron (3.2.1, installed with the test extras) set to the 1.5
    defaults: the losses differ only by the noise draws. Measured over seeds 0–4: 0.08–0.86 %
    apart after 300 steps, while a 1.5× learning rate moves ours by 57–58 %."""
    import heavyball
    import heavyball.utils

    monkeypatch.setattr(heavyball.utils, "compile_mode", None)  # eager, as ours runs on the CPU
    theirs = digits_losses(
        lambda ps: heavyball.PSGDKron(ps, lr=1e-3, warmup_steps=1, precond_init_scale=1.0), seed
    )
    ours = digits_losses(ForeachPSGDKron, seed)
    assert abs(ours - theirs) < 0.03 * theirs, (ours, theirs)


@pytest.mark.parametrize("probability", [1.0, 0.3])
def test_store_triu_as_line_keeps_triangles_and_changes_no_step(probability):
    """heavyball's default: Q (upper-triangular under EQ) is kept as the line of its upper
    triangle between steps, which is lossless, so the run is the square-state run bit for bit,
    with steps that fit and steps that leave the stored lines as they are."""
    options = dict(preconditioner_update_probability=probability)
    square = train(lambda ps: heavyball_as_kron(ps, store_triu_as_line=False, **options), 12)
    lines = train(lambda ps: heavyball_as_kron(ps, store_triu_as_line=True, **options), 12)
    assert_same_run(square, lines)
    weight = lines[2].param_groups[0]["params"][0]  # (16, 8): dense factors of 16 and 8
    assert [tuple(f.shape) for f in lines[2].state[weight]["factors"]] == [(1, 136), (1, 36)]
    assert state_bytes(lines[2]) < 0.75 * state_bytes(square[2])


@pytest.mark.parametrize("resumed_as_lines", [True, False])
def test_a_checkpoint_of_lines_resumes_either_way(resumed_as_lines, tmp_path):
    """A checkpoint taken with ``store_triu_as_line`` continues exactly, whether the resumed
    optimizer packs its factors or not (a square checkpoint likewise loads into either)."""
    straight = train(lambda ps: heavyball_as_kron(ps, store_triu_as_line=True), steps=8)
    first = train(lambda ps: heavyball_as_kron(ps, store_triu_as_line=True), steps=4)
    torch.save(first[2].state_dict(), tmp_path / "opt.pt")
    model = make_model()
    with torch.no_grad():
        for p, saved in zip(model.parameters(), first[0]):
            p.copy_(saved)
    opt = heavyball_as_kron(model.parameters(), store_triu_as_line=resumed_as_lines)
    opt.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for step in range(4, 8):
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), (x @ TEACHER).argmax(1)).backward()
        opt.step()
    for a, b in zip(model.parameters(), straight[0]):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)


def test_store_triu_as_line_needs_the_triangular_geometry():
    with pytest.raises(ValueError, match=r"needs preconditioner_mode='EQ'.*got 'Q0\.5EQ1\.5'"):
        Kron(make_model().parameters(), store_triu_as_line=True)
    quad = ForeachPSGDKron(make_model().parameters(), preconditioner_mode="QUAD")
    assert quad.param_groups[0]["store_triu_as_line"] is False


def test_pickling_keeps_the_default_schedule_and_consume_grad():
    """The default schedule lives on the class (the groups hold None), so the optimizer pickles;
    a group of its own with None gets heavyball's schedule too."""
    import copy
    import pickle

    model = make_model()
    opt = ForeachPSGDKron(model.parameters())
    opt.consume_grad = False
    opt.add_param_group({"params": [nn.Parameter(torch.ones(3))]})
    for copied in (pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)):
        assert copied.consume_grad is False
        for gi, group in enumerate(copied.param_groups):
            group["step"] = 2000  # 2000 steps taken: heavyball's count is 2001
            assert copied._decide(gi, group).probability == pytest.approx(
                heavyball_schedule()(2001)
            )


def test_a_copy_keeps_the_fitting_target_its_new_groups_read():
    """The constructor's momentum_into_precond_update was lost by a copy, and adding a group
    with exp_avg_input then raised AttributeError."""
    import copy
    import pickle

    opt = ForeachPSGDKron(make_model().parameters(), momentum_into_precond_update=False)
    group = {"params": [nn.Parameter(torch.ones(3, 3))], "exp_avg_input": True}
    for copied in (pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)):
        copied.add_param_group(dict(group))
        assert copied.param_groups[-1]["momentum_into_precond_update"] is False


def test_heavyballs_group_names_set_between_steps_take_effect():
    """Groups keep our names; heavyball's ``beta`` set on a group later was ignored without a
    word, and ``foreach`` (our stack_params, one value for the optimizer) was accepted."""

    def run(key):
        def make(params):
            opt = ForeachPSGDKron(params, preconditioner_update_probability=1.0)
            opt.param_groups[0][key] = 0.5
            return opt

        return train(make, steps=4)[1]

    assert run("beta") == run("b1") != train(ForeachPSGDKron, steps=4)[1]
    with pytest.raises(ValueError, match="foreach cannot be set per param group"):
        ForeachPSGDKron([{"params": make_model().parameters(), "foreach": False}])


def test_a_groups_own_values_follow_the_class_rules():
    """In a param group, as in the constructor: None takes the class's ``delayed``, ``cached``
    and ``exp_avg_input``, and a geometry other than EQ keeps its factors square."""
    a, b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4, 4))
    opt = ForeachCachedDelayedPSGDKron(
        [
            {"params": [a], "preconditioner_mode": "QEQ"},
            {"params": [b], "delayed": None, "cached": None, "exp_avg_input": None},
        ]
    )
    first, second = opt.param_groups
    assert first["preconditioner_mode"] == "QEQ" and first["store_triu_as_line"] is False
    assert (second["delayed"], second["cached"], second["exp_avg_input"]) == (True, True, True)
    a.grad, b.grad = torch.randn(4, 4), torch.randn(4, 4)
    opt.step()
    assert opt.state[a]["factors"][0].shape == (1, 4, 4)  # square, not a line of 10


def _trained(make, steps=6):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, 4))
    opt = make([w])
    for step in range(steps):
        w.grad = torch.sin(torch.arange(20.0).reshape(5, 4) + step)
        opt.step()
    return w.detach(), opt


@pytest.mark.parametrize(
    "option",
    [dict(exp_avg_input=False), dict(stochastic_schedule=False)],
    ids=["exp_avg_input", "stochastic_schedule"],
)
def test_a_group_option_brings_the_rule_the_constructor_applies(option):
    """exp_avg_input=False fits P on the raw gradient, stochastic_schedule=False takes the
    accumulator rule: given in a group, each steps as when given to the constructor."""
    probability = dict(preconditioner_update_probability=0.4)
    by_constructor, _ = _trained(lambda ps: ForeachPSGDKron(ps, **probability, **option))
    by_group, opt = _trained(lambda ps: ForeachPSGDKron([{"params": ps, **option}], **probability))
    torch.testing.assert_close(by_group, by_constructor, rtol=0, atol=0)
    group = opt.param_groups[0]
    if "exp_avg_input" in option:
        assert group["momentum_into_precond_update"] is False
    else:
        assert group["decision_rule"] == "accumulator"


def _factor_shapes(opt, p):
    p.grad = torch.ones_like(p)
    opt.step()
    return [tuple(f.shape) for f in opt.state[p]["factors"]]


def test_split_cuts_axes_only_with_merge_dims_as_in_heavyball():
    """heavyball splits inside its dimension merger, which ``utils.merge_group`` skips without
    ``merge_dims``: there an axis past max_size_triangular stays whole and diagonal. With
    merge_dims on, in the constructor or in a group, split cuts it into blocks."""
    p = nn.Parameter(torch.ones(10, 3))
    opt = ForeachPSGDKron([p], max_size_triangular=4, split=True)
    assert opt.param_groups[0]["split"] is False
    assert _factor_shapes(opt, p) == [(1, 10), (1, 6)]  # diagonal 10, triangle of 3 as a line
    p = nn.Parameter(torch.ones(10, 3))
    opt = ForeachPSGDKron([p], max_size_triangular=4, split=True, merge_dims=True)
    assert _factor_shapes(opt, p) == [(3, 10), (3, 6)]  # three blocks of (4, 3)
    # A group's own merge_dims brings the constructor's split into play, and a group's own
    # split without merging stays off.
    a, b = nn.Parameter(torch.ones(10, 3)), nn.Parameter(torch.ones(10, 3))
    opt = ForeachPSGDKron(
        [{"params": [a], "merge_dims": True}, {"params": [b], "merge_dims": False}],
        max_size_triangular=4,
        split=True,
    )
    assert [g["split"] for g in opt.param_groups] == [True, False]
    assert _factor_shapes(opt, a) == [(3, 10), (3, 6)]
    opt.add_param_group({"params": [c := nn.Parameter(torch.ones(10, 3))], "split": True})
    assert opt.param_groups[-1]["split"] is False
    assert _factor_shapes(opt, c) == [(1, 10), (1, 6)]
    # Kron's own split keeps its meaning: it cuts without merging.
    p = nn.Parameter(torch.ones(10, 3))
    assert _factor_shapes(Kron([p], max_size_triangular=4, split=True), p) == [
        (3, 4, 4),
        (3, 3, 3),
    ]


def _recorder(into):
    def schedule(n):
        into.append(int(n))
        return 1.0

    return schedule


def test_the_schedule_gets_heavyballs_step_count_from_one():
    """heavyball's ``psgd_should_update`` counts the step before calling the schedule (1 on the
    first step); kron_torch's ``Kron`` calls it with 0 on the first step, and ours keeps that."""
    ours, kron = [], []
    _trained(lambda ps: ForeachPSGDKron(ps, preconditioner_update_probability=_recorder(ours)), 3)
    _trained(lambda ps: Kron(ps, preconditioner_update_probability=_recorder(kron)), 3)
    assert ours == [1, 2, 3] and kron == [0, 1, 2]
    # The built-in schedule too: after 1000 steps heavyball's count is 1001, p = 0.999.
    opt = ForeachPSGDKron(make_model().parameters())
    opt.param_groups[0]["step"] = 1000
    assert opt._decide(0, opt.param_groups[0]).probability == pytest.approx(0.999)


def test_heavyballs_clipping_names_are_its_functions(monkeypatch):
    """``"l2_clip_"``, ``"rmsnorm_clip_"`` and ``"trust_region_clip_"`` (heavyball.utils's
    functions, which heavyball resolves by name) clip as those functions do at their default
    thresholds, the trust region's clamp at ±2 included."""
    import heavyball.utils

    from kron.torch.functional import clipper

    monkeypatch.setattr(heavyball.utils, "compile_mode", None)  # eager
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    x[0] *= 0.05  # below the L2 and RMS thresholds: left alone
    x[2] *= 100.0  # far past the trust region: clamped at ±2
    for name in ("l2_clip_", "rmsnorm_clip_", "trust_region_clip_"):
        theirs = torch.stack([getattr(heavyball.utils, name)(row.clone())[0] for row in x])
        ours = clipper(name, 123.0)(x)  # the value given is not heavyball's: ignored
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert clipper("trust_region_clip_", 1.0)(x).abs().max() == 2.0


def test_the_update_clipping_named_as_in_heavyball_is_the_default():
    named = train(lambda ps: ForeachPSGDKron(ps, lr=0.05, update_clipping="trust_region_clip_"))
    assert_same_run(named, train(lambda ps: ForeachPSGDKron(ps, lr=0.05)))


def test_mars_is_heavyballs_correction(monkeypatch):
    """heavyball's ``mars_correction`` (its option, its math): no unit-norm cap."""
    import heavyball.utils

    from kron.core import mars_correction
    from kron.torch.functional import OPS

    monkeypatch.setattr(heavyball.utils, "compile_mode", None)  # eager
    gen = torch.Generator().manual_seed(0)
    grad, previous = 10.0 * torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    ours = mars_correction(grad[None], previous[None], 0.9, 0.0025, OPS)[0]
    theirs = grad.clone()
    heavyball.utils.mars_correction([theirs], [previous.clone()], 0.9, 0.0025)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert ours.norm() > 10.0


def test_merge_dims_is_heavyballs_dim_merger():
    """heavyball's merge_dims=True keeps axis 0 and folds the trailing axes from the last while
    the product stays within max_size_triangular: an (8, 4, 3, 3) kernel is (8, 36), where
    Kron's merge_dims=True takes the squarest view, (32, 9). In a group too."""
    kernel = nn.Parameter(torch.ones(8, 4, 3, 3))
    opt = ForeachPSGDKron([kernel], merge_dims=True, store_triu_as_line=False)
    assert opt.param_groups[0]["merge_dims"] == "heavyball"
    assert _factor_shapes(opt, kernel) == [(1, 8, 8), (1, 36, 36)]
    kernel = nn.Parameter(torch.ones(8, 4, 3, 3))
    assert _factor_shapes(Kron([kernel], merge_dims=True), kernel) == [(1, 32, 32), (1, 9, 9)]
    # With split, the merge's limit is still max_size_triangular (heavyball splits after it).
    a, b = nn.Parameter(torch.ones(4, 5, 6, 7)), nn.Parameter(torch.ones(4, 5, 6, 7))
    opt = ForeachPSGDKron(
        [{"params": [a], "merge_dims": True}, {"params": [b]}],
        max_size_triangular=40,
        split=True,
        store_triu_as_line=False,
    )
    assert _factor_shapes(opt, a) == [(1, 4, 4), (1, 7, 7), (1, 30, 30)]  # 1.5's reshape
    assert _factor_shapes(opt, b) == [(1, 4, 4), (1, 5, 5), (1, 6, 6), (1, 7, 7)]
