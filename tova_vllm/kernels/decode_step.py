"""One TOVA decode step for all decode rows of a layer, on the device.

attention over the held slots + the new token, with LSE (`attention`) ->
fused head-sum scoring (`scoring.head_sum`) -> [TP all-reduce] -> victim and
the one write (`scoring.select_and_write`). No scratch slot: the new token's
K|V|side arrives as ``new_slot`` and is written at most once, into the slot
it takes. Fixed shapes given ``R`` and ``max_budget``, no host sync, no loop
over rows (CUDA-graph capturable).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tova_vllm.kernels import attention, scoring
from tova_vllm.kernels.layout import check_kv_cache


def tova_decode_step(
    query: torch.Tensor,
    new_slot: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    held: torch.Tensor,
    budget: int | torch.Tensor,
    scale: float,
    *,
    max_budget: int,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    num_heads_total: int | None = None,
    output: torch.Tensor | None = None,
    attn_impl: str | None = None,
    return_scores: bool = False,
):
    """In place on ``kv_cache``; returns ``(out, victim)`` (and the
    head-averaged scores ``[R, max_budget + 1]`` with ``return_scores``).

    query [R, Hq, D]; new_slot [R, Hkv, C]: the new token's whole slot (K in
    ``[:D]``, V in ``[D:2D]``, side channel after), in the cache dtype;
    kv_cache [num_blocks, Hkv, block_size, C] (engine layout, see
    `layout`); block_table [R, nb] int32; held [R] int32 (>= 1): slots ``0 ..
    held - 1`` hold the row's kept tokens; budget: an int or [R] int32
    (held <= budget <= max_budget); max_budget: a host int, sizes the score
    columns ``max_budget + 1`` and the attention's split count.

    The query attends over the held slots plus the new token (one softmax
    over ``held + 1`` keys). Rows with ``held < budget`` write the new token
    into slot ``held`` (``victim = held``). Rows with ``held == budget``
    score column ``j`` (``j = held``: the new token) by the sum over the
    layer's query heads of its probability, take the argmin (ties -> lowest
    column: a cached slot goes before the new token) and write the new token
    into slot ``victim`` unless ``victim == held`` (the new token dropped,
    nothing written). ``all_reduce`` (tensor parallel) is applied once to
    the per-column sums ``[R, max_budget + 1]`` float32 before the argmin,
    e.g. the TP group's all-reduce, so every rank picks the same victim;
    ``num_heads_total`` (the layer's query heads over all ranks, default
    ``Hq``) only scales the returned scores. ``attn_impl``: see
    `attention.select_attention` (chosen once per shape family and cached
    when None).

    Returns ``out [R, Hq, D]`` in the query dtype (into ``output`` when
    given) and ``victim [R]`` int64."""
    if query.dim() != 3:
        raise ValueError(f"query must be [R, Hq, D]; got {tuple(query.shape)}")
    rows, hq, dim = query.shape
    check_kv_cache(kv_cache, dim)
    if held.shape != (rows,):
        raise ValueError(f"held must be [R={rows}]; got {tuple(held.shape)}")
    if isinstance(budget, torch.Tensor):
        if budget.shape != (rows,):
            raise ValueError(f"budget must be an int or [R={rows}]; got {tuple(budget.shape)}")
    else:
        if not 1 <= int(budget) <= max_budget:
            raise ValueError(f"budget {budget} must be in [1, max_budget={max_budget}]")
        budget = torch.full((rows,), int(budget), dtype=torch.int32, device=query.device)
    if new_slot.shape != (rows, kv_cache.shape[1], kv_cache.shape[3]):
        raise ValueError(
            f"new_slot must be [R, Hkv, C] = [{rows}, {kv_cache.shape[1]}, {kv_cache.shape[3]}]; "
            f"got {tuple(new_slot.shape)}"
        )
    if new_slot.dtype != kv_cache.dtype:
        new_slot = new_slot.to(kv_cache.dtype)
    impl = attn_impl or attention.select_attention(
        query.device, dim, kv_cache.shape[2], query.dtype, kv_cache.dtype
    )
    cols = max_budget + 1
    # 1. attention over the held slots and the new token, with LSE
    out, lse = attention.decode_attention(
        query, kv_cache, block_table, held, scale, max_budget, new_slot=new_slot, out=output, impl=impl
    )
    # 2. per-column head sums (column held = the new token)
    sums = scoring.head_sum(query, kv_cache, block_table, held, lse, scale, cols, new_slot=new_slot)
    if all_reduce is not None:
        sums = all_reduce(sums)
    # 3. victim + the one write
    victim = scoring.select_and_write(sums, held, budget, new_slot, kv_cache, block_table)
    if return_scores:
        return out, victim, sums / float(num_heads_total or hq)
    return out, victim
