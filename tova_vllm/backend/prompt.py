"""The prompt path: one request's prompt segment (`planning.Segment`) per call.

1. The segment's K|V|side are written to its slots (after the ``ctx`` held).
2. Attention output from a fused, memory-efficient kernel, never a
   materialized ``[heads, chunk, prompt]`` matrix: on the CPU vLLM's own CPU
   attention over a packed copy of the segment's keys and values
   (`cpu_attention`), packed straight from the page where its slots lie in a
   few spans (`PromptSegment.page_spans`: a prefix-cache hit reads its cached
   blocks in place), else from a gather of the held slots; where vLLM's
   kernel is unusable PyTorch's flash attention, once over the held slots
   (no mask) and once causally over the segment itself, merged by their
   log-sum-exps; on CUDA the paged prefill kernel
   (`tova_vllm.kernels.prefill`: vLLM's FlashAttention through the block
   table) after the write.
3. Scoring computes only what the policy declares, in memory linear in the
   prompt: the last query's probabilities (one row per query head) for
   ``reads_attention``, on the CPU read from the packed keys while they are
   in the caches; column sums of the probabilities over every query of the
   segment for ``accumulates``, in query tiles of at most `TILE_BYTES` of
   scores; nothing for the others (positions, keys).
4. If the segment ends a chunk (or the prompt) with more than ``budget``
   slots held, the policy keeps ``budget`` of them, compacted into slots
   ``0 .. budget - 1``.
"""

from __future__ import annotations

import functools

import torch

from tova_vllm.backend import cpu_attention, workspace
from tova_vllm.backend.metadata import PromptSegment
from tova_vllm.backend.slots import SlotView
from tova_vllm.policies import Candidates, selection

# Scores (float32) of one query tile of the accumulated column sums stay
# under this: tile = TILE_BYTES // (4 * 2 * query heads * keys).
TILE_BYTES = 32 << 20


def write_segment(layer, seg: PromptSegment, key, value, view: SlotView) -> None:
    """The segment's K|V|side into its slots: straight into one range of
    slots where they lie in one (the usual case), else one indexed copy."""
    s, e = seg.plan.tok_start, seg.plan.tok_end
    cd, dim = view.cache.dtype, layer.head_size
    side = seg.side.expand(e - s, layer.num_kv_heads, -1)
    if seg.write_range is not None:
        dst = view.slots[seg.write_range[0] : seg.write_range[1]]
        if key.dtype == cd:
            torch.cat((key[s:e], value[s:e], side), dim=-1, out=dst)
        else:
            dst[..., :dim].copy_(key[s:e])
            dst[..., dim : 2 * dim].copy_(value[s:e])
            dst[..., 2 * dim :].copy_(side)
        return
    view.slots.index_copy_(0, seg.write_ids, torch.cat((key[s:e].to(cd), value[s:e].to(cd), side), dim=-1))


class _Held:
    """The held slots ``[ctx, Hkv, C]`` of a segment, gathered from the page
    on first use only (the CPU kernel path packs them straight from the page;
    scoring may need their positions or keys)."""

    def __init__(self, seg: PromptSegment, view: SlotView) -> None:
        self.seg, self.view, self._slots = seg, view, None

    def get(self) -> torch.Tensor | None:
        if self._slots is None and self.seg.plan.ctx:
            v = self.view
            self._slots = workspace.kept_buffer("held_slots", (self.seg.plan.ctx, *v.slots.shape[1:]), v.cache.dtype,
                                                v.slots.device)  # fmt: skip
            torch.index_select(v.slots, 0, self.seg.ctx_ids, out=self._slots)
        return self._slots


def forward_segment(layer, seg: PromptSegment, query, key, value, view: SlotView, output, written=False) -> None:
    """One segment (`written`: its K/V are in the cache already)."""
    p = seg.plan
    s, e = p.tok_start, p.tok_end
    cd = view.cache.dtype
    q, k, v = query[s:e], key[s:e], value[s:e]
    if not written:
        write_segment(layer, seg, key, value, view)
    scoring = p.reduce or seg.policy.accumulates
    held = _Held(seg, view)
    dest = output[s:e]
    packed = None
    if seg.table_row is not None and layer.prefill_attention_impl(q.dtype, cd) == "flash_attn":
        out = _attend_paged(layer, q, view, seg)
    elif q.device.type == "cpu" and (isa := cpu_attention.isa(q.dtype, layer.head_size)) is not None:
        packed = _pack(layer, seg, k, v, held, view, isa)
        # Straight into the layer's output where it can take it (saves a copy).
        into = dest if dest.is_contiguous() and dest.dtype == q.dtype else None
        out = cpu_attention.attend_packed(q, packed, layer.scale, into)
    else:
        out = _attend_torch(layer, q, k, v, held.get())
    if out is not dest:
        dest.copy_(out)
    if scoring:
        _score_and_reduce(layer, seg, q, k, held, view, packed)


