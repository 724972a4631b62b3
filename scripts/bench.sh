#!/usr/bin/env bash
# The main job: installs kron with its bench and PyTorch extras into .venv, then runs the
# benchmark suite. Arguments go to `kron bench` (e.g. --quick, --standard, --task xor32).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup-venv.sh" "bench,torch"
cd "$root"
"$root/.venv/bin/kron" bench "$@"
