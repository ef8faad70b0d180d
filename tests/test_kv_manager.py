"""The scheduler side of the KV cap with prefix caching, model-free.

Real vLLM objects throughout: a `KVCacheManager` (its coordinator builds the
`BlockPool` and, through the KV cache spec registry, the `TovaKVCacheManager`)
over a `KVCacheConfig` with one TOVA group, after `tova_vllm.plugin.register()`
(spec registration and seams, the kv_cache_manager one included), and
`vllm.v1.request.Request` objects hashed by vLLM's own block hasher. A small
driver (`Sim`) plays the scheduler: lookup then ``allocate_slots`` for a
waiting request, ``allocate_slots`` per step for a running one (synchronous
scheduling unless a test sets ``num_in_flight_tokens``), a sampled token when
a step reaches the end of the sequence, ``free`` at finish or preemption.

Layouts (P prompt tokens, k budget, bs block size, nP = cdiv(P, bs)):
prompt region (bulk prompt, prefix-cacheable policy, caching on):
[nP positional, hashed blocks][cdiv(min(n, k), bs) kept blocks], the region
nulled once the prompt's end is committed; in place (h2o, or caching off):
P slots during the prompt, then the first cdiv(k, bs) blocks; chunked: at
most k + chunk slots; stream: at most k.
"""

from __future__ import annotations

import pytest
import torch

from tova_vllm import plugin

plugin.register()

from vllm import SamplingParams  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.utils.math_utils import cdiv  # noqa: E402
from vllm.v1.core.kv_cache_manager import KVCacheManager  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402

from tova_vllm.backend.slots import content_bytes  # noqa: E402
from tova_vllm.config import KVSettings, engine_settings  # noqa: E402
from tova_vllm.kv_spec import TovaAttentionSpec, TovaKVCacheManager  # noqa: E402

BS = 16
K = 32
HEADS, HEAD_SIZE, DTYPE = 2, 8, torch.float32
GROUP = [0]

init_none_hash(sha256)
HASHER = get_request_block_hasher(BS, sha256)


def settings(policy: str = "tova", budget: int = K, mode: str = "bulk", chunk: int | None = None) -> KVSettings:
    s = engine_settings({"kv_policy": policy, "kv_budget": budget, "kv_prompt_mode": mode, "kv_prompt_chunk": chunk})
    assert s is not None
    return s


def make_spec(s: KVSettings, caching: bool) -> TovaAttentionSpec:
    return TovaAttentionSpec(
        block_size=BS,
        num_kv_heads=HEADS,
        head_size=HEAD_SIZE,
        dtype=DTYPE,
        kv_budget=s.budget,
        kv_settings=s.to_json(),
        kv_prefix_caching=caching,
        state_content_bytes=content_bytes(HEAD_SIZE, DTYPE),
    )


def prompt(n: int, seed: int = 0) -> list[int]:
    return [1000 + 7919 * seed + i for i in range(n)]


