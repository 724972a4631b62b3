"""Fixtures of the core suite on top of ``tests/conftest.py``: single-backend variants for the
long convergence loops (the two backends agree to 1e-12, see test_backends.py)."""

from __future__ import annotations

import pytest
from tests.conftest import Backend


@pytest.fixture
def numpy_backend() -> Backend:
    return Backend("numpy")


@pytest.fixture
def torch_backend() -> Backend:
    return Backend("torch")


@pytest.fixture(autouse=True)
def _single_torch_thread():
    """The core tests use tiny matrices, where torch's intra-op threads cost more than they save
    (measured 2-4x slower on 2 cores); restore the setting after each test."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
