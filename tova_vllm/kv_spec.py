"""Scheduler side: a KV cache spec and manager that cap each request's blocks.

Invariant (per request with budget ``k``, the same for every layer of the
group; see `tova_vllm.backend.planning`): once its prompt is processed a
request's kept tokens fill at most ``k`` slots, so it needs ``ceil(k /
block_size)`` blocks. While its prompt is prefilled it holds one slot per
prompt token (``bulk``), or at most ``k + chunk`` (``chunked``); the worker
reduces the prompt to ``k`` at its end, and what the request no longer needs
returns to the pool when the scheduler next sees that step committed
(`TovaKVCacheManager.remove_skipped_blocks`: counts of committed tokens, so
under async scheduling a step in flight never loses its blocks).

With prefix caching, a bulk prompt whose policy is prefix-cacheable has a
prompt region (`planning.prompt_region_blocks`): its row is [prompt blocks,
positional, hashed like full attention's][kept blocks, never hashed]. After
the prompt the prompt region is replaced by null blocks (the worker never
reads it again); its hashed blocks go back to the free queue still cached,
so later requests with the same prefix hit them. Other requests neither read
(the kv_cache_manager seam sets ``skip_reading_prefix_cache``) nor write it.
"""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import itertools

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheSpec

from tova_vllm.backend.planning import MODE_CODES, prompt_region_blocks, slots_needed
from tova_vllm.config import KVSettings

_MAX_RELEASED_RECORDS = 4096


@functools.lru_cache(maxsize=64)
def _settings_from_json(text: str) -> KVSettings:
    return KVSettings.from_json(text)


@dataclass(frozen=True, kw_only=True)
class TovaAttentionSpec(AttentionSpec):
    """Full attention whose per-request KV is capped at ``kv_budget`` tokens.
    ``kv_settings`` is the engine's `KVSettings` (policy, options, prompt
    mode) as JSON: any registered policy, generically."""

    kv_budget: int
    kv_settings: str
    # The engine caches prompt prefixes (requests with a prompt region).
    kv_prefix_caching: bool = False

    @property
    def engine_settings(self) -> KVSettings:
        """The engine's settings (requests may override them)."""
        return _settings_from_json(self.kv_settings)

    @property
    def cap_tokens(self) -> int:
        """Slots a request keeps once its prompt is processed: the budget."""
        return self.kv_budget

    @property
    def prefix_cacheable(self) -> bool:
        # Only prompt regions are cached (kept slots depend on attention
        # history, not on the token prefix alone): the manager decides.
        return self.kv_prefix_caching

    def max_num_blocks_per_req(self, vllm_config, max_len: int) -> int:
        # The worker's block-table width: a prompt region before the kept one.
        kept = cdiv(min(self.kv_budget, max_len), self.block_size)
        return cdiv(max_len, self.block_size) + (kept if self.kv_prefix_caching else 0)

    def max_memory_usage_bytes(self, vllm_config) -> int:
        # Drives the startup memory check and the logged maximum concurrency:
        # a decoding request never holds more than the cap.
        max_len = vllm_config.model_config.max_model_len
        return cdiv(min(self.cap_tokens, max_len), self.block_size) * self.page_size_bytes

    @classmethod
    def merge(cls, specs: list[TovaAttentionSpec]) -> TovaAttentionSpec:
        if not all(spec == specs[0] for spec in specs[1:]):
            raise AssertionError("All TOVA attention layers of a KV cache group must have the same spec.")
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


@dataclass(frozen=True)
class _Request:
    budget: int
    mode: int
    chunk: int
    policy: str
    cacheable: bool  # policy and prompt mode allow a prompt region


