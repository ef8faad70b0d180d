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
    kv_num_sinks: int = 4
    kv_h2o_recent_ratio: float = 0.5

    @property
    def engine_policy(self):
        """The engine's `PolicyConfig` (requests may override it)."""
        from tova_vllm.policies import PolicyConfig

        return PolicyConfig(self.kv_policy, self.kv_budget, self.kv_num_sinks, self.kv_h2o_recent_ratio)

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


@dataclass
class PolicyStats:
    """Cumulative counters of the requests that finished with one policy."""

    requests: int = 0
    # Tokens each request dropped from its cache (per layer: every layer drops
    # the same number), summed over requests.
    tokens_evicted: int = 0
    # Blocks the requests held when they finished, and the blocks the same
    # requests would have held without eviction (one slot per token).
    blocks_held: int = 0
    blocks_without_eviction: int = 0


class TovaKVCacheManager(SingleTypeKVCacheManager):
    """Allocates at most ``max(prompt, budget + 1)`` slots per request (the
    request's own budget, see `tova_vllm.config.request_policy`) and frees the
    prompt's extra blocks once the prompt is processed. No prefix caching."""

    supports_fine_grained_hash_lookup: ClassVar[bool] = False

    def __init__(self, kv_cache_spec: TovaAttentionSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.cap_tokens = kv_cache_spec.cap_tokens
        self.cap_blocks = cdiv(self.cap_tokens, self.block_size)
        # Per running request, told by the kv_cache_manager seam before each
        # allocation: its budget + 1, whether its prompt is streamed, its policy.
        self._cap: dict[str, int] = {}
        self._stream: set[str] = set()
        self._policy_name: dict[str, str] = {}
        # Prompt length per running request, learnt from remove_skipped_blocks,
        # which the scheduler calls before every allocation of a step.
        self._prompt_len: dict[str, int] = {}
        # Running requests whose prompt the worker has reduced (processed).
        self._reduced: set[str] = set()
        # Set by the seam just before a request's blocks are freed: whether it
        # finished (else preempted) and the tokens whose KV it computed.
        self._releasing: dict[str, tuple[bool, int]] = {}
        # Blocks each request held when it was last freed (finished, aborted or
        # preempted); bounded, for inspection (tova_vllm.inspect) and metrics.
        self.blocks_at_release: OrderedDict[str, int] = OrderedDict()
        self.stats: dict[str, PolicyStats] = {}

    @property
    def has_positionally_stable_blocks(self) -> bool:
        return False

    def note_request(self, request_id: str, budget: int, policy: str, stream_prompt: bool) -> None:
        """The request's own settings (`tova_vllm.config.RequestPolicy`)."""
        self._cap[request_id] = min(budget + 1, self.cap_tokens)
        self._policy_name[request_id] = policy
        if stream_prompt:
            self._stream.add(request_id)

    def note_release(self, request_id: str, finished: bool, num_computed_tokens: int) -> None:
        self._releasing[request_id] = (finished, num_computed_tokens)

    def cap_of(self, request_id: str) -> int:
        return self._cap.get(request_id, self.cap_tokens)

    def slots_needed(self, request_id: str, num_tokens: int, prompt_len: int | None = None) -> int:
        """Slots for ``num_tokens`` tokens: the prompt's while it is being
        prefilled in bulk (also when a preempted request recomputes prompt +
        output in one chunk), the cap once the prompt is processed or when it
        is streamed (each prompt token is then evicted for like a decode)."""
        cap = self.cap_of(request_id)
        if request_id in self._reduced or request_id in self._stream:
            return min(num_tokens, cap)
        if prompt_len is None:
            prompt_len = self._prompt_len.get(request_id, num_tokens)
        return min(num_tokens, max(prompt_len, cap))

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
        cap_blocks = cdiv(self.cap_of(request_id), self.block_size)
        blocks = self.req_to_blocks.get(request_id)
        if blocks and len(blocks) > cap_blocks:
            freed = blocks[cap_blocks:]
            del blocks[cap_blocks:]
            self.block_pool.free_blocks(reversed(freed))

    def pop_blocks_for_free(self, request_id: str):
        cap = self.cap_of(request_id)
        policy = self._policy_name.pop(request_id, self.kv_cache_spec.kv_policy)
        for state in (self._prompt_len, self._cap):
            state.pop(request_id, None)
        self._reduced.discard(request_id)
        self._stream.discard(request_id)
        blocks = super().pop_blocks_for_free(request_id)
        held = len(blocks)
        self.blocks_at_release[request_id] = held
        self.blocks_at_release.move_to_end(request_id)
        while len(self.blocks_at_release) > _MAX_RELEASED_RECORDS:
            self.blocks_at_release.popitem(last=False)
        finished, tokens = self._releasing.pop(request_id, (False, 0))
        if finished:
            stats = self.stats.setdefault(policy, PolicyStats())
            stats.requests += 1
            stats.tokens_evicted += max(tokens - (cap - 1), 0)
            stats.blocks_held += held
            stats.blocks_without_eviction += cdiv(tokens, self.block_size)
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
