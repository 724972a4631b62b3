"""docs/torch.md matches the code: its options table is the constructor's (every option, every
default), and its examples, with README.md's PyTorch one, run as printed and do what they say."""

from textwrap import dedent

import pytest
from tests.docs_examples import Example, python_examples, run_example

from kron.torch import Kron

# A teacher's labels for 64-wide inputs; the model of the page's first example, built the same
# way (seed 0) before the example builds its own, so its starting loss is known.
DATA = """
import torch

torch.manual_seed(0)
teacher = torch.randn(64, 10)
loader = []
for _ in range(100):
    x = torch.randn(32, 64)
    loader.append((x, (x @ teacher).argmax(dim=1)))
x, y = loader[0]
torch.manual_seed(1)
start = torch.nn.functional.cross_entropy(
    torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))(x), y
).item()
torch.manual_seed(1)
"""

EXAMPLES = {
    0: Example(
        # 100 steps at lr 3e-3 left 0.67 of the starting loss when this was written.
        prelude=DATA,
        epilogue="""
        assert torch.nn.functional.cross_entropy(model(x), y).item() < 0.8 * start
        assert scheduler.last_epoch == len(loader)
        resumed = Kron(model.parameters(), lr=3e-3, weight_decay=1e-2)
        resumed.load_state_dict(torch.load("opt.pt", weights_only=True))
        assert resumed.param_groups[0]["step"] == len(loader)
        """,
    ),
    1: Example(
        # 30 Newton steps on one batch left 0.09 of its loss when this was written.
        prelude=DATA
        + dedent("""
        from kron.torch import Kron

        model = torch.nn.Sequential(
            torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10)
        )
        loss_fn = torch.nn.functional.cross_entropy
        """),
        epilogue="""
        for _ in range(29):
            opt.step(lambda: loss_fn(model(x), y))
        assert loss_fn(model(x), y).item() < 0.3 * start
        """,
    ),
    2: Example(
        # kron_torch's checkpoint after three steps, each fitting P.
        prelude="""
        import kron_torch
        import torch

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 3))
        peer = kron_torch.Kron(model.parameters(), preconditioner_update_probability=1.0)
        for _ in range(3):
            model(torch.randn(5, 8)).square().sum().backward()
            peer.step()
            peer.zero_grad()
        torch.save(peer.state_dict(), "kron_torch_optimizer.pt")
        """,
        epilogue="""
        assert optimizer.param_groups[0]["step"] == 3
        for p in model.parameters():
            saved = peer.state[p]["momentum_buffer"] / (1 - peer.param_groups[0]["b1"] ** 3)
            torch.testing.assert_close(optimizer.state[p]["momentum"], saved)
        """,
    ),
}

README = Example(
    prelude=DATA
    + dedent("""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    before = [p.detach().clone() for p in model.parameters()]
    """),
    epilogue="""
    assert isinstance(opt, torch.optim.Optimizer)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    """,
)


def test_options_table_matches_the_signature(check_options_table):
    check_options_table("torch.md", Kron)


def test_every_block_has_an_example():
    assert len(python_examples("torch.md")) == len(EXAMPLES)
    assert "kron.torch" in python_examples("README.md")[1]


@pytest.mark.parametrize("index", sorted(EXAMPLES))
def test_docs_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples save to the working directory
    run_example("torch.md", index, EXAMPLES[index])


def test_readme_example_runs():
    run_example("README.md", 1, README)
