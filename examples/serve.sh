#!/usr/bin/env bash
# An OpenAI-compatible server with TOVA on the embedded model (or MODEL=path):
#
#   bash examples/serve.sh                      # port 8000, tova, budget 64
#   PORT=8001 POLICY=sink BUDGET=128 bash examples/serve.sh --max-num-seqs 64
#
# EAGER=1 (the default) skips torch.compile: the server is up in about a
# minute on a CPU; EAGER=0 compiles (faster steps, minutes of warm-up).
#
# Extra arguments go to `vllm serve`. Requests may ask for their own policy and
# a budget up to BUDGET with vllm_xargs (see examples/client.py); /metrics
# exports tova_vllm:* counters per policy.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TOVA_VENV:-$root/.venv}"
model="${MODEL:-$("$venv/bin/python" -c "from tova_vllm.models import default_model; print(default_model())")}"
# On the CPU, give the KV cache an explicit size (GiB): by default vLLM
# reserves most of the machine's memory.
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
eager=()
[ "${EAGER:-1}" = 1 ] && eager=(--enforce-eager)
exec "$venv/bin/vllm" serve "$model" \
  --kv-policy "${POLICY:-tova}" --kv-budget "${BUDGET:-64}" \
  --dtype float32 --max-model-len 2048 "${eager[@]}" \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" "$@"
