#!/usr/bin/env bash
# Create (or reuse) .venv and install kron with the extras given as arguments, through the pins in
# constraints.txt. Sourced by the other scripts; safe to run repeatedly.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-test}"
python="${PYTHON:-python3}"
[ -x "$root/.venv/bin/python" ] || "$python" -m venv "$root/.venv"
"$root/.venv/bin/python" -m pip install --quiet --upgrade pip
"$root/.venv/bin/python" -m pip install --quiet -c "$root/constraints.txt" -e "$root[$extras]"
