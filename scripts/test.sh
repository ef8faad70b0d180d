#!/usr/bin/env bash
# Sets everything up (idempotent) and runs the test suite on the CPU.
# Extra arguments go to pytest, e.g. scripts/test.sh -k parity
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
exec "${TOVA_VENV:-$root/.venv}/bin/python" -m pytest "$@"
