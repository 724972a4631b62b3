#!/usr/bin/env bash
# The main job: installs kron into .venv and runs the demonstration (KronPsgd vs Adam).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup-venv.sh" "test"
"$root/.venv/bin/python" -m kron.demo "$@"