class Sim:
    """A KVCacheManager with one TOVA group, driven as the scheduler does."""

    def __init__(
        self,
        *,
        caching: bool = True,
        policy: str = "tova",
        budget: int = K,
        mode: str = "bulk",
        chunk: int | None = None,
        num_blocks: int = 512,
        max_model_len: int = 4096,
    ) -> None:
        self.settings = settings(policy, budget, mode, chunk)
        self.spec = make_spec(self.settings, caching)
        config = KVCacheConfig(
            num_blocks=num_blocks,
            kv_cache_tensors=[],
            kv_cache_groups=[KVCacheGroupSpec(["model.layers.0.self_attn.attn"], self.spec)],
        )
        self.kvm = KVCacheManager(
            config, max_model_len=max_model_len, scheduler_block_size=BS, hash_block_size=BS, enable_caching=caching
        )
        self.mgr = self.kvm.coordinator.single_type_managers[0]
        assert isinstance(self.mgr, TovaKVCacheManager)
        self.pool = self.kvm.block_pool
        # The worker's view of each row: the ids it was sent (append-only).
        self.worker_rows: dict[str, list[int]] = {}

    def request(self, rid: str, tokens: list[int], *, max_tokens: int = 4096, **kv) -> Request:
        extra = dict(kv) or None  # per-request KV settings (vllm_xargs)
        params = SamplingParams(max_tokens=max_tokens, extra_args=extra)
        return Request(rid, list(tokens), params, None, block_hasher=HASHER)

    def _advance(self, req: Request, n: int) -> None:
        req.num_computed_tokens += n
        if req.num_computed_tokens == req.num_tokens:  # the step samples a token
            req.append_output_token_ids(5 + (req.num_output_tokens * 31 + len(req.request_id)) % 20000)

    def admit(self, req: Request, chunk: int | None = None) -> int:
        """First scheduling of a waiting (new or preempted) request: lookup,
        then the first chunk. Returns the hit length."""
        assert req.num_computed_tokens == 0
        blocks, hit, _ = self.kvm.get_computed_blocks(req)
        left = req.num_tokens - hit
        n = left if chunk is None else min(chunk, left)
        # As vLLM's scheduler admits a waiting request (scheduler_reserve_full_isl
        # is on by default): the whole sequence must fit.
        out = self.kvm.allocate_slots(req, n, hit, blocks, full_sequence_must_fit=True)
        assert out is not None, "admission failed"
        req.status = RequestStatus.RUNNING
        self.worker_rows[req.request_id] = [b.block_id for b in self.row(req)]
        req.num_computed_tokens = hit
        self._advance(req, n)
        return hit

    def step(self, req: Request, chunk: int | None = None):
        left = req.num_tokens - req.num_computed_tokens
        n = left if chunk is None else min(chunk, left)
        out = self.kvm.allocate_slots(req, n)
        assert out is not None, "allocation failed"
        self.worker_rows[req.request_id].extend(out.get_block_ids()[0])
        self._advance(req, n)
        return out

    def finish(self, req: Request) -> None:
        req.status = RequestStatus.FINISHED_STOPPED
        self.kvm.free(req)

    def preempt(self, req: Request) -> None:
        self.kvm.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1

    def row(self, req: Request) -> list:
        return self.mgr.req_to_blocks[req.request_id]

    def real(self, req: Request) -> list:
        return [b for b in self.row(req) if not b.is_null]

    def cached(self, block_hash):
        hit = self.pool.get_cached_block(block_hash, GROUP)
        return None if hit is None else hit[0]

    def lookup(self, req: Request) -> tuple[list, int]:
        """The manager's own longest hit (no max-length cap, no seam)."""
        found, length = TovaKVCacheManager.find_longest_cache_hit(
            req.block_hashes, 10**6, GROUP, self.pool, self.spec, False, BS
        )
        return found[0], length

    def num_hashed(self) -> int:
        """Blocks of the pool that carry a block hash (cached)."""
        n = sum(b.block_hash is not None for b in self.pool.blocks)
        assert n <= len(self.pool.cached_block_hash_to_block) + len(self.pool.cached_block_hashes_by_block)
        return n


