"""Seam: the engine core answers questions about TOVA's KV blocks.

Adds one method, ``EngineCore.tova_kv_state``, which vLLM's existing utility
call mechanism (``engine_core.call_utility(name)``, used by LLM and the API
server for their own queries) can reach from the process that runs the
engine. It reads the scheduler's block pool and the TOVA managers: free and
total blocks, blocks per running request, what finished requests held at
their end, and per-policy counters (requests, tokens evicted, blocks held vs
without eviction). Nothing existing is replaced.

Upstream change that would retire it: per-request KV block counts in
SchedulerStats / RequestOutput (see patches/).
"""

from __future__ import annotations

from typing import Any

from tova_vllm.patch import _seam

SEAM = "engine_core"
METHOD = "tova_kv_state"


def kv_state(engine_core: Any) -> dict[str, Any]:
    from tova_vllm.kv_spec import TovaKVCacheManager

    try:
        scheduler = engine_core.scheduler
        kv_manager = scheduler.kv_cache_manager
        pool = kv_manager.block_pool
        managers = list(kv_manager.coordinator.single_type_managers)
    except AttributeError as e:
        raise _seam.SeamError(
            f"tova-vllm seam '{SEAM}': the engine core's scheduler no longer has the "
            f"expected shape ({e}); written for {_seam.SUPPORTED_VLLM_TEXT}."
        ) from e
    tova = [m for m in managers if isinstance(m, TovaKVCacheManager)]
    running: dict[str, int] = {}
    for manager in managers:
        for req_id, blocks in manager.req_to_blocks.items():
            running[req_id] = running.get(req_id, 0) + sum(not b.is_null for b in blocks)
    finished: dict[str, int] = {}
    peaks: dict[str, int] = {}
    stats: dict[str, dict[str, int]] = {}
    for manager in tova:
        finished.update(manager.blocks_at_release)
        peaks.update(manager.peak_blocks_at_release)
        for policy, counters in manager.stats.items():
            merged = stats.setdefault(policy, dict.fromkeys(vars(counters), 0))
            for key, value in vars(counters).items():
                merged[key] += value
    return {
        "num_free_blocks": pool.get_num_free_blocks(),
        "num_blocks": pool.num_gpu_blocks,
        "blocks_per_running_request": running,
        "blocks_at_release": finished,
        # The most blocks each released request held at once.
        "peak_blocks_at_release": peaks,
        "num_requests": len(scheduler.requests),
        # What vLLM computed (and logged) at startup from the specs'
        # max_memory_usage_bytes: requests of max_model_len that fit at once.
        "max_concurrency": getattr(
            getattr(engine_core, "vllm_config", None) and engine_core.vllm_config.cache_config,
            "kv_cache_max_concurrency",
            None,
        ),
        "policy_groups": len(tova),
        # Per policy, over finished requests (see kv_spec.PolicyStats); with
        # several KV cache groups, summed over the groups.
        "stats": stats,
    }


def apply() -> None:
    from vllm.v1.engine.core import EngineCore

    if hasattr(EngineCore, METHOD):
        return
    # The utility mechanism calls getattr(engine_core, name)(*args); what the
    # method reads is checked when it runs (instance attributes).
    def tova_kv_state(self) -> dict[str, Any]:
        return kv_state(self)

    setattr(tova_kv_state, _seam._MARK, True)
    setattr(EngineCore, METHOD, tova_kv_state)
