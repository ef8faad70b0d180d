"""Read the engine's KV block state from the process that owns the LLM."""

from __future__ import annotations

from typing import Any

from tova_vllm.patch.engine_core import METHOD, kv_state


def engine_kv_state(llm: Any) -> dict[str, Any]:
    """Free/total blocks, blocks per running request and blocks each released
    request held at the end, for an ``LLM`` (in-process or multiprocess engine)."""
    client = llm.llm_engine.engine_core
    in_process = getattr(client, "engine_core", None)
    if in_process is not None and hasattr(in_process, "scheduler"):
        return kv_state(in_process)
    return client.call_utility(METHOD)


def blocks_at_release(llm: Any, request_id: str) -> int | None:
    """Blocks the request held when it finished (engine request ids may carry
    a suffix after the user's id)."""
    released = engine_kv_state(llm)["blocks_at_release"]
    if request_id in released:
        return released[request_id]
    for key, value in released.items():
        if key.startswith(f"{request_id}-"):
            return value
    return None