def check_region_row(sim: Sim, req: Request, foreign_hashes: bool = False) -> None:
    """A prompt-region row after any step: kept blocks are real and never
    hashed, no hash past the prompt's full blocks is in the cache, and the
    manager's row is index-aligned with the ids the worker was sent
    (``foreign_hashes``: another request's prompt covers this one's outputs)."""
    p = req.num_prompt_tokens
    n_p = cdiv(p, BS)
    row = sim.row(req)
    kept = row[n_p:]
    assert all(not b.is_null and b.block_hash is None for b in kept)
    if len(row) > n_p - 1 >= 0 and p % BS:
        last = row[n_p - 1]
        assert last.is_null or last.block_hash is None  # the partial last prompt block
    for j in range(p // BS, 0 if foreign_hashes else len(req.block_hashes)):
        assert sim.cached(req.block_hashes[j]) is None, f"block hash {j} (past the prompt) is cached"
    worker = sim.worker_rows[req.request_id]
    assert len(worker) == len(row)
    assert all(b.is_null or b.block_id == w for b, w in zip(row, worker))


# ------------------------------------------------------------------ 1. allocation


@pytest.mark.parametrize(("p", "budget"), [(100, 32), (20, 40), (96, 32), (40, 40)])
def test_bulk_prompt_region_allocation(p, budget):
    sim = Sim(budget=budget)
    req = sim.request("a", prompt(p))
    n_p, cap = cdiv(p, BS), cdiv(budget, BS)
    assert sim.mgr.uses_prefix_cache("a")
    sim.admit(req, chunk=40)
    while req.num_computed_tokens < p:  # prompt chunks: positional, n slots
        assert len(sim.row(req)) == cdiv(req.num_computed_tokens, BS)
        assert not any(b.is_null for b in sim.row(req))
        check_region_row(sim, req)
        sim.step(req, chunk=40)
    # The step containing the prompt's last token: region + kept, all real.
    assert req.num_computed_tokens == p
    assert len(sim.row(req)) == n_p + cdiv(min(p, budget), BS)
    assert len(sim.real(req)) == len(sim.row(req))
    check_region_row(sim, req)
    kept_before = list(sim.row(req)[n_p:])
    for i in range(150):
        sim.step(req)
        n = req.num_computed_tokens
        row = sim.row(req)
        assert len(row) == n_p + cdiv(min(n, budget), BS) <= n_p + cap
        assert all(b.is_null for b in row[:n_p])
        assert sim.real(req) == row[n_p:]
        if i == 0:
            assert row[n_p:] == kept_before  # nulling left the kept blocks alone
        check_region_row(sim, req)


def test_per_request_budget_and_prompt_mode():
    """A request's own settings (vllm_xargs): a smaller budget sizes its kept
    region; a bulk request on a chunked engine gets a prompt region."""
    sim = Sim(mode="chunked")
    p = 100
    small = sim.request("s", prompt(p), kv_budget=16)
    sim.admit(small)
    assert len(sim.row(small)) == cdiv(16 + 16, BS)  # k + chunk (no engine chunk: its own budget)
    bulk = sim.request("b", prompt(p, seed=1), kv_prompt_mode="bulk", kv_budget=16)
    sim.admit(bulk)
    assert sim.mgr.uses_prefix_cache("b") and not sim.mgr.uses_prefix_cache("s")
    assert small.skip_reading_prefix_cache and not bulk.skip_reading_prefix_cache
    assert len(sim.row(bulk)) == cdiv(p, BS) + 1
    for _ in range(40):
        sim.step(small)
        sim.step(bulk)
        assert len(sim.row(small)) == 1
        assert len(sim.real(bulk)) == 1 and len(sim.row(bulk)) == cdiv(p, BS) + 1
        check_region_row(sim, bulk)
    assert sim.num_hashed() == p // BS


@pytest.mark.parametrize(("caching", "policy"), [(False, "tova"), (True, "h2o"), (False, "h2o")])
def test_bulk_in_place_allocation(caching, policy):
    sim = Sim(caching=caching, policy=policy)
    p = 100
    req = sim.request("a", prompt(p))
    assert not sim.mgr.uses_prefix_cache("a")
    sim.admit(req, chunk=48)
    while req.num_computed_tokens < p:
        assert len(sim.row(req)) == cdiv(req.num_computed_tokens, BS)
        sim.step(req, chunk=48)
    assert len(sim.row(req)) == cdiv(p, BS)  # P slots, in place
    first = list(sim.row(req)[: cdiv(K, BS)])
    for _ in range(60):
        sim.step(req)
        assert sim.row(req) == first  # the tail went back, the head stays
        assert not any(b.is_null or b.block_hash is not None for b in sim.row(req))
    assert sim.num_hashed() == 0


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("sched_chunk", [40, 7, None])
def test_chunked_prompt_allocation(caching, sched_chunk):
    chunk = 24
    sim = Sim(caching=caching, mode="chunked", chunk=chunk)
    p = 150
    req = sim.request("a", prompt(p))
    limit = cdiv(K + chunk, BS)
    sim.admit(req, chunk=sched_chunk)
    peak = len(sim.row(req))
    while req.num_computed_tokens < p:
        assert len(sim.row(req)) <= limit
        sim.step(req, chunk=sched_chunk)
        peak = max(peak, len(sim.row(req)))
    assert peak == limit
    for _ in range(40):
        sim.step(req)
        assert len(sim.row(req)) <= cdiv(K, BS)
        assert not any(b.is_null for b in sim.row(req))
    assert sim.num_hashed() == 0


@pytest.mark.parametrize("caching", [True, False])
def test_stream_prompt_allocation(caching):
    sim = Sim(caching=caching, mode="stream")
    p = 150
    req = sim.request("a", prompt(p))
    sim.admit(req, chunk=40)
    while True:
        assert len(sim.row(req)) <= cdiv(K, BS)
        if req.num_computed_tokens > p + 30:
            break
        sim.step(req, chunk=40)
    assert sim.num_hashed() == 0


# ------------------------------------------------------- 2. null replacement


def _at_prompt_end(sim: Sim, p: int = 100, rid: str = "a", seed: int = 0) -> Request:
    req = sim.request(rid, prompt(p, seed))
    sim.admit(req)
    assert req.num_computed_tokens == p
    return req


def test_remove_skipped_blocks_nulls_exactly_the_prompt_region():
    sim = Sim()
    p = 100
    req = _at_prompt_end(sim, p)
    n_p = cdiv(p, BS)
    before = list(sim.row(req))
    assert len(before) == n_p + cdiv(K, BS)
    free = sim.pool.get_num_free_blocks()
    for processed in (0, 64, p - 1):
        sim.mgr.remove_skipped_blocks("a", processed, p)
        assert sim.row(req) == before
    assert sim.pool.get_num_free_blocks() == free
    sim.mgr.remove_skipped_blocks("a", p, p)
    after = sim.row(req)
    assert len(after) == len(before)
    assert all(b.is_null for b in after[:n_p])
    assert after[n_p:] == before[n_p:]
    assert all(b.ref_cnt == 1 for b in after[n_p:])
    assert all(b.ref_cnt == 0 for b in before[:n_p])
    assert sim.pool.get_num_free_blocks() == free + n_p
    # Idempotent (the prompt length is remembered: num_prompt_tokens optional).
    sim.mgr.remove_skipped_blocks("a", p + 5, p)
    sim.mgr.remove_skipped_blocks("a", p + 6)
    assert sim.row(req) == after
    assert sim.pool.get_num_free_blocks() == free + n_p


def test_prompt_region_kept_while_its_step_is_in_flight():
    """Async scheduling: the next step is scheduled while the prompt-end step
    is in flight; the region must survive until that step is committed."""
    sim = Sim()
    p = 100
    req = _at_prompt_end(sim, p)
    # Undo the synchronous sample: the prompt-end step is still in flight
    # (vLLM schedules the next step with an output placeholder).
    req.num_in_flight_tokens = p
    before = list(sim.row(req))
    out = sim.kvm.allocate_slots(req, 1)
    assert out is not None
    assert sim.row(req) == before  # nothing nulled, nothing new
    req.num_computed_tokens += 1
    req.num_in_flight_tokens += 1
    req.num_in_flight_tokens -= p  # the prompt-end step committed
    sim.kvm.allocate_slots(req, 1)
    assert sim.row(req)[cdiv(p, BS):] == before[cdiv(p, BS):]
    assert all(b.is_null for b in sim.row(req)[: cdiv(p, BS)])


@pytest.mark.parametrize(("caching", "policy"), [(False, "tova"), (True, "h2o")])
def test_remove_skipped_blocks_in_place_frees_the_tail(caching, policy):
    sim = Sim(caching=caching, policy=policy)
    p = 100
    req = _at_prompt_end(sim, p)
    before = list(sim.row(req))
    assert len(before) == cdiv(p, BS)
    free = sim.pool.get_num_free_blocks()
    sim.mgr.remove_skipped_blocks("a", p - 1, p)
    assert sim.row(req) == before
    sim.mgr.remove_skipped_blocks("a", p, p)
    cap = cdiv(K, BS)
    assert sim.row(req) == before[:cap]
    assert not any(b.is_null for b in sim.row(req))
    assert sim.pool.get_num_free_blocks() == free + len(before) - cap
    sim.mgr.remove_skipped_blocks("a", p + 3, p)
    assert sim.row(req) == before[:cap]
    assert sim.pool.get_num_free_blocks() == free + len(before) - cap


# ------------------------------------------------- 3. hashes surviving release


def test_prompt_hashes_survive_nulling_and_release():
    sim = Sim()
    p = 100  # 6 full blocks, a partial 7th
    a = _at_prompt_end(sim, p)
    n_full = p // BS
    region = list(sim.row(a)[: cdiv(p, BS)])
    assert all(b.block_hash is not None for b in region[:n_full])
    assert region[-1].block_hash is None  # partial: never hashed
    for _ in range(200):  # far past P (block hashes of outputs exist now)
        sim.step(a)
        check_region_row(sim, a)
    assert len(a.block_hashes) > n_full + 10
    for j in range(n_full):
        assert sim.cached(a.block_hashes[j]) is region[j]
    assert region[-1].block_hash is None
    sim.finish(a)
    assert sim.mgr.req_to_blocks.get("a") is None
    for j in range(n_full):
        assert sim.cached(a.block_hashes[j]) is region[j]
        assert region[j].ref_cnt == 0

    # A second request with the same prompt hits the full prompt blocks.
    b = sim.request("b", prompt(p))
    found, length = sim.lookup(b)
    assert length == n_full * BS and found == region[:n_full]
    hit = sim.admit(b)
    assert hit == n_full * BS == (p - 1) // BS * BS
    assert sim.row(b)[:n_full] == region[:n_full]
    assert all(blk.ref_cnt == 1 for blk in region[:n_full])
    assert len(sim.row(b)) == cdiv(p, BS) + cdiv(K, BS)
    check_region_row(sim, b)
    sim.step(b)
    check_region_row(sim, b)
    for j in range(n_full):
        assert sim.cached(b.block_hashes[j]) is region[j]


def test_block_aligned_prompt_hit_is_capped_for_a_new_request():
    sim = Sim()
    p = 96  # 6 full blocks, all hashed
    a = _at_prompt_end(sim, p)
    sim.step(a)
    assert all(b.is_null for b in sim.row(a)[:6])
    sim.finish(a)
    b = sim.request("b", prompt(p))
    assert sim.lookup(b)[1] == 96
    # Through KVCacheManager: the last prompt token is recomputed.
    assert sim.admit(b) == (p - 1) // BS * BS == 80


def test_hit_on_blocks_of_a_running_request():
    """B hits A's region while A still holds it; A's nulling then only drops
    its own reference."""
    sim = Sim()
    p = 100
    a = _at_prompt_end(sim, p)
    b = sim.request("b", prompt(p))
    assert sim.admit(b) == 96
    shared = sim.row(b)[:6]
    assert shared == sim.row(a)[:6]
    assert all(x.ref_cnt == 2 for x in shared)
    sim.step(a)  # A nulls its region
    assert all(x.ref_cnt == 1 for x in shared)
    assert sim.row(b)[:6] == shared
    check_region_row(sim, a)
    check_region_row(sim, b)
    sim.step(b)
    assert all(x.ref_cnt == 0 for x in shared)
    assert all(sim.cached(b.block_hashes[j]) is shared[j] for j in range(6))


def test_prefix_extension_hits_the_common_blocks():
    sim = Sim()
    a = _at_prompt_end(sim, 100)
    sim.step(a)
    sim.finish(a)
    longer = prompt(100) + prompt(60, seed=9)
    c = sim.request("c", longer)
    assert sim.admit(c) == 96
    assert len(sim.row(c)) == cdiv(160, BS) + cdiv(K, BS)
    check_region_row(sim, c)
    sim.step(c)
    for j in range(160 // BS):
        assert sim.cached(c.block_hashes[j]) is not None
    check_region_row(sim, c)


# ------------------------------------------------------------- 4. eviction


def test_cached_blocks_are_evicted_last_and_lose_their_hash():
    # 11 usable blocks (block 0 is the null block).
    sim = Sim(num_blocks=12)
    p = 100
    a = _at_prompt_end(sim, p)  # 7 region + 2 kept = 9 blocks
    region = list(sim.row(a)[:7])
    sim.step(a)  # nulls the region: 6 hashed to the back, the partial to the front
    sim.finish(a)
    assert sim.pool.get_num_free_blocks() == 11
    assert sim.num_hashed() == 6
    # C (other tokens) needs 4 region + 2 kept = 6 blocks: the 5 unhashed free
    # blocks go first, then the cached block freed first (A's last full one).
    c = sim.request("c", prompt(50, seed=3))
    assert sim.admit(c) == 0
    assert region[5] in sim.row(c)
    assert all(blk not in sim.row(c) for blk in region[:5])
    assert sim.cached(a.block_hashes[5]) is None  # its hash went with it
    for j in range(5):
        assert sim.cached(a.block_hashes[j]) is region[j]
    # No stale hit: the same prompt now hits 5 blocks, A's, not C's block.
    d = sim.request("d", prompt(p))
    found, length = sim.lookup(d)
    assert length == 5 * BS and found == region[:5]
    sim.step(c)  # C nulls its region (3 hashed blocks of its own)
    sim.finish(c)
    # E takes the whole pool: every cached hash is dropped.
    e = sim.request("e", prompt(130, seed=5))  # 9 region + 2 kept = 11 blocks
    assert sim.admit(e) == 0
    assert sim.pool.get_num_free_blocks() == 0
    assert sim.num_hashed() == 130 // BS  # E's own, nothing of A or C
    for j in range(6):
        assert sim.cached(a.block_hashes[j]) is None
    for j in range(3):
        assert sim.cached(c.block_hashes[j]) is None
    sim.step(e)
    sim.finish(e)
    d2 = sim.request("d2", prompt(p))
    assert sim.admit(d2) == 0


def test_evictable_hits_count_in_the_allocation():
    sim = Sim(num_blocks=12)
    p = 100
    a = _at_prompt_end(sim, p)
    sim.step(a)
    sim.finish(a)
    # Fill the pool down to 8 free blocks: two held by a stream request.
    s = sim.request("s", prompt(40, seed=4), kv_prompt_mode="stream")
    sim.admit(s)
    assert sim.pool.get_num_free_blocks() == 9
    b = sim.request("b", prompt(p))
    blocks, hit, _ = sim.kvm.get_computed_blocks(b)
    assert hit == 96
    need = sim.mgr.get_num_blocks_to_allocate("b", p, blocks.blocks[0], hit, hit, p, prefill_end=p)
    assert need == (9 - 6) + 6  # 1 region + 2 kept new, 6 hits leave the free queue
    assert sim.kvm.allocate_slots(b, p - hit, hit, blocks) is not None
    assert sim.pool.get_num_free_blocks() == 0
    sim.finish(b)
    # One block fewer: the hits still count, the allocation is refused.
    t = sim.request("t", prompt(10, seed=6), kv_prompt_mode="stream")
    sim.admit(t)
    assert sim.pool.get_num_free_blocks() == 8
    c = sim.request("c", prompt(p))
    blocks, hit, _ = sim.kvm.get_computed_blocks(c)
    assert hit == 96
    assert sim.kvm.allocate_slots(c, p - hit, hit, blocks) is None
    assert sim.mgr.req_to_blocks.get("c", []) == []


# ------------------------------------------------ 5. lookup cap (resumed)


def test_resumed_request_hits_stop_before_its_prompt_end():
    sim = Sim()
    p = 40  # 2 full blocks and a partial one
    r = sim.request("r", prompt(p))
    sim.admit(r)
    own = list(sim.row(r)[:2])
    while r.num_tokens < 81:
        sim.step(r)
    # Q's prompt is R's prompt + R's first 40 outputs: 5 hashed blocks.
    q = sim.request("q", list(r.all_token_ids[:80]))
    assert sim.admit(q) == 32  # R's two blocks
    sim.step(q)
    for j in range(5):
        assert sim.cached(q.block_hashes[j]) is not None
        assert r.block_hashes[j] == q.block_hashes[j]
    sim.finish(q)
    sim.preempt(r)
    assert r.num_tokens == 81 and r.num_computed_tokens == 0
    # Uncapped, R would hit all of Q's blocks (past its own prompt).
    _, uncapped, _ = sim.kvm.coordinator.find_longest_cache_hit(r.block_hashes, r.num_tokens - 1)
    assert uncapped == 80
    blocks, hit, _ = sim.kvm.get_computed_blocks(r)
    assert hit == (p - 1) // BS * BS == 32
    assert blocks.blocks[0] == own
    assert not r.skip_reading_prefix_cache
    # Resumed: prompt and outputs recomputed in one chunk.
    assert sim.kvm.allocate_slots(r, r.num_tokens - hit, hit, blocks, full_sequence_must_fit=True) is not None
    sim.worker_rows["r"] = [b.block_id for b in sim.row(r)]
    r.num_computed_tokens = hit
    sim._advance(r, r.num_tokens - hit)
    assert sim.row(r)[:2] == own
    assert len(sim.row(r)) == cdiv(p, BS) + cdiv(K, BS)
    check_region_row(sim, r, foreign_hashes=True)
    sim.step(r)
    assert all(b.is_null for b in sim.row(r)[:3])
    check_region_row(sim, r, foreign_hashes=True)


@pytest.mark.parametrize("caching", [True, False])
def test_resumed_request_admission_counts_its_prompt_not_its_outputs(caching):
    """vLLM admits a waiting request only if its whole sequence fits
    (``full_sequence_must_fit``, on by default), asking the manager before
    ``remove_skipped_blocks`` has told it the prompt length; for a preempted
    request it passes ``prefill_end = num_tokens - 1``. A resumed request
    recomputes its prompt (P slots, or region + kept) and replays its outputs
    as waves in the kept slots: it needs 5 blocks here (3 in place), not one
    per token."""
    sim = Sim(caching=caching, num_blocks=12)  # 11 usable blocks
    p = 40
    r = sim.request("r", prompt(p))
    sim.admit(r)
    for _ in range(200):
        sim.step(r)
    assert len(sim.real(r)) == cdiv(K, BS)
    sim.preempt(r)
    assert sim.pool.get_num_free_blocks() == 11
    blocks, hit, _ = sim.kvm.get_computed_blocks(r)
    assert hit == (32 if caching else 0)
    n = r.num_tokens
    expected = cdiv(p, BS) + cdiv(K, BS) if caching else cdiv(max(p, K), BS)
    out = sim.kvm.allocate_slots(r, n - hit, hit, blocks, full_sequence_must_fit=True)
    if out is None:
        prefill_end = max(r.num_prompt_tokens, n - 1)  # what KVCacheManager.allocate_slots passes
        need = sim.mgr.get_num_blocks_to_allocate("r", n, blocks.blocks[0], hit, hit, n, True, prefill_end)
        pytest.fail(
            f"a resumed request (P={p}, {n} tokens) needing {expected} blocks was refused with 11 free: "
            f"the admission check asked for {need}"
        )
    assert len(sim.row(r)) == expected
    sim.worker_rows["r"] = [b.block_id for b in sim.row(r)]
    r.num_computed_tokens = hit
    sim._advance(r, n - hit)
    sim.step(r)
    assert len(sim.real(r)) == cdiv(K, BS)


# ---------------------------------------------------- 6. block-table width


def test_customize_spec_builds_the_same_spec():
    from tova_vllm.backend.backend import TovaAttentionBackend

    s = settings()
    for caching in (True, False):
        base = FullAttentionSpec(block_size=BS, num_kv_heads=HEADS, head_size=HEAD_SIZE, dtype=DTYPE)
        spec = TovaAttentionBackend.for_settings(s, prefix_caching=caching).customize_spec(base)
        assert spec == make_spec(s, caching)


@pytest.mark.parametrize(("max_len", "budget"), [(200, 32), (208, 32), (1024, 40), (40, 64), (33, 32)])
def test_block_table_width(max_len, budget):
    on = make_spec(settings(budget=budget), True)
    off = make_spec(settings(budget=budget), False)
    assert on.max_num_blocks_per_req(None, max_len) == cdiv(max_len, BS) + cdiv(min(budget, max_len), BS)
    assert off.max_num_blocks_per_req(None, max_len) == cdiv(max_len, BS)
    for caching, spec in ((True, on), (False, off)):
        width = spec.max_num_blocks_per_req(None, max_len)
        sim = Sim(caching=caching, budget=budget, max_model_len=max_len)
        p = max_len - 1
        req = sim.request("a", prompt(p), max_tokens=1)
        sim.admit(req)
        assert len(sim.row(req)) <= width
        if caching:
            assert len(sim.row(req)) == cdiv(p, BS) + cdiv(min(p, budget), BS)
        assert req.num_tokens == max_len
        sim.step(req)  # the last position of the model's length
        assert len(sim.row(req)) <= width
        assert len(sim.worker_rows["a"]) <= width
        # A resumed request of max_len tokens fits too.
        sim.preempt(req)
        sim.admit(req)
        assert len(sim.row(req)) <= width


# ------------------------------------ 7. requests without a prompt region


@pytest.mark.parametrize(
    ("engine", "extra"),
    [
        ({"policy": "h2o"}, {}),
        ({}, {"kv_policy": "h2o"}),
        ({"mode": "chunked"}, {}),
        ({}, {"kv_prompt_mode": "chunked"}),
        ({"mode": "stream"}, {}),
        ({}, {"kv_prompt_mode": "stream"}),
    ],
    ids=["engine-h2o", "request-h2o", "engine-chunked", "request-chunked", "engine-stream", "request-stream"],
)
def test_no_region_requests_neither_read_nor_write(engine, extra):
    sim = Sim(**engine)
    p = 100
    if not engine:  # seed the cache with a region request of the same prompt
        a = _at_prompt_end(sim, p)
        sim.step(a)
        sim.finish(a)
        assert sim.num_hashed() == 6
    hashed = sim.num_hashed()
    x = sim.request("x", prompt(p), **extra)
    assert not x.skip_reading_prefix_cache
    blocks, hit, _ = sim.kvm.get_computed_blocks(x)
    assert x.skip_reading_prefix_cache
    assert hit == 0 and blocks.blocks == ((),)
    assert not sim.mgr.uses_prefix_cache("x")
    sim.admit(x, chunk=40)
    for _ in range(60):
        assert all(b.block_hash is None and not b.is_null for b in sim.row(x))
        assert sim.num_hashed() == hashed
        sim.step(x, chunk=40)
    sim.finish(x)
    assert sim.num_hashed() == hashed


@pytest.mark.parametrize("policy", ["tova", "window", "sink", "keydiff"])
def test_prefix_cacheable_policies_read_and_write(policy):
    sim = Sim(policy=policy)
    a = _at_prompt_end(sim, 100)
    assert sim.mgr.uses_prefix_cache("a")
    assert sim.num_hashed() == 6
    b = sim.request("b", prompt(100))
    assert sim.admit(b) == 96
    assert not b.skip_reading_prefix_cache
    # A request choosing h2o on this engine does not read them.
    h = sim.request("h", prompt(100), kv_policy="h2o")
    assert sim.admit(h) == 0 and h.skip_reading_prefix_cache
    check_region_row(sim, a)
    check_region_row(sim, b)


def test_caching_off_skips_lookup_and_hashing():
    sim = Sim(caching=False)
    a = _at_prompt_end(sim, 100)
    sim.step(a)
    sim.finish(a)
    b = sim.request("b", prompt(100))
    assert sim.admit(b) == 0
    assert sim.num_hashed() == 0
    assert len(sim.row(b)) == cdiv(100, BS)


# ---------------------------------------------------------------- 8. stats


def test_stats_count_real_blocks_at_release():
    sim = Sim()
    a = _at_prompt_end(sim, 100)
    for _ in range(20):
        sim.step(a)
    assert len(sim.row(a)) == 9 and len(sim.real(a)) == 2
    tokens = a.num_computed_tokens
    sim.finish(a)
    assert sim.mgr.blocks_at_release["a"] == 2
    assert sim.mgr.peak_blocks_at_release["a"] == 9
    st = sim.mgr.stats["tova"]
    assert (st.requests, st.blocks_held) == (1, 2)
    assert st.tokens_evicted == tokens - K
    assert st.blocks_without_eviction == cdiv(tokens, BS)
    # A preempted request is recorded but not counted in the policy stats.
    b = _at_prompt_end(sim, 100, rid="b", seed=1)
    sim.step(b)
    sim.preempt(b)
    assert sim.mgr.blocks_at_release["b"] == 2
    assert sim.mgr.stats["tova"].requests == 1
    # An in-place (h2o) request on the same engine.
    h = sim.request("h", prompt(100, seed=2), kv_policy="h2o")
    sim.admit(h)
    sim.step(h)
    sim.finish(h)
    assert sim.mgr.blocks_at_release["h"] == 2
    assert sim.mgr.stats["h2o"].blocks_held == 2
    assert sim.mgr.peak_blocks_at_release["h"] == cdiv(100, BS)


def test_peak_blocks_count_only_real_blocks():
    """P <= k: the kept region grows after the region is nulled; the row then
    holds null blocks that the request does not hold."""
    budget = 64
    sim = Sim(budget=budget)
    p = 20
    a = _at_prompt_end(sim, p)  # region 2 + kept 2: 4 real
    assert len(sim.real(a)) == 4
    most = 4
    while a.num_computed_tokens < 100:
        sim.step(a)
        most = max(most, len(sim.real(a)))
    assert len(sim.row(a)) == 2 + 4 and len(sim.real(a)) == 4
    sim.finish(a)
    assert sim.mgr.blocks_at_release["a"] == 4
    assert sim.mgr.peak_blocks_at_release["a"] == most == 4
