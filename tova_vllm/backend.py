"""Worker side: the attention backend that evicts.

Per layer and per request, with budget ``k`` (see `tova_vllm.kv_spec` for the
slot invariant): a prompt token at position ``p`` is written to slot ``p``;
after the prompt's last token, a prompt longer than ``k`` is reduced to the
``k`` tokens the policy keeps, compacted into slots ``0 .. k-1``. A token after
the prompt at position ``p`` is written to slot ``min(p, k)``, attends over the
slots ``0 .. min(p, k)``, and once ``k + 1`` slots are full the policy picks
the slot to free; the scratch slot ``k`` is copied there unless it is the one
evicted. Everything follows from positions, prompt lengths and the block table,
so nothing per request is remembered between steps: preemption (recompute),
requests moving inside the batch and requests leaving need no bookkeeping.

Tokens after the prompt are processed one at a time within a layer, so a
preempted request that recomputes its prompt and output in one chunk evicts
exactly as it did when decoding (each layer's result for a token depends only
on that layer's inputs for earlier tokens and its cache).

This is the portable PyTorch path (CPU, or any device); attention is computed
explicitly because the policy needs the probabilities.
"""

from __future__ import annotations

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
from tova_vllm.kv_spec import TovaAttentionSpec
from tova_vllm.policies import PolicyConfig

logger = init_logger(f"vllm.{__name__}")

BACKEND_NAME = "TOVA"

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
        )


@dataclass
class DecodeBatch:
    """The step's plain decode rows (one token, prompt already processed), as
    index tensors every layer reuses: all of them attend and evict at once."""

    token_idx: torch.Tensor  # [R] row's token in the step's flattened tokens
    write_block: torch.Tensor  # [R] where the new token goes: slot min(pos, k)
    write_off: torch.Tensor
    blocks: torch.Tensor  # [R, nb] each row's blocks holding slots 0..nb*bs-1
    valid: torch.Tensor  # [R, nb*bs] the row's slots 0..min(pos, k)
    evict_rows: torch.Tensor  # [E] rows (of R) that hold k + 1 slots: evict one
    scratch_block: torch.Tensor  # [E] slot k of those rows
    scratch_off: torch.Tensor


