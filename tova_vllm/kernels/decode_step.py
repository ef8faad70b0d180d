"""One TOVA decode step for all decode rows of a layer, on the device.

write the new token's K|V to its slot -> attention with LSE (see
`attention.select_attention` for which kernel) -> fused scoring (`scoring`)
-> copy the scratch slot over the victim. Fixed shapes given ``R`` and the
budget, no host sync, no loop over rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tova_vllm.kernels import attention, scoring


def tova_decode_step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    budget: int | torch.Tensor,
    scale: float,
    output: torch.Tensor | None = None,
    attn_impl: str | None = None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    num_heads_total: int | None = None,
    return_scores: bool = False,
    max_budget: int | None = None,
):
    """In place on ``kv_cache``; returns ``(output, victim)`` (and the
    head-averaged scores ``[R, budget + 1]`` with ``return_scores``).

    query [R, Hq, D], key/value [R, Hkv, D]: the decode rows' new token
    (views are fine, last dim contiguous). kv_cache [num_blocks, Hkv, bs, 2D]:
    the layer's cache. block_table [R, >= cdiv(budget + 1, bs)] int32: each
    row's blocks. budget: an int, or per-row budgets [R] (then ``max_budget``,
    a host int >= every budget, sizes the score columns; no sync). seq_lens [R] int32 = ``min(pos, budget) + 1``: the new
    token goes to slot ``seq_lens - 1`` and attends over slots ``0 ..
    seq_lens - 1``; rows with ``seq_lens == budget + 1`` evict the argmin of
    the head-averaged probabilities (ties -> lowest slot) and get the scratch
    slot ``budget`` copied there. For other rows ``victim = seq_lens - 1``
    (a self-copy). ``all_reduce`` (tensor parallel): applied to the per-slot
    head sums ``[R, max_budget + 1]`` float32 before the argmin, e.g. the TP
    group's all-reduce; ``num_heads_total`` is then the layer's query heads
    over all ranks (only used for the returned scores).
    """
    rows, _, dim = query.shape
    bs = kv_cache.shape[2]
    if isinstance(budget, torch.Tensor):
        if max_budget is None:
            raise ValueError("per-row budgets need max_budget (a host int), to avoid a sync")
        cols = max_budget + 1
    else:
        cols = budget + 1
    seq_lens = seq_lens.to(torch.int32)
    last = (seq_lens - 1).long()
    row_idx = torch.arange(rows, device=query.device)
    table = block_table.long()
    # 1. the new token's K|V into slot seq_lens - 1
    w_block = table[row_idx, torch.div(last, bs, rounding_mode="floor")]
    w_off = last % bs
    kv_cache[w_block, :, w_off, :] = torch.cat((key, value), dim=-1).to(kv_cache.dtype)
    # 2. attention over the kept slots and the new one, with LSE
    out, lse = attention.decode_attention(
        query, kv_cache, block_table, seq_lens, scale, cols, out=output, impl=attn_impl
    )
    # 3. fused scoring: head sums, (all-reduce,) argmin
    sums = scoring.head_sum(query, kv_cache[..., :dim], block_table, seq_lens, lse, scale, cols)
    if all_reduce is not None:
        sums = all_reduce(sums)
    victim = scoring.masked_argmin(sums, seq_lens)
    victim = torch.where(seq_lens == budget + 1, victim, last)
    # 4. scratch slot -> victim (whole slot, every KV head, K and V). The
    # right side is gathered before the write, so a self-copy is harmless.
    d_block = table[row_idx, torch.div(victim, bs, rounding_mode="floor")]
    kv_cache[d_block, :, victim % bs, :] = kv_cache[w_block, :, w_off, :]
    if return_scores:
        return out, victim, sums / float(num_heads_total or query.shape[1])
    return out, victim
