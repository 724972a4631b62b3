#!/usr/bin/env bash
# The test command: installs everything the suite needs into .venv, lints, then runs pytest: the
# main suite (with tests/gpu where CUDA is present), the GPU suite's code on the CPU, then the
# Keras suite once per Keras backend, each run in processes of its own.
# Extra arguments go to every pytest run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup-venv.sh" "test,torch,jax,keras,tf,bench"
cd "$root"
# kron_torch, for tests/torch/test_migration.py, without its triton dependency: a 1 GB wheel that
# only its GPU kernels use (its CPU step compiles without it; opt-einsum comes with jax).
.venv/bin/python -m pip install --quiet -c constraints.txt --no-deps kron-torch
.venv/bin/ruff check src tests
# Much of the suite is single-threaded tracing and compiling, so the main and Keras runs spread it
# over one pytest-xdist worker per core. A worker takes a whole file at a time: the tests of a
# file reuse its compiled functions and its module fixtures, some of which start subprocesses.
# Where a GPU is present, no worker's JAX may claim most of its memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
parallel=(-n auto --dist loadfile)
.venv/bin/python -m pytest "${parallel[@]}" --ignore=tests/keras "$@"
KRON_TEST_DEVICE=cpu .venv/bin/python -m pytest tests/gpu "$@"
for backend in tensorflow jax torch; do
    KERAS_BACKEND="$backend" .venv/bin/python -m pytest "${parallel[@]}" tests/keras "$@"
done
