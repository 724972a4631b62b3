"""docs/core.md's example runs as printed: a plan with padded blocks, the automatic initial
scale, five steps with fits and balancing, and the clip bound, each asserted by the example."""

from tests.docs_examples import Example, python_examples, run_example


def test_every_block_has_an_example():
    assert len(python_examples("core.md")) == 1


def test_docs_example_runs():
    namespace = run_example("core.md", 0, Example())
    assert namespace["state"].momentum.shape == (1, 6, 3)  # the steps reached the state
