"""The NumPy examples of docs/numpy.md and README.md run as printed and do what they say."""

import pytest
from tests.docs_examples import Example, python_examples, run_example

# README.md's first block; the second is PyTorch's (tests/torch/test_docs.py).
README = Example(
    prelude="""
    import numpy as np

    rng = np.random.default_rng(0)
    teacher_w, teacher_b = rng.standard_normal((32, 16)), rng.standard_normal(16)
    batches = [rng.standard_normal((64, 32)) for _ in range(300)]

    def residual(params, x):
        return x @ (params["w"] - teacher_w) + params["b"] - teacher_b

    def loss(params, x):
        return 0.5 * np.mean(np.sum(residual(params, x) ** 2, axis=1))

    def compute_grads(params, x):
        r = residual(params, x)
        return {"w": x.T @ r / len(x), "b": r.mean(axis=0)}
    """,
    # 300 steps at lr 3e-3 leave 0.28 of the starting loss (measured when this was written).
    epilogue="""
    zeros = {"w": np.zeros((32, 16)), "b": np.zeros(16)}
    assert loss(params, batches[0]) < 0.5 * loss(zeros, batches[0])
    resumed = KronPsgd(lr=3e-3)
    resumed.load_state_dict(checkpoint)
    assert resumed.iteration == opt.iteration == len(batches)
    """,
)

EXAMPLES = {
    # Self-contained: it checks its own resume. The fit must also have brought the loss down
    # (to 2e-8 of the start when this was written).
    "numpy.md": {
        0: Example(
            epilogue="""
            start = loss_and_grads({"W": np.zeros((16, 4)), "b": np.zeros(4)})[0]
            assert loss_and_grads(params)[0] < 1e-6 * start
            """
        )
    },
}


def test_every_block_has_an_example():
    assert len(python_examples("numpy.md")) == len(EXAMPLES["numpy.md"])
    assert "kron.numpy" in python_examples("README.md")[0]


@pytest.mark.parametrize(
    "page, index", [(page, i) for page, examples in EXAMPLES.items() for i in examples]
)
def test_docs_example_runs(page, index):
    run_example(page, index, EXAMPLES[page][index])


def test_readme_example_runs():
    run_example("README.md", 0, README)