def _attend_paged(layer, q, view: SlotView, seg: PromptSegment) -> torch.Tensor:
    """CUDA: vLLM's FlashAttention over the paged cache through the block
    table (its causal mask is bottom-right aligned: the segment's tokens were
    written right after the held slots)."""
    from tova_vllm.kernels import paged_prefill_attention

    c, n = seg.plan.length, seg.plan.ctx + seg.plan.length
    cu_q = torch.tensor([0, c], dtype=torch.int32).to(q.device, non_blocking=True)
    seq_k = torch.tensor([n], dtype=torch.int32).to(q.device, non_blocking=True)
    out, _ = paged_prefill_attention(q, view.cache, seg.table_row, cu_q, seq_k, layer.scale, c, n, impl="flash_attn")
    return out


def _pack(layer, seg: PromptSegment, k, v, held: _Held, view: SlotView, isa: str) -> cpu_attention.Packed:
    """The segment's keys and values (held slots, then its own) packed for
    vLLM's CPU attention: straight from the page where its slots lie in a
    few compact spans (written already; the page in the model's dtype),
    else from a gather of the held slots and the step's K/V."""
    dim, n = layer.head_size, seg.plan.ctx + seg.plan.length
    if seg.page_spans is not None and view.cache.dtype == k.dtype:
        parts = []
        for lo, hi, slots in seg.page_spans:
            span = view.slots[lo:hi]
            parts.append((span[..., :dim], span[..., dim : 2 * dim], slots))
        return cpu_attention.pack(parts, n, k.dtype, isa)
    ctx = held.get()
    keys, values = ((k,), (v,)) if ctx is None else ((ctx[..., :dim], k), (ctx[..., dim : 2 * dim], v))
    return cpu_attention.pack(cpu_attention.in_order(keys, values), n, k.dtype, isa)


def _attend_torch(layer, q, k, v, ctx) -> torch.Tensor:
    """``[c, Hq, D]``: the segment's queries over the held slots and
    themselves (causal), where vLLM's CPU kernel is not usable: on the CPU
    PyTorch's flash attention; elsewhere PyTorch's SDPA (memory-efficient
    kernels)."""
    dim = layer.head_size
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, c, D] (views, no copies)
    kh, vh = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
    if ctx is not None:
        kx = ctx[..., :dim].to(q.dtype).permute(1, 0, 2).unsqueeze(0)
        vx = ctx[..., dim : 2 * dim].to(q.dtype).permute(1, 0, 2).unsqueeze(0)
    if q.device.type == "cpu":
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out, lse = flash(qh, kh, vh, 0.0, True, scale=layer.scale)
        if ctx is not None:
            out_x, lse_x = flash(qh, kx, vx, 0.0, False, scale=layer.scale)
            total = torch.logaddexp(lse, lse_x)
            out = out.float() * torch.exp(lse - total).unsqueeze(-1) + out_x.float() * torch.exp(
                lse_x - total
            ).unsqueeze(-1)
        return out[0].transpose(0, 1).to(q.dtype)
    from torch.nn.attention.bias import causal_lower_right

    if ctx is not None:
        kh, vh = torch.cat((kx, kh), dim=2), torch.cat((vx, vh), dim=2)
    n, c = kh.shape[2], qh.shape[2]
    out = torch.nn.functional.scaled_dot_product_attention(
        qh, kh, vh, attn_mask=causal_lower_right(c, n), scale=layer.scale, enable_gqa=True
    )
    return out[0].transpose(0, 1)


