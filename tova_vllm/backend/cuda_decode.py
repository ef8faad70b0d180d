"""The CUDA decode path: a wave whose rows all run a policy the fused kernels
implement (TOVA) takes `tova_vllm.kernels.tova_decode_step`: vLLM's paged
attention with the softmax log-sum-exp over the held slots, the new token
merged in, one Triton kernel scoring the slots in place in the paged cache,
the argmin and the write of the new token into the victim slot -- no host
sync, no loop over rows. Same semantics as `tova_vllm.backend.decode`."""

from __future__ import annotations

import torch

from tova_vllm.backend.metadata import DecodeWave
from tova_vllm.backend.slots import SlotView


def forward_wave_cuda(layer, w: DecodeWave, query, key, value, view: SlotView, output) -> None:
    from tova_vllm.kernels import tova_decode_step

    table, held, budgets, max_budget = w.cuda
    cd, hkv = view.cache.dtype, layer.num_kv_heads
    new = torch.cat((key[w.tokens].to(cd), value[w.tokens].to(cd), w.new_side.expand(-1, hkv, -1)), dim=-1)
    out, _ = tova_decode_step(
        query[w.tokens],
        new,
        view.cache,
        table,
        held,
        budgets,
        layer.scale,
        max_budget=max_budget,
        all_reduce=layer.all_reduce,
        num_heads_total=layer.num_heads * layer.tp_size,
        attn_impl=layer.decode_attention_impl(query.dtype, cd),
    )
    if isinstance(w.tokens, slice):
        output[w.tokens].copy_(out)
    else:
        output.index_copy_(0, w.tokens, out.to(output.dtype))
