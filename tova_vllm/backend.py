"""Worker side: the attention backend that evicts.

Per layer and per request, with the request's budget ``k`` (see
`tova_vllm.kv_spec` for the slot invariant): a prompt token at position ``p``
is written to slot ``p``; after the prompt's last token, a prompt longer than
``k`` is reduced to the ``k`` tokens the policy keeps, compacted into slots
``0 .. k-1``. A token after the prompt (every token, for a request whose
prompt is streamed) at position ``p`` is written to slot ``min(p, k)``, attends
over the slots ``0 .. min(p, k)``, and once ``k + 1`` slots are full the policy
picks the slot to free, per KV head; the scratch slot ``k`` is copied there (a
self-copy when the new token itself goes). Everything follows from positions,
prompt lengths, the request's settings and the block table, so nothing per
request is remembered between steps: preemption (recompute), requests moving
inside the batch and requests leaving need no bookkeeping.

Per slot, two side tables parallel to each layer's KV cache (same block ids)
hold the token's position (window, sink and H2O's recent window) and H2O's
accumulated attention. They are written with the slot's K/V and moved with
it, so a block's stale values are never read by its next owner. Cost: 8 bytes
per slot and KV head beside K+V's ``2 * head_size * dtype`` bytes (1.6% for
head size 64 in float32 or 128 in bfloat16), allocated outside vLLM's KV pool.

With tensor parallelism each rank holds a slice of the query heads; TOVA's
head average is a sum all-reduced over the TP group, so every rank evicts the
same slot (H2O is per KV head and window/sink use positions: no reduction).

Tokens after the prompt are processed one at a time within a layer, in
"waves": wave ``j`` holds the ``j``-th such token of every request in the step
(a plain decode step is one wave), and each wave runs the batched decode path.
So a preempted request that recomputes its prompt and output in one chunk
evicts exactly as it did when decoding (each layer's result for a token depends
only on that layer's inputs for earlier tokens and its cache), and a streamed
prompt is evicted for token by token, many requests at once.

The code here is the portable PyTorch path (CPU, or any device); attention is
computed explicitly because the policy needs the probabilities. On CUDA, waves
of TOVA rows take the fused path instead (`_forward_decode_cuda`: vLLM's
attention kernel plus one Triton scoring kernel, `tova_vllm.kernels`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from tova_vllm import policies
from tova_vllm.config import PolicyConfigError, RequestPolicy, request_policy
from tova_vllm.kv_spec import TovaAttentionSpec
from tova_vllm.policies import PolicyConfig

logger = init_logger(f"vllm.{__name__}")

BACKEND_NAME = "TOVA"

# The fused CUDA decode path (tova_vllm.kernels); TOVA_VLLM_CUDA_FAST_PATH=0
# falls back to the portable PyTorch path everywhere.
_CUDA_FAST_PATH = os.environ.get("TOVA_VLLM_CUDA_FAST_PATH", "1") != "0"
_cuda_logged = False

# The policy of the model being built in this process. Set by the attention
# selector seam (which sees the VllmConfig) for `customize_spec`, a classmethod
# that is called without one.
_active_policy: PolicyConfig | None = None


def set_active_policy(policy: PolicyConfig | None) -> None:
    global _active_policy
    _active_policy = policy


class TovaAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [
        torch.float16,
        torch.bfloat16,
        torch.float32,
    ]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[TovaAttentionImpl]:
        return TovaAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[TovaMetadataBuilder]:
        return TovaMetadataBuilder

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        if isinstance(spec, TovaAttentionSpec):
            return spec
        if _active_policy is None:
            raise RuntimeError(
                "tova-vllm: the TOVA attention backend was selected without an "
                "active kv_policy (internal error)"
            )
        return TovaAttentionSpec(
            block_size=spec.block_size,
            num_kv_heads=spec.num_kv_heads,
            head_size=spec.head_size,
            head_size_v=spec.head_size_v,
            dtype=spec.dtype,
            kv_quant_mode=spec.kv_quant_mode,
            dcp_sharded=spec.dcp_sharded,
            max_tp_shards=spec.max_tp_shards,
            kv_budget=_active_policy.budget,
            kv_policy=_active_policy.name,
            kv_num_sinks=_active_policy.num_sinks,
            kv_h2o_recent_ratio=_active_policy.h2o_recent_ratio,
        )


POLICY_CODES = {name: i for i, name in enumerate(policies.POLICIES)}


@dataclass
class EvictGroup:
    """Decode rows of one policy that evict this step (indices into the
    step's decode rows) and their per-row options."""

    name: str
    rows: torch.Tensor  # [E] positions in the DecodeBatch's evict_rows
    batch_rows: torch.Tensor  # [E] rows of the DecodeBatch
    invalid: torch.Tensor  # [E, nb*bs] slots that do not compete
    blocks: torch.Tensor | None  # [E, nb] the rows' blocks (policies that rank by position)
    num_sinks: torch.Tensor  # [E] sink
    recent: torch.Tensor  # [E] h2o: most recent positions protected


@dataclass
class DecodeBatch:
    """One wave: one token (after the bulk prompt) of each of its rows, as
    index tensors every layer reuses: all of them attend and evict at once."""

    token_idx: torch.Tensor  # [R] row's token in the step's flattened tokens
    tokens: torch.Tensor | slice  # token_idx, or the same as a slice (plain decode: cheaper)
    position: torch.Tensor  # [R] the new token's position
    write_block: torch.Tensor  # [R] where the new token goes: slot min(pos, k)
    write_off: torch.Tensor
    write_flat: torch.Tensor  # [R * Hkv] the new tokens' slots in a flattened side table
    write_pos: torch.Tensor  # [R * Hkv] int32 their positions
    blocks: torch.Tensor  # [R, nb] each row's blocks holding slots 0..nb*bs-1
    invalid: torch.Tensor  # [R, nb*bs] slots past the row's 0..min(pos, k)
    evict_rows: torch.Tensor  # [E] rows (of R) that hold k + 1 slots: evict one
    evict_blocks: torch.Tensor  # [E, nb] their blocks
    scratch_block: torch.Tensor  # [E] slot k of those rows
    scratch_off: torch.Tensor
    scratch_flat: torch.Tensor  # [E * Hkv] the scratch slots in a flattened side table
    heads: torch.Tensor  # [1, Hkv] 0..Hkv-1
    groups: list[EvictGroup]  # evict rows by policy, as positions in evict_rows
    one_group: bool  # every row evicts, all with one policy: no per-group indexing
    h2o_rows: torch.Tensor | None  # [R_h] rows (of R) accumulating attention
    h2o_write: tuple | None  # their new tokens' (block, offset)
    h2o_index: tuple | None  # index of their slots into a [num_blocks, Hkv, bs] table
    # For the CUDA fast path (TOVA rows only): whole block-table rows, each
    # row's held slots and budget, and the largest budget (a host int).
    table: torch.Tensor  # [R, max_blocks]
    held: torch.Tensor  # [R]
    budget: torch.Tensor  # [R]
    max_budget: int
    all_tova: bool


@dataclass
class TovaMetadata:
    """One step's batch, shared by every layer of the step."""

    num_reqs: int
    num_actual_tokens: int
    query_start: list[int]  # num_reqs + 1
    num_computed: list[int]  # tokens of each request processed before this step
    num_prompt: list[int]  # prompt tokens processed in bulk (0: streamed prompt)
    request_policies: list[RequestPolicy]
    block_table: torch.Tensor  # [num_reqs, max_blocks]
    block_size: int
    bulk_rows: list[int]  # rows with bulk prompt tokens in this step, one by one
    waves: list[DecodeBatch]  # then the tokens after the prompt, wave by wave


class TovaMetadataBuilder(AttentionMetadataBuilder[TovaMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size
        self.num_kv_heads = kv_cache_spec.num_kv_heads
        self.engine_policy = kv_cache_spec.engine_policy
        # Bound by the model-runner seam: the runner's input batch holds each
        # request's prompt length, which CommonAttentionMetadata lacks, and its
        # requests' sampling params (per-request settings).
        self.runner = None
        self._policies: dict[str, tuple[object, RequestPolicy]] = {}

    def bind_runner(self, runner) -> None:
        self.runner = runner

    def _request_policy(self, req_id: str) -> RequestPolicy:
        params = self.runner.requests[req_id].sampling_params
        extra = params.extra_args if params is not None else None
        cached = self._policies.get(req_id)
        if cached is not None and cached[0] is extra:
            return cached[1]
        try:
            rp = request_policy(self.engine_policy, extra)
        except PolicyConfigError as e:  # rejected by the API layer; never here
            logger.error("tova-vllm: request %s: %s; using the engine's policy", req_id, e)
            rp = RequestPolicy(self.engine_policy)
        self._policies[req_id] = (extra, rp)
        return rp

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> TovaMetadata:
        cm = common_attn_metadata
        if self.runner is None:
            raise RuntimeError(
                "tova-vllm: the TOVA metadata builder has no model runner bound; "
                "the model-runner seam (tova_vllm.patch.model_runner) did not run"
            )
        n = cm.num_reqs
        query_start = cm.query_start_loc_cpu[: n + 1].tolist()
        seq_lens = cm.seq_lens_cpu_upper_bound
        if seq_lens is None:
            seq_lens = cm.seq_lens.cpu()
        seq_lens = seq_lens[:n].tolist()
        num_computed = [seq_lens[i] - (query_start[i + 1] - query_start[i]) for i in range(n)]
        req_ids = self.runner.input_batch.req_ids[:n]
        rps = [self._request_policy(r) for r in req_ids]
        if len(self._policies) > 2 * max(n, 64):  # forget requests that left
            live = set(req_ids)
            self._policies = {k: v for k, v in self._policies.items() if k in live}
        num_prompt = self.runner.input_batch.num_prompt_tokens_cpu_tensor[:n].tolist()
        # A streamed prompt's first `budget` tokens evict nothing: one causal
        # pass computes them exactly as token-by-token would (the reference's
        # score_nll does the same).
        num_prompt = [min(p, rp.policy.budget) if rp.stream_prompt else p for rp, p in zip(rps, num_prompt)]
        bulk_rows, sequential = [], []  # (row, first token index, its position, count)
        for r in range(n):
            q_len, first = query_start[r + 1] - query_start[r], num_computed[r]
            n_bulk = max(0, min(first + q_len, num_prompt[r]) - first)
            if n_bulk:
                bulk_rows.append(r)
            if q_len > n_bulk:
                sequential.append((r, query_start[r] + n_bulk, first + n_bulk, q_len - n_bulk))
        block_table = cm.block_table_tensor[:n]
        num_waves = max((c for *_, c in sequential), default=0)
        waves = []
        for j in range(num_waves):
            # Rows gather whole blocks up to the wave's longest row: bucket rows
            # by their block count (powers of two) so a small budget is not
            # padded to a large one.
            buckets: dict[int, list] = {}
            for r, t, p, c in sequential:
                if c > j:
                    nb = min(p + j, rps[r].policy.budget) // self.block_size + 1
                    buckets.setdefault(nb.bit_length(), []).append((r, t + j, p + j))
            waves.extend(self._decode_batch(entries, rps, block_table) for entries in buckets.values())
        return TovaMetadata(
            num_reqs=n,
            num_actual_tokens=cm.num_actual_tokens,
            query_start=query_start,
            num_computed=num_computed,
            num_prompt=num_prompt,
            request_policies=rps,
            block_table=block_table,
            block_size=self.block_size,
            bulk_rows=bulk_rows,
            waves=waves,
        )

    def _decode_batch(self, entries, rps, block_table) -> DecodeBatch:
        """``entries``: (row, token index in the step, position) per row."""
        device = block_table.device
        bs = self.block_size
        rows = [r for r, _, _ in entries]
        budget_list = [rps[r].policy.budget for r in rows]
        held_list = [min(p, k) for (_, _, p), k in zip(entries, budget_list)]
        held = torch.tensor(held_list, device=device)
        table = block_table[torch.tensor(rows, device=device)]
        num_blocks = max(held_list) // bs + 1
        # Past a row's last block, repeat it: every index is a block of the row.
        last_block = torch.div(held, bs, rounding_mode="floor").unsqueeze(1)
        block_idx = torch.minimum(torch.arange(num_blocks, device=device).unsqueeze(0), last_block)
        slots = torch.arange(num_blocks * bs, device=device).unsqueeze(0)
        write = held.unsqueeze(1)
        evict_list = [i for i, (h, k) in enumerate(zip(held_list, budget_list)) if h == k]
        evict_rows = torch.tensor(evict_list, dtype=torch.long, device=device)
        scratch = torch.tensor([[budget_list[i]] for i in evict_list], dtype=torch.long, device=device)
        scratch = scratch.reshape(-1, 1)
        by_name: dict[str, list[int]] = {}
        for e, i in enumerate(evict_list):
            by_name.setdefault(rps[rows[i]].policy.name, []).append(e)
        blocks = torch.gather(table, 1, block_idx)
        invalid = slots > held.unsqueeze(1)
        # Everything below is per wave, shared by all layers: index once here.
        groups = []
        for name, members in by_name.items():
            pols = [rps[rows[evict_list[e]]].policy for e in members]
            batch_rows = torch.tensor([evict_list[e] for e in members], dtype=torch.long, device=device)
            groups.append(
                EvictGroup(
                    name=name,
                    rows=torch.tensor(members, dtype=torch.long, device=device),
                    batch_rows=batch_rows,
                    invalid=invalid[batch_rows],
                    blocks=None if name == "tova" else blocks[batch_rows],
                    num_sinks=torch.tensor([p.num_sinks for p in pols], device=device),
                    recent=torch.tensor([p.h2o_recent for p in pols], device=device),
                )
            )
        h2o = [i for i, r in enumerate(rows) if rps[r].policy.name == "h2o"]
        write_block = torch.gather(table, 1, torch.div(write, bs, rounding_mode="floor")).flatten()
        write_off = (write % bs).flatten()
        hkv = self.num_kv_heads
        heads = torch.arange(hkv, device=device).unsqueeze(0)
        tokens = [t for _, t, _ in entries]
        token_idx = torch.tensor(tokens, device=device)
        contiguous = tokens == list(range(tokens[0], tokens[0] + len(tokens)))
        h2o_rows = h2o_write = h2o_index = None
        if h2o:
            h2o_rows = torch.tensor(h2o, dtype=torch.long, device=device)
            h2o_write = (write_block[h2o_rows], write_off[h2o_rows])
            blocks_h = blocks[h2o_rows]
            h2o_index = (
                blocks_h.repeat_interleave(bs, dim=1)[:, None, :],
                heads[:, :, None],
                torch.arange(bs, device=device).repeat(num_blocks)[None, None, :],
            )
        position = torch.tensor([p for _, _, p in entries], device=device)
        scratch_block = torch.gather(table[evict_rows], 1, torch.div(scratch, bs, rounding_mode="floor")).flatten()
        return DecodeBatch(
            token_idx=token_idx,
            tokens=slice(tokens[0], tokens[0] + len(tokens)) if contiguous else token_idx,
            position=position,
            write_block=write_block,
            write_off=write_off,
            write_flat=((write_block.unsqueeze(1) * hkv + heads) * bs + write_off.unsqueeze(1)).flatten(),
            write_pos=position.to(torch.int32).unsqueeze(1).expand(-1, hkv).flatten(),
            blocks=blocks,
            invalid=invalid,
            evict_rows=evict_rows,
            evict_blocks=blocks[evict_rows],
            scratch_block=scratch_block,
            scratch_off=(scratch % bs).flatten(),
            scratch_flat=((scratch_block.unsqueeze(1) * hkv + heads) * bs + (scratch % bs)).flatten(),
            heads=heads,
            groups=groups,
            one_group=len(groups) == 1 and len(evict_list) == len(rows),
            h2o_rows=h2o_rows,
            h2o_write=h2o_write,
            h2o_index=h2o_index,
            table=table,
            held=held,
            budget=torch.tensor(budget_list, device=device),
            max_budget=max(budget_list),
            all_tova=all(rps[r].policy.name == "tova" for r in rows),
        )


class TovaAttentionImpl(AttentionImpl[TovaMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **kwargs,
    ) -> None:
        for name, value in (
            ("alibi_slopes", alibi_slopes),
            ("sliding_window", sliding_window),
            ("logits_soft_cap", logits_soft_cap),
            ("kv_sharing_target_layer_name", kv_sharing_target_layer_name),
        ):
            if value:
                raise ValueError(
                    f"kv_policy does not support attention with {name} "
                    f"(got {value!r}); supported: plain causal decoder attention "
                    "(Llama-style MHA/GQA/MQA)"
                )
        if attn_type != AttentionType.DECODER:
            raise ValueError(
                f"kv_policy supports decoder attention only; got attn_type={attn_type!r}"
            )
        if _active_policy is None:
            raise RuntimeError("tova-vllm: no active kv_policy (internal error)")
        self.policy = _active_policy
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.num_queries_per_kv = num_heads // num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self._tp_size: int | None = None
        # Side tables (see the module docstring): [num_blocks, num_kv_heads, block_size].
        self.slot_pos: torch.Tensor | None = None
        self.slot_score: torch.Tensor | None = None

    # -- shared pieces -------------------------------------------------------

    def _side_tables(self, kv_cache: torch.Tensor) -> None:
        shape = tuple(kv_cache.shape[:3])
        if self.slot_pos is None or tuple(self.slot_pos.shape) != shape or self.slot_pos.device != kv_cache.device:
            self.slot_pos = torch.zeros(shape, dtype=torch.int32, device=kv_cache.device)
            self.slot_score = torch.zeros(shape, dtype=torch.float32, device=kv_cache.device)

    def _head_mean(self, probs: torch.Tensor | None) -> torch.Tensor | None:
        """``[..., Hq_local, n]`` -> TOVA's mean over ALL the layer's query
        heads, identical on every TP rank."""
        if self._tp_size is None:
            from vllm.distributed import get_tensor_model_parallel_world_size

            self._tp_size = get_tensor_model_parallel_world_size()
        if probs is None:
            return None
        if self._tp_size == 1:
            return policies.head_average(probs)
        from vllm.distributed import tensor_model_parallel_all_reduce

        total = tensor_model_parallel_all_reduce(probs.float().sum(dim=-2).contiguous())
        return total / (probs.shape[-2] * self._tp_size)

    def _priority(
        self,
        name: str,
        last_probs: torch.Tensor,
        pos: torch.Tensor,
        score: torch.Tensor | None,
        newest: torch.Tensor,
        num_sinks: torch.Tensor,
        recent: torch.Tensor,
    ) -> torch.Tensor:
        """Keep priority per candidate slot, ``[E, G, n]`` (G = 1: one choice for
        all KV heads; G = num_kv_heads: H2O). ``last_probs`` ``[E, Hq, n]``,
        ``pos``/``score`` ``[E, Hkv, n]``, per-row ``newest``/``num_sinks``/
        ``recent`` ``[E]``. Slots outside a row's candidates are masked by the
        caller."""
        if name == "tova":
            return self._head_mean(last_probs).to(torch.float64).unsqueeze(1)
        if name == "window":
            return policies.window_priority(pos[:, :1])
        if name == "sink":
            p = pos[:, :1]
            protected = policies.sink_protected(p, num_sinks[:, None, None])
            return policies.masked_priority(policies.window_priority(p), protected)
        if name == "h2o":
            protected = policies.recent_protected(pos, newest[:, None, None], recent[:, None, None])
            return policies.masked_priority(score, protected)
        raise ValueError(f"unknown kv_policy {name!r}")  # pragma: no cover (validated)

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: TovaMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("TOVA backend: fused output quantization")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        self._side_tables(kv_cache)
        m = attn_metadata
        # Bulk prompt parts first: a recomputing request's later tokens need its
        # prompt reduced.
        for r in m.bulk_rows:
            start, end = m.query_start[r], m.query_start[r + 1]
            self._forward_prompt(
                m.request_policies[r].policy,
                query[start:end],
                key[start:end],
                value[start:end],
                kv_cache,
                m.block_table[r],
                m.block_size,
                m.num_computed[r],
                m.num_prompt[r],
                output[start:end],
            )
        for wave in m.waves:
            self._forward_decode(wave, query, key, value, kv_cache, output)
        return output

    # -- one wave: one token of each of its rows, all at once --------------

    def _forward_decode(self, d: DecodeBatch, query, key, value, kv_cache, output) -> None:
        if d.all_tova and query.is_cuda and _CUDA_FAST_PATH:
            return self._forward_decode_cuda(d, query, key, value, kv_cache, output)
        rows, dim, hkv = d.token_idx.shape[0], self.head_size, self.num_kv_heads
        q = query[d.tokens]  # [R, Hq, D]
        kv_cache[d.write_block, :, d.write_off, :] = torch.cat(
            (key[d.tokens], value[d.tokens]), dim=-1
        ).to(kv_cache.dtype)
        # The side tables are ours (contiguous): flat slot indices, cheaper than
        # advanced indexing.
        self.slot_pos.view(-1).index_copy_(0, d.write_flat, d.write_pos)
        # Whole blocks, KV heads first: one contiguous gather [Hkv, R, n, 2D]
        # that the batched matmuls read in place (no transposed copy).
        kv = kv_cache.transpose(0, 1)[:, d.blocks].flatten(2, 3).to(q.dtype)
        keys, values = kv[..., :dim], kv[..., dim:]
        qg = q.view(rows, hkv, self.num_queries_per_kv, dim).transpose(0, 1)  # [Hkv, R, G, D]
        scores = torch.matmul(qg, keys.transpose(-1, -2)) * self.scale  # [Hkv, R, G, n]
        # where, not add: slots past a row's last may hold anything. Their
        # probability is then exactly 0, and 0 times their value adds nothing:
        # vLLM zeroes the KV pool when it allocates it and every later write is
        # a model's K/V, so no slot holds an inf or NaN to spoil the sum.
        scores = scores.masked_fill(d.invalid[None, :, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        attn = torch.matmul(probs.to(q.dtype), values)  # [Hkv, R, G, D]
        output[d.tokens] = attn.transpose(0, 1).reshape(rows, self.num_heads, dim).to(output.dtype)
        probs = probs.transpose(0, 1)  # [R, Hkv, G, n]

        n = probs.shape[-1]
        score = None
        if d.h2o_rows is not None:  # accumulate, as the reference: score + this query's
            h = d.h2o_rows
            self.slot_score[d.h2o_write[0], :, d.h2o_write[1]] = 0.0
            # Slot by slot with accumulate: the repeated last block adds the
            # zero probabilities of invalid slots, a no-op, where a block-wise
            # write-back of duplicates would race.
            per_kv = probs[h].mean(dim=2)  # mean over each KV head's query heads
            self.slot_score.index_put_(d.h2o_index, per_kv, accumulate=True)
            acc = self._table_rows(self.slot_score, d.blocks[h])
            score = torch.zeros(rows, hkv, n, dtype=torch.float32, device=acc.device)
            score[h] = acc
        if d.evict_rows.numel() == 0:
            return
        e_rows = d.evict_rows
        newest = d.position[e_rows]
        victim = None if d.one_group else torch.empty(e_rows.numel(), hkv, dtype=torch.long, device=probs.device)
        for g in d.groups:
            pri = self._priority(
                g.name,
                (probs if d.one_group else probs[g.batch_rows]).reshape(-1, self.num_heads, n),
                # Positions only for the policies that rank by them (not TOVA's hot path).
                None if g.blocks is None else self._table_rows(self.slot_pos, g.blocks),
                None if score is None else score[g.batch_rows],
                newest[g.rows],
                g.num_sinks,
                g.recent,
            )
            # Only the row's k + 1 slots compete.
            pri = pri.masked_fill(g.invalid[:, None, :], float("inf"))
            if d.one_group:
                victim = policies.evict_one(pri).expand(-1, hkv)
            else:
                victim[g.rows] = policies.evict_one(pri).expand(-1, hkv)
        # The scratch slot's token replaces the victim, per KV head (a self-copy
        # when the new token itself is evicted): no host sync, no branch.
        bs, heads = kv_cache.shape[2], d.heads
        dst_block = torch.gather(d.evict_blocks, 1, torch.div(victim, bs, rounding_mode="floor"))
        dst_off = victim % bs
        kv_cache[dst_block, heads, dst_off] = kv_cache[d.scratch_block.unsqueeze(1), heads, d.scratch_off.unsqueeze(1)]
        dst = ((dst_block * hkv + heads) * bs + dst_off).flatten()
        for table in (self.slot_pos, self.slot_score):
            flat = table.view(-1)
            flat.index_copy_(0, dst, flat.index_select(0, d.scratch_flat))

    def _forward_decode_cuda(self, d: DecodeBatch, query, key, value, kv_cache, output) -> None:
        """TOVA rows on CUDA: vLLM's attention kernel (FlashAttention, else its
        Triton decode attention) with the softmax LSE, then one fused Triton
        kernel scoring the kept slots in the paged cache and picking the victim
        (`tova_vllm.kernels`); no host sync, no loop over rows."""
        from tova_vllm.kernels import tova_decode_step

        global _cuda_logged
        if not _cuda_logged:
            logger.info("tova-vllm: CUDA fast path for TOVA decode rows (fused Triton scoring)")
            _cuda_logged = True
        all_reduce = None
        self._head_mean(None)  # learns the TP size
        if self._tp_size > 1:
            from vllm.distributed import tensor_model_parallel_all_reduce

            all_reduce = tensor_model_parallel_all_reduce
        out, victim = tova_decode_step(
            query[d.token_idx],
            key[d.token_idx],
            value[d.token_idx],
            kv_cache,
            d.table.to(torch.int32),
            (d.held + 1).to(torch.int32),
            d.budget,
            self.scale,
            all_reduce=all_reduce,
            num_heads_total=self.num_heads * self._tp_size,
            max_budget=d.max_budget,
        )
        output[d.token_idx] = out.to(output.dtype)
        # Positions follow their slots (other policies may reuse these blocks
        # later; they write before they read, but keep the tables coherent).
        bs = kv_cache.shape[2]
        rows = torch.arange(victim.shape[0], device=victim.device)
        self.slot_pos[d.write_block, :, d.write_off] = d.position.to(torch.int32).unsqueeze(1)
        dst = (d.table[rows, torch.div(victim, bs, rounding_mode="floor")].long(), slice(None), victim % bs)
        self.slot_pos[dst] = self.slot_pos[d.write_block, :, d.write_off]

    @staticmethod
    def _table_rows(table: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """``[R, nb]`` blocks of a side table -> ``[R, Hkv, nb * bs]``."""
        t = table[blocks]  # [R, nb, Hkv, bs]
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)

    # -- one request's bulk prompt tokens ----------------------------------

    def _forward_prompt(
        self, policy, q, k, v, kv_cache, blocks, block_size, first_pos, prompt_len, out
    ) -> None:
        """The chunk's prompt tokens (slots == positions, causal attention);
        after the prompt's last one, a prompt longer than the budget is reduced
        to it. Later tokens of the chunk go through the waves."""
        key_cache, value_cache = kv_cache.split(self.head_size, dim=-1)
        prompt_end = min(first_pos + q.shape[0], prompt_len)
        n = prompt_end - first_pos
        slots = torch.arange(first_pos, prompt_end, device=q.device)
        self._write(kv_cache, blocks, block_size, slots, k[:n], v[:n], policy)
        probs = self._attend_prefill(
            q[:n], key_cache, value_cache, blocks, block_size, first_pos, prompt_end, out[:n]
        )
        if policy.name == "h2o":
            self._accumulate(probs, blocks, block_size, torch.arange(prompt_end, device=q.device))
        if prompt_end == prompt_len and prompt_len > policy.budget:
            self._reduce_prompt(policy, probs[:, -1, :], kv_cache, blocks, block_size, prompt_len)

    def _slot_index(self, blocks: torch.Tensor, block_size: int, slots: torch.Tensor):
        return blocks[torch.div(slots, block_size, rounding_mode="floor")], slots % block_size

    def _write(self, kv_cache, blocks, block_size, slots, k, v, policy) -> None:
        """Prompt tokens into ``slots`` (== their positions; all KV heads), with
        their positions and, for H2O, a zero score."""
        b, o = self._slot_index(blocks, block_size, slots)
        kv_cache[b, :, o, :] = torch.cat((k, v), dim=-1).to(kv_cache.dtype)
        self.slot_pos[b, :, o] = slots.to(torch.int32).unsqueeze(1)
        if policy.name == "h2o":
            self.slot_score[b, :, o] = 0.0

    def _gather(self, key_cache, value_cache, blocks, block_size, slots):
        b, o = self._slot_index(blocks, block_size, slots)
        return key_cache[b, :, o, :], value_cache[b, :, o, :]  # [n, Hkv, D]

    def _head_slots(self, blocks, block_size, slots_hn: torch.Tensor):
        """``[Hkv, n]`` slots per KV head -> index tuple into a [nb, Hkv, bs] table."""
        b, o = self._slot_index(blocks, block_size, slots_hn)
        heads = torch.arange(self.num_kv_heads, device=slots_hn.device).unsqueeze(1)
        return b, heads.expand_as(b), o

    def _accumulate(self, probs, blocks, block_size, slots) -> None:
        """H2O: add this step's attention (mean over each KV head's query heads,
        summed over the step's queries) to the slots' scores, in the reference's
        op order (`tova_vllm.reference.EvictionLayer.finish_step`)."""
        per_kv = policies.head_average(probs.unsqueeze(0).transpose(1, 2), num_kv_heads=self.num_kv_heads)
        b, o = self._slot_index(blocks, block_size, slots)
        self.slot_score[b, :, o] = (self.slot_score[b, :, o].transpose(0, 1) + per_kv.sum(dim=1)[0]).transpose(0, 1)

    def _attention(self, q, keys, values, mask, out) -> torch.Tensor:
        """Eager attention in transformers' op order (matmul * scale, mask add,
        float32 softmax, cast, matmul). Returns probs [Hq, Tq, n] (float32)."""
        # [Hq, T, D] x [Hq, D, n]
        qh = q.transpose(0, 1)
        kh = keys.transpose(0, 1).repeat_interleave(self.num_queries_per_kv, dim=0)
        vh = values.transpose(0, 1).repeat_interleave(self.num_queries_per_kv, dim=0)
        scores = torch.matmul(qh, kh.transpose(1, 2).to(qh.dtype)) * self.scale
        if mask is not None:
            scores = scores + mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        attn = torch.matmul(probs.to(qh.dtype), vh.to(qh.dtype))  # [Hq, T, D]
        out.copy_(attn.transpose(0, 1).to(out.dtype))
        return probs

    def _attend_prefill(self, q, key_cache, value_cache, blocks, block_size, first_pos, prompt_end, out):
        slots = torch.arange(prompt_end, device=q.device)
        keys, values = self._gather(key_cache, value_cache, blocks, block_size, slots)
        q_pos = torch.arange(first_pos, prompt_end, device=q.device)
        mask = torch.zeros(q_pos.shape[0], prompt_end, dtype=q.dtype, device=q.device)
        mask.masked_fill_(slots.unsqueeze(0) > q_pos.unsqueeze(1), torch.finfo(q.dtype).min)
        return self._attention(q, keys, values, mask, out)

    def _candidates(self, policy, last_probs, blocks, block_size, n, newest) -> torch.Tensor:
        """Priority ``[G, n]`` of the request's slots ``0..n-1``."""
        dev = last_probs.device
        slots = torch.arange(n, device=dev)
        b, o = self._slot_index(blocks, block_size, slots)
        pos = self.slot_pos[b, :, o].transpose(0, 1).unsqueeze(0)  # [1, Hkv, n]
        score = self.slot_score[b, :, o].transpose(0, 1).unsqueeze(0) if policy.name == "h2o" else None
        one = lambda x: torch.tensor([x], device=dev)  # noqa: E731
        pri = self._priority(
            policy.name, last_probs.unsqueeze(0), pos, score, one(newest), one(policy.num_sinks),
            one(policy.h2o_recent),
        )
        return pri[0]

    def _reduce_prompt(self, policy, last_probs, kv_cache, blocks, block_size, prompt_len) -> None:
        """Keep `budget` of the prompt's slots, compacted into slots 0..k-1
        (per KV head for H2O), with their side-table entries."""
        budget = policy.budget
        priority = self._candidates(policy, last_probs, blocks, block_size, prompt_len, prompt_len - 1)
        kept = policies.keep_top(priority, budget).expand(self.num_kv_heads, budget)  # ascending, kept[i] >= i
        src = self._head_slots(blocks, block_size, kept)
        dest = self._head_slots(blocks, block_size, torch.arange(budget, device=kept.device).expand_as(kept))
        for table in (kv_cache, self.slot_pos, self.slot_score):
            table[dest] = table[src]