def _score_and_reduce(layer, seg: PromptSegment, q, k, held: _Held, view: SlotView, packed) -> None:
    p, policy = seg.plan, seg.policy
    dim, hkv, group = layer.head_size, layer.num_kv_heads, layer.num_queries_per_kv
    all_ids = seg.all_ids

    @functools.cache
    def keys() -> torch.Tensor:  # [n, Hkv, D], model dtype; built only if asked for
        ctx = held.get()
        return k if ctx is None else torch.cat((ctx[..., :dim].to(q.dtype), k), dim=0)

    state = None
    if policy.accumulates:
        state = _accumulate(layer, seg, q, keys().permute(1, 2, 0), held.get(), view, all_ids)
    if not p.reduce:
        return
    last = None
    if policy.reads_attention:
        q_last = q[-1].view(hkv, group, dim)
        # From the packed copy where its layout is known (hot in the caches,
        # and no gather of the held keys); else from the keys.
        scores = packed.key_scores(q_last) if packed is not None else None
        if scores is None:
            scores = torch.matmul(q_last, keys().permute(1, 2, 0))  # [Hkv, G, n]
        last = torch.softmax(scores * layer.scale, dim=-1, dtype=torch.float32)

    def positions():
        pos = seg.positions.unsqueeze(1).expand(-1, hkv)
        ctx = held.get()
        if ctx is not None:
            pos = torch.cat((ctx[..., 2 * dim :].view(torch.int32)[..., 0].long(), pos), dim=0)
        return pos.transpose(0, 1).unsqueeze(0)  # [1, Hkv, n]

    view_c = Candidates(
        newest=seg.positions[-1:],
        budget=seg.budget,
        valid=seg.valid,
        num_kv_heads=hkv,
        attention=lambda: layer.head_mean(last, dims=(0, 1))[None, None, :],
        attention_per_kv_head=lambda: last.mean(dim=1).unsqueeze(0),
        positions=positions,
        keys=lambda: keys().transpose(0, 1).unsqueeze(0),
        state=state,
    )
    pri = selection.as_priority(policy.priority(view_c))
    if pri.dim() == 2:
        pri = pri.unsqueeze(1)
    kept = selection.keep_top(pri[0], p.budget)  # [G, min(n, budget)] ascending
    src = all_ids[kept]
    if kept.shape[0] == 1:  # one token set for every KV head: whole slots
        moved = workspace.kept_buffer("kept_slots", (src.shape[1], *view.slots.shape[1:]), view.cache.dtype,
                                      view.slots.device)  # fmt: skip
        torch.index_select(view.slots, 0, src[0], out=moved)
        if seg.dest_range is not None:
            view.slots[seg.dest_range[0] : seg.dest_range[1]].copy_(moved)
        else:
            view.slots.index_copy_(0, seg.dest_ids, moved)
    else:
        heads = torch.arange(hkv, device=q.device).unsqueeze(1)
        view.slots[seg.dest_ids.unsqueeze(0), heads] = view.slots[src, heads]


def _accumulate(layer, seg, q, kh, ctx, view: SlotView, all_ids) -> torch.Tensor:
    """The accumulated state ``[1, Hkv, n]`` after this segment's queries,
    also written to the slots' side channel."""
    p, dim, hkv, group = seg.plan, layer.head_size, layer.num_kv_heads, layer.num_queries_per_kv
    c, n = q.shape[0], kh.shape[-1]
    dev = q.device
    tile = max(1, TILE_BYTES // (8 * layer.num_heads * n))
    total = torch.zeros(hkv, n, dtype=torch.float32, device=dev)
    cols = torch.arange(n, device=dev)
    for t0 in range(0, c, tile):
        t1 = min(t0 + tile, c)
        qt = q[t0:t1].view(t1 - t0, hkv, group, dim).permute(1, 2, 0, 3)  # [Hkv, G, T, D]
        scores = torch.matmul(qt, kh.unsqueeze(1)) * layer.scale  # [Hkv, G, T, n]
        rows = torch.arange(t0, t1, device=dev) + p.ctx  # each query sees columns <= its own
        scores = scores.masked_fill((cols[None, :] > rows[:, None]), float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        total += probs.mean(dim=1).sum(dim=1)
    before = torch.zeros(hkv, n, dtype=torch.float32, device=dev)
    if ctx is not None:
        before[:, : p.ctx] = ctx[..., 2 * dim :].view(torch.int32)[..., 1:2].view(torch.float32)[..., 0].T
    state = seg.policy.accumulate(before.unsqueeze(0), total.unsqueeze(0))
    view.scores[all_ids] = state[0].T
    return state
