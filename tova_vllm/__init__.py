"""tova-vllm: TOVA (Token Omission Via Attention) KV-cache eviction for vLLM.

``LLM(model, kv_policy="tova", kv_budget=512)`` caps every sequence's KV cache
at 512 tokens per layer. ``from tova_vllm import LLM`` is vLLM's LLM with the
plugin loaded (the same signature).
"""

from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LLM":
        from tova_vllm.plugin import register

        register()
        from vllm import LLM

        return LLM
    raise AttributeError(f"module 'tova_vllm' has no attribute {name!r}")
