#!/usr/bin/env bash
# Sets everything up (idempotent) and runs the main job: offline inference with
# TOVA on the embedded model. Extra arguments go to the example
# (see: .venv/bin/python examples/offline_inference.py --help).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
exec "${TOVA_VENV:-$root/.venv}/bin/python" examples/offline_inference.py "$@"
