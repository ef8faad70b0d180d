"""Scheduler side: a KV cache spec and manager that cap each request's blocks.

Invariant (per request, budget ``k``, same for every layer of the group):
slots ``0 .. k-1`` hold the kept tokens and slot ``k`` is the scratch slot each
new decode token is written to, so a request needs ``ceil((k + 1) / block_size)``
blocks once its prompt is processed. While a prompt longer than ``k`` is
prefilled it holds one slot per prompt token; the worker reduces it to ``k`` at
the end of the prompt and the blocks past the cap return to the pool on the
scheduler's next step (`TovaKVCacheManager.remove_skipped_blocks`).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheSpec

_MAX_RELEASED_RECORDS = 4096


@dataclass(frozen=True, kw_only=True)
class TovaAttentionSpec(AttentionSpec):
    """Full attention whose per-request KV is capped at ``kv_budget`` tokens."""

    kv_budget: int
    kv_policy: str = "tova"

    @property
    def cap_tokens(self) -> int:
        """Slots a request keeps after its prompt: the budget plus the scratch."""
        return self.kv_budget + 1

    @property
    def prefix_cacheable(self) -> bool:
        # Kept slots depend on attention history, not on the token prefix alone.
        return False

    def max_memory_usage_bytes(self, vllm_config) -> int:
        # Drives the startup memory check and the logged maximum concurrency:
        # a decoding request never holds more than the cap.
        max_len = vllm_config.model_config.max_model_len
        return cdiv(min(self.cap_tokens, max_len), self.block_size) * self.page_size_bytes

    @classmethod
    def merge(cls, specs: list[TovaAttentionSpec]) -> TovaAttentionSpec:
        if not all(spec == specs[0] for spec in specs[1:]):
            raise AssertionError(
                "All TOVA attention layers of a KV cache group must have the same spec."
            )
        return copy.deepcopy(specs[0])

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return all(spec == self for spec in kv_cache_specs.values())


class TovaKVCacheManager(SingleTypeKVCacheManager):
    """Allocates at most ``max(prompt, budget + 1)`` slots per request and frees
    the prompt's extra blocks once the prompt is processed. No prefix caching."""

    supports_fine_grained_hash_lookup: ClassVar[bool] = False

    def __init__(self, kv_cache_spec: TovaAttentionSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.cap_tokens = kv_cache_spec.cap_tokens
        self.cap_blocks = cdiv(self.cap_tokens, self.block_size)
        # Prompt length per running request, learnt from remove_skipped_blocks,
        # which the scheduler calls before every allocation of a step.
        self._prompt_len: dict[str, int] = {}
        # Running requests whose prompt the worker has reduced (processed).
        self._reduced: set[str] = set()
        # Blocks each request held when it was last freed (finished, aborted or
        # preempted); bounded, for inspection (tova_vllm.inspect) and metrics.
        self.blocks_at_release: OrderedDict[str, int] = OrderedDict()

    @property
    def has_positionally_stable_blocks(self) -> bool:
        return False

    def slots_needed(self, request_id: str, num_tokens: int, prompt_len: int | None = None) -> int:
        """Slots for ``num_tokens`` tokens: the prompt's while it is being
        prefilled (also when a preempted request recomputes prompt + output in
        one chunk), the cap once the prompt is processed."""
        if request_id in self._reduced:
            return min(num_tokens, self.cap_tokens)
        if prompt_len is None:
            prompt_len = self._prompt_len.get(request_id, num_tokens)
        return min(num_tokens, max(prompt_len, self.cap_tokens))

    def get_num_blocks_to_allocate(
        self,
        request_id: str,
        num_tokens: int,
        new_computed_blocks: Sequence,
        total_computed_tokens: int,
        num_local_computed_tokens: int,
        num_tokens_main_model: int,
        apply_admission_cap: bool = False,
        prefill_end: int = 0,
    ) -> int:
        prompt_len = self._prompt_len.get(request_id) or (prefill_end or None)
        needed = cdiv(self.slots_needed(request_id, num_tokens, prompt_len), self.block_size)
        return max(needed - len(self.req_to_blocks.get(request_id, ())), 0)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int):
        return super().allocate_new_blocks(
            request_id, self.slots_needed(request_id, num_tokens), num_tokens_main_model
        )

    def remove_skipped_blocks(
        self,
        request_id: str,
        processed_computed_tokens: int,
        num_prompt_tokens: int | None = None,
    ) -> None:
        if num_prompt_tokens is not None:
            self._prompt_len[request_id] = num_prompt_tokens
        prompt_len = self._prompt_len.get(request_id)
        if prompt_len is None or processed_computed_tokens < prompt_len:
            return
        # The worker has reduced the prompt to the budget: free the tail.
        self._reduced.add(request_id)
        blocks = self.req_to_blocks.get(request_id)
        if blocks and len(blocks) > self.cap_blocks:
            freed = blocks[self.cap_blocks :]
            del blocks[self.cap_blocks :]
            self.block_pool.free_blocks(reversed(freed))

    def pop_blocks_for_free(self, request_id: str):
        self._prompt_len.pop(request_id, None)
        self._reduced.discard(request_id)
        blocks = super().pop_blocks_for_free(request_id)
        self.blocks_at_release[request_id] = len(blocks)
        self.blocks_at_release.move_to_end(request_id)
        while len(self.blocks_at_release) > _MAX_RELEASED_RECORDS:
            self.blocks_at_release.popitem(last=False)
        return blocks

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, *args, **kwargs):
        return tuple([] for _ in kv_cache_group_ids), 0

    def cache_blocks(self, request, num_tokens, retention_interval=None, *, replay_boundaries=()):
        return

    def get_num_skipped_tokens(self, num_computed_tokens: int) -> int:
        return 0


def register_kv_cache_spec() -> None:
    """Register the spec and its manager with vLLM's KV cache spec registry.
    Idempotent; runs the built-in registrations first (the registry skips them
    once it is non-empty)."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(
        TovaAttentionSpec, TovaKVCacheManager, uniform_type_base_spec=TovaAttentionSpec
    )