class TovaKVCacheManager(SingleTypeKVCacheManager):
    """Allocates what `planning.slots_needed` says per request (its own
    settings, `tova_vllm.config.request_settings`), frees what the prompt no
    longer needs once it is processed, and caches prompt regions (see the
    module docstring)."""

    supports_fine_grained_hash_lookup: ClassVar[bool] = False

    def __init__(self, kv_cache_spec: TovaAttentionSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self._engine = self._describe(kv_cache_spec.engine_settings)
        # Per running request, told by the kv_cache_manager seam before its
        # first allocation (again after a preemption).
        self._requests: dict[str, _Request] = {}
        # Prompt length per running request (from the seam; also told by
        # remove_skipped_blocks, which the scheduler calls before allocating).
        self._prompt_len: dict[str, int] = {}
        # Running requests whose prompt the worker has reduced (processed).
        self._reduced: set[str] = set()
        # Set by the seam just before a request's blocks are freed: whether it
        # finished (else preempted) and the tokens whose KV it computed.
        self._releasing: dict[str, tuple[bool, int]] = {}
        # Blocks each request held when it was last freed (finished, aborted or
        # preempted); bounded, for inspection (tova_vllm.inspect) and metrics.
        self.blocks_at_release: OrderedDict[str, int] = OrderedDict()
        # The most blocks each request held at once (its prompt's peak).
        self._peak: dict[str, int] = {}
        self.peak_blocks_at_release: OrderedDict[str, int] = OrderedDict()
        self.stats: dict[str, PolicyStats] = {}

    @property
    def has_positionally_stable_blocks(self) -> bool:
        return False

    @staticmethod
    def _describe(settings: KVSettings) -> _Request:
        mode = MODE_CODES[settings.prompt_mode]
        cacheable = prompt_region_blocks(1, 1, mode, settings.policy.prefix_cacheable, True) > 0
        return _Request(settings.budget, mode, settings.chunk, settings.name, cacheable)

    def note_request(self, request_id: str, settings: KVSettings, prompt_len: int) -> None:
        """The request's own settings and prompt length (told by the seam,
        which sees the Request, before its lookup and first allocation)."""
        self._requests[request_id] = self._describe(settings)
        self._prompt_len[request_id] = prompt_len

    def knows(self, request_id: str) -> bool:
        return request_id in self._requests

    def uses_prefix_cache(self, request_id: str) -> bool:
        """Whether the request has a prompt region (reads and writes the
        prefix cache)."""
        return (
            self.enable_caching
            and self.kv_cache_spec.kv_prefix_caching
            and self._requests.get(request_id, self._engine).cacheable
        )

    def _region(self, request_id: str, prompt_len: int | None) -> int:
        if prompt_len is None or not self.uses_prefix_cache(request_id):
            return 0
        return cdiv(prompt_len, self.block_size)

    def note_release(self, request_id: str, finished: bool, num_computed_tokens: int) -> None:
        self._releasing[request_id] = (finished, num_computed_tokens)

    def budget_of(self, request_id: str) -> int:
        return self._requests.get(request_id, self._engine).budget

    def slots_needed(self, request_id: str, num_tokens: int, prompt_len: int | None = None) -> int:
        r = self._requests.get(request_id, self._engine)
        if prompt_len is None:
            prompt_len = self._prompt_len.get(request_id, num_tokens)
        return slots_needed(
            num_tokens, prompt_len, r.budget, r.mode, r.chunk, request_id in self._reduced,
            self._region(request_id, prompt_len), self.block_size,
        )  # fmt: skip

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
        needed = cdiv(self.slots_needed(request_id, num_tokens), self.block_size)
        held = len(self.req_to_blocks.get(request_id, ())) + len(new_computed_blocks)
        # A prefix hit on a block in the free queue takes it out of there.
        return max(needed - held, 0) + self._get_num_evictable_blocks(new_computed_blocks)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int):
        new = super().allocate_new_blocks(request_id, self.slots_needed(request_id, num_tokens), num_tokens_main_model)
        held = sum(not b.is_null for b in self.req_to_blocks.get(request_id, ()))
        if held > self._peak.get(request_id, 0):
            self._peak[request_id] = held
        return new

    def remove_skipped_blocks(
        self,
        request_id: str,
        processed_computed_tokens: int,
        num_prompt_tokens: int | None = None,
    ) -> None:
        # processed_computed_tokens counts committed steps only (not those in
        # flight under async scheduling): the reduction has run.
        if num_prompt_tokens is not None:
            self._prompt_len[request_id] = num_prompt_tokens
        prompt_len = self._prompt_len.get(request_id)
        if prompt_len is None or processed_computed_tokens < prompt_len:
            return
        self._reduced.add(request_id)
        region = self._region(request_id, prompt_len)
        if region:
            # The kept tokens are in the kept region now: the prompt region
            # goes back (hashed blocks stay cached), replaced by null blocks
            # so the row keeps its indices (the worker's row only grows).
            self._remove_blocks_in_range(request_id, 0, region)
            return
        cap_blocks = cdiv(self.budget_of(request_id), self.block_size)
        blocks = self.req_to_blocks.get(request_id)
        if blocks and len(blocks) > cap_blocks:
            # The worker's block-table row keeps these ids, past the slots
            # the request will ever use again.
            freed = blocks[cap_blocks:]
            del blocks[cap_blocks:]
            self.block_pool.free_blocks(reversed(freed))

    def pop_blocks_for_free(self, request_id: str):
        r = self._requests.pop(request_id, self._engine)
        self._prompt_len.pop(request_id, None)
        self._reduced.discard(request_id)
        blocks = super().pop_blocks_for_free(request_id)
        held = sum(not b.is_null for b in blocks)
        for record, value in (
            (self.blocks_at_release, held),
            (self.peak_blocks_at_release, max(self._peak.pop(request_id, 0), held)),
        ):
            record[request_id] = value
            record.move_to_end(request_id)
            while len(record) > _MAX_RELEASED_RECORDS:
                record.popitem(last=False)
        finished, tokens = self._releasing.pop(request_id, (False, 0))
        if finished:
            stats = self.stats.setdefault(r.policy, PolicyStats())
            stats.requests += 1
            stats.tokens_evicted += max(tokens - r.budget, 0)
            stats.blocks_held += held
            stats.blocks_without_eviction += cdiv(tokens, self.block_size)
        return blocks

    @classmethod
    def find_longest_cache_hit(
        cls,
        block_hashes,
        max_length: int,
        kv_cache_group_ids: list[int],
        block_pool,
        kv_cache_spec,
        drop_eagle_block: bool,
        alignment_tokens: int,
        dcp_world_size: int = 1,
        pcp_world_size: int = 1,
    ):
        """The longest run of cached prompt blocks from the start (as
        FullAttentionManager's first phase; hits are whole blocks)."""
        from vllm.v1.core.kv_cache_utils import resolve_block_hashes

        computed = tuple([] for _ in kv_cache_group_ids)
        if not getattr(kv_cache_spec, "kv_prefix_caching", False):
            return computed, 0
        block_size = kv_cache_spec.block_size
        hashes = resolve_block_hashes(
            block_hashes,
            block_pool.hash_block_size,
            block_size,
            supports_fine_grained_hash_lookup=False,
            alignment_tokens=alignment_tokens,
        )
        for block_hash in itertools.islice(hashes, max_length // block_size):
            cached = block_pool.get_cached_block(block_hash, kv_cache_group_ids)
            if not cached:
                break
            for blocks, block in zip(computed, cached):
                blocks.append(block)
        return computed, len(computed[0]) * block_size

    def cache_blocks(self, request, num_tokens, retention_interval=None, *, replay_boundaries=()):
        """Hash the full blocks of a prompt region (never a kept block: the
        count stops at the prompt)."""
        if not self.uses_prefix_cache(request.request_id):
            return
        num_tokens = min(num_tokens, request.num_prompt_tokens)
        super().cache_blocks(request, num_tokens, retention_interval, replay_boundaries=replay_boundaries)

    def get_num_skipped_tokens(self, num_computed_tokens: int) -> int:
        return 0


def register_kv_cache_spec() -> None:
    """Register the spec and its manager with vLLM's KV cache spec registry.
    Idempotent; runs the built-in registrations first (the registry skips them
    once it is non-empty)."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(TovaAttentionSpec, TovaKVCacheManager, uniform_type_base_spec=TovaAttentionSpec)
