"""The accelerator suite: what only a GPU can show (compiled kernels, device-side bookkeeping, no
host synchronisation). CI has no GPU, so these files are collected only where the device named
by ``KRON_TEST_DEVICE`` (default ``cuda``) exists; ``KRON_TEST_DEVICE=cpu`` runs them here as a
dry run of the test code itself. Results of the last GPU run: benchmarks/RESULTS.md,
*PyTorch on an NVIDIA H100*."""

from __future__ import annotations

import os


def _torch_device_exists(name: str) -> bool:
    try:
        import torch
    except ImportError:
        return False
    return name == "cpu" or (name == "cuda" and torch.cuda.is_available())


def _jax_device_exists(name: str) -> bool:
    try:
        import jax
    except ImportError:
        return False
    try:
        return bool(jax.devices("gpu" if name == "cuda" else name))
    except RuntimeError:
        return False


DEVICE = os.environ.get("KRON_TEST_DEVICE", "cuda")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda_only: reads CUDA itself (allocator, sync checks)")


def pytest_collection_modifyitems(config, items):
    """A dry run on another device leaves out what only CUDA can answer."""
    if DEVICE == "cuda":
        return
    keep = [item for item in items if item.get_closest_marker("cuda_only") is None]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep


collect_ignore = []
if not _torch_device_exists(DEVICE):
    collect_ignore.append("test_torch_device.py")
if not _jax_device_exists(DEVICE):
    collect_ignore.append("test_optax_device.py")
