"""Seam: the scheduler's KV cache manager tells the TOVA managers about each
request.

Wraps three methods of ``vllm.v1.core.kv_cache_manager.KVCacheManager``, the
only place on the scheduler side that sees both the ``Request`` (its sampling
params, its state) and the per-type managers, which get request ids only:

* ``allocate_slots``: before a request's first allocation (again after a
  preemption), its own settings (``SamplingParams.extra_args``,
  `tova_vllm.config.request_settings`), so its blocks follow its budget and
  prompt mode.
* ``free`` and ``pop_blocks_for_free``: whether the request finished (counted
  in the per-policy stats) or was preempted, and its committed tokens.
* ``get_computed_blocks`` (the prefix-cache lookup): a request without a
  prompt region (its policy is not prefix-cacheable, or its prompt is chunked
  or streamed) skips the lookup (``skip_reading_prefix_cache``, from vLLM 0.34
  ``prefix_cache_hit_limit = 0``, so vLLM does not count it either); a resumed request's hit stops before its prompt's
  last block (blocks past a prompt may hold another request's full-attention
  K/V, and the prompt's end must run again to reduce it).

Upstream change that would retire it: the ``Request`` (or its sampling params)
passed to ``SingleTypeKVCacheManager`` allocation and free (see patches/).
"""

from __future__ import annotations

from typing import Any

from vllm.logger import init_logger

from tova_vllm.patch import _seam

logger = init_logger(f"vllm.{__name__}")

SEAM = "kv_cache_manager"


def tova_managers(kv_cache_manager: Any) -> list:
    from tova_vllm.kv_spec import TovaKVCacheManager

    try:
        managers = kv_cache_manager.coordinator.single_type_managers
    except AttributeError as e:
        raise _seam.SeamError(
            f"tova-vllm seam '{SEAM}': KVCacheManager has no coordinator.single_type_managers "
            f"({e}); written for {_seam.SUPPORTED_VLLM_TEXT}."
        ) from e
    return [m for m in managers if isinstance(m, TovaKVCacheManager)]


def _note_request(managers: list, request: Any) -> None:
    from tova_vllm.config import PolicyConfigError, request_settings

    engine = managers[0].kv_cache_spec.engine_settings
    params = request.sampling_params
    try:
        settings = request_settings(engine, params.extra_args if params is not None else None)
    except PolicyConfigError as e:
        # The API layer rejects such requests (request_params seam); a caller
        # that bypasses it gets the engine's settings rather than a dead engine.
        logger.error("tova-vllm: request %s: %s; using the engine's settings", request.request_id, e)
        settings = engine
    for manager in managers:
        manager.note_request(request.request_id, settings, request.num_prompt_tokens)


def _skip_prefix_cache_reads(request: Any) -> None:
    """Make vLLM's own lookup read nothing for ``request`` (and not count it)."""
    if hasattr(request, "prefix_cache_hit_limit"):  # vLLM 0.34: 0 = no reads
        request.prefix_cache_hit_limit = 0
    elif hasattr(request, "skip_reading_prefix_cache"):  # vLLM 0.32-0.33
        request.skip_reading_prefix_cache = True
    else:
        raise _seam.SeamError(
            f"tova-vllm seam '{SEAM}': Request has neither prefix_cache_hit_limit nor "
            f"skip_reading_prefix_cache; written for {_seam.SUPPORTED_VLLM_TEXT}."
        )


def apply() -> None:
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    if _seam.is_applied(KVCacheManager, "allocate_slots"):
        return
    allocate = _seam.expect_callable(
        KVCacheManager, "allocate_slots", ["self", "request", "num_new_tokens"], SEAM
    )
    free = _seam.expect_callable(KVCacheManager, "free", ["self", "request"], SEAM)
    pop = _seam.expect_callable(KVCacheManager, "pop_blocks_for_free", ["self", "request"], SEAM)
    lookup = _seam.expect_callable(KVCacheManager, "get_computed_blocks", ["self", "request"], SEAM)
    _seam.expect_callable(KVCacheManager, "truncate_computed_blocks", ["self", "blocks", "num_computed_tokens"], SEAM)

    def get_computed_blocks(self, request, *args, **kwargs):
        # vLLM 0.33 added max_cache_hit_length (passed positionally).
        managers = tova_managers(self)
        if not managers:
            return lookup(self, request, *args, **kwargs)
        if not managers[0].knows(request.request_id):
            _note_request(managers, request)
        if not managers[0].uses_prefix_cache(request.request_id):
            _skip_prefix_cache_reads(request)
            return lookup(self, request, *args, **kwargs)
        blocks, hit, boundary = lookup(self, request, *args, **kwargs)
        block_size = managers[0].block_size
        limit = (request.num_prompt_tokens - 1) // block_size * block_size
        if hit > limit:
            blocks, hit = self.truncate_computed_blocks(blocks, limit), limit
        return blocks, hit, boundary

    def allocate_slots(self, request, *args, **kwargs):
        managers = tova_managers(self)
        if managers and not managers[0].knows(request.request_id):
            _note_request(managers, request)
        return allocate(self, request, *args, **kwargs)

    def _note_release(self, request) -> None:
        # Committed tokens only: under async scheduling a step may be in flight.
        computed = request.num_computed_tokens - getattr(request, "num_in_flight_tokens", 0)
        for manager in tova_managers(self):
            manager.note_release(request.request_id, request.is_finished(), computed)

    def free_(self, request):
        _note_release(self, request)
        return free(self, request)

    def pop_blocks_for_free(self, request):
        _note_release(self, request)
        return pop(self, request)

    _seam.replace(KVCacheManager, "allocate_slots", allocate, allocate_slots)
    _seam.replace(KVCacheManager, "free", free, free_)
    _seam.replace(KVCacheManager, "pop_blocks_for_free", pop, pop_blocks_for_free)
    _seam.replace(KVCacheManager, "get_computed_blocks", lookup, get_computed_blocks)
