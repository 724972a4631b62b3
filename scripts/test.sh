#!/usr/bin/env bash
# The test command: installs everything the suite needs into .venv, lints, then runs pytest.
# Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup-venv.sh" "test,torch,jax,bench"
cd "$root"
.venv/bin/ruff check src tests
.venv/bin/python -m pytest "$@"