@dataclass
class TovaMetadata:
    """One step's batch, shared by every layer of the step."""

    num_reqs: int
    num_actual_tokens: int
    query_start: list[int]  # num_reqs + 1
    num_computed: list[int]  # tokens of each request processed before this step
    num_prompt: list[int]
    block_table: torch.Tensor  # [num_reqs, max_blocks]
    block_size: int
    other_rows: list[int]  # rows processed one by one (prefill chunks, recompute)
    decode: DecodeBatch | None


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
        # Bound by the model-runner seam: the runner's input batch holds each
        # request's prompt length, which CommonAttentionMetadata lacks.
        self.runner = None

    def bind_runner(self, runner) -> None:
        self.runner = runner

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
        num_prompt = self.runner.input_batch.num_prompt_tokens_cpu_tensor[:n].tolist()
        decode_rows, other_rows = [], []
        for r in range(n):
            is_decode = query_start[r + 1] - query_start[r] == 1 and num_computed[r] >= num_prompt[r]
            (decode_rows if is_decode else other_rows).append(r)
        block_table = cm.block_table_tensor[:n]
        return TovaMetadata(
            num_reqs=n,
            num_actual_tokens=cm.num_actual_tokens,
            query_start=query_start,
            num_computed=num_computed,
            num_prompt=num_prompt,
            block_table=block_table,
            block_size=self.block_size,
            other_rows=other_rows,
            decode=self._decode_batch(decode_rows, query_start, num_computed, block_table),
        )

    def _decode_batch(self, rows, query_start, num_computed, block_table) -> DecodeBatch | None:
        if not rows:
            return None
        device = block_table.device
        budget = self.kv_cache_spec.kv_budget
        bs = self.block_size
        held = torch.tensor([min(num_computed[r], budget) for r in rows], device=device)
        table = block_table[torch.tensor(rows, device=device)]
        num_blocks = int(held.max()) // bs + 1
        # Past a row's last block, repeat it: every index is a block of the row.
        last_block = torch.div(held, bs, rounding_mode="floor").unsqueeze(1)
        block_idx = torch.minimum(torch.arange(num_blocks, device=device).unsqueeze(0), last_block)
        slots = torch.arange(num_blocks * bs, device=device).unsqueeze(0)
        write = held.unsqueeze(1)
        evict_rows = torch.nonzero(held == budget).flatten()
        scratch = torch.full((evict_rows.numel(), 1), budget, device=device)
        return DecodeBatch(
            token_idx=torch.tensor([query_start[r] for r in rows], device=device),
            write_block=torch.gather(table, 1, torch.div(write, bs, rounding_mode="floor")).flatten(),
            write_off=(write % bs).flatten(),
            blocks=torch.gather(table, 1, block_idx),
            valid=slots <= held.unsqueeze(1),
            evict_rows=evict_rows,
            scratch_block=torch.gather(
                table[evict_rows], 1, torch.div(scratch, bs, rounding_mode="floor")
            ).flatten(),
            scratch_off=(scratch % bs).flatten(),
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
        # Logical per-layer view [num_blocks, num_kv_heads, block_size, K|V].
        key_cache, value_cache = kv_cache.split(self.head_size, dim=-1)
        m = attn_metadata
        if m.decode is not None:
            self._forward_decode(m.decode, query, key, value, kv_cache, output)
        for r in m.other_rows:
            start, end = m.query_start[r], m.query_start[r + 1]
            if end == start:
                continue
            self._forward_request(
                query[start:end],
                key[start:end],
                value[start:end],
                key_cache,
                value_cache,
                m.block_table[r],
                m.block_size,
                m.num_computed[r],
                m.num_prompt[r],
                output[start:end],
            )
        return output

    # -- all plain decode rows at once ------------------------------------

    def _forward_decode(self, d: DecodeBatch, query, key, value, kv_cache, output) -> None:
        rows, dim = d.token_idx.shape[0], self.head_size
        q = query[d.token_idx]  # [R, Hq, D]
        kv_cache[d.write_block, :, d.write_off, :] = torch.cat(
            (key[d.token_idx], value[d.token_idx]), dim=-1
        ).to(kv_cache.dtype)
        # Whole blocks (contiguous copies), then each row's slots 0..min(pos, k).
        kv = kv_cache[d.blocks]  # [R, nb, Hkv, bs, 2D]
        kv = kv.transpose(1, 2).reshape(rows, self.num_kv_heads, -1, kv.shape[-1]).to(q.dtype)
        keys, values = kv[..., :dim], kv[..., dim:]  # [R, Hkv, n, D]
        qg = q.view(rows, self.num_kv_heads, self.num_queries_per_kv, dim)
        scores = torch.matmul(qg, keys.transpose(-1, -2)) * self.scale  # [R, Hkv, G, n]
        # where, not add: slots past a row's last may hold anything, even NaN.
        scores = scores.masked_fill(~d.valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        values = values.masked_fill(~d.valid[:, None, :, None], 0.0)
        attn = torch.matmul(probs.to(q.dtype), values)  # [R, Hkv, G, D]
        output[d.token_idx] = attn.reshape(rows, self.num_heads, dim).to(output.dtype)
        if d.evict_rows.numel() == 0:
            return
        budget = self.policy.budget
        last = probs[d.evict_rows].reshape(-1, self.num_heads, probs.shape[-1])[..., : budget + 1]
        victim = policies.evict_one(self._priority(last, budget + 1))  # [E]
        # The scratch slot's token replaces the victim (a self-copy when the
        # new token itself is evicted): no host sync, no branch.
        bs = kv_cache.shape[2]
        dst_block = d.blocks[d.evict_rows, torch.div(victim, bs, rounding_mode="floor")]
        kv_cache[dst_block, :, victim % bs, :] = kv_cache[d.scratch_block, :, d.scratch_off, :]

    # -- one request -------------------------------------------------------

    def _forward_request(
        self, q, k, v, key_cache, value_cache, blocks, block_size, first_pos, prompt_len, out
    ) -> None:
        budget = self.policy.budget
        num_new = q.shape[0]
        # Prompt tokens of this chunk: slots == positions, causal attention.
        prompt_end = min(first_pos + num_new, prompt_len)
        n_prompt = max(prompt_end - first_pos, 0)
        if n_prompt > 0:
            slots = torch.arange(first_pos, prompt_end, device=q.device)
            self._write(key_cache, value_cache, blocks, block_size, slots, k[:n_prompt], v[:n_prompt])
            probs = self._attend_prefill(
                q[:n_prompt], key_cache, value_cache, blocks, block_size, first_pos, prompt_end, out[:n_prompt]
            )
            if prompt_end == prompt_len and prompt_len > budget:
                self._reduce_prompt(probs, key_cache, value_cache, blocks, block_size, prompt_len)
        # Tokens after the prompt, one at a time (see the module docstring).
        for i in range(n_prompt, num_new):
            pos = first_pos + i
            held = min(pos, budget)
            slot = torch.tensor([held], device=q.device)
            self._write(key_cache, value_cache, blocks, block_size, slot, k[i : i + 1], v[i : i + 1])
            all_slots = torch.arange(held + 1, device=q.device)
            keys, values = self._gather(key_cache, value_cache, blocks, block_size, all_slots)
            probs = self._attention(q[i : i + 1], keys, values, None, out[i : i + 1])
            if held == budget:
                self._evict_one(probs[:, -1, :], key_cache, value_cache, blocks, block_size)

    def _slot_index(self, blocks: torch.Tensor, block_size: int, slots: torch.Tensor):
        return blocks[torch.div(slots, block_size, rounding_mode="floor")], slots % block_size

    def _write(self, key_cache, value_cache, blocks, block_size, slots, k, v) -> None:
        b, o = self._slot_index(blocks, block_size, slots)
        key_cache[b, :, o, :] = k.to(key_cache.dtype)
        value_cache[b, :, o, :] = v.to(value_cache.dtype)

    def _gather(self, key_cache, value_cache, blocks, block_size, slots):
        b, o = self._slot_index(blocks, block_size, slots)
        return key_cache[b, :, o, :], value_cache[b, :, o, :]  # [n, Hkv, D]

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

    def _reduce_prompt(self, probs, key_cache, value_cache, blocks, block_size, prompt_len) -> None:
        """Keep `budget` of the prompt's slots, compacted into slots 0..k-1."""
        budget = self.policy.budget
        priority = self._priority(probs[:, -1, :], prompt_len)
        kept = policies.keep_top(priority, budget)  # ascending, kept[i] >= i
        keys, values = self._gather(key_cache, value_cache, blocks, block_size, kept)
        dest = torch.arange(budget, device=kept.device)
        self._write(key_cache, value_cache, blocks, block_size, dest, keys, values)

    def _priority(self, last_probs: torch.Tensor, n: int) -> torch.Tensor:
        if self.policy.name == "tova":
            return policies.head_average(last_probs)
        raise NotImplementedError(f"kv_policy={self.policy.name!r} in the vLLM backend")

    def _evict_one(self, last_probs, key_cache, value_cache, blocks, block_size) -> None:
        budget = self.policy.budget
        victim = int(policies.evict_one(self._priority(last_probs, budget + 1)))
        if victim != budget:
            src = torch.tensor([budget], device=last_probs.device)
            keys, values = self._gather(key_cache, value_cache, blocks, block_size, src)
            dst = torch.tensor([victim], device=last_probs.device)
            self._write(key_cache, value_cache, blocks, block_size, dst, keys, values)
