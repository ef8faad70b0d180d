"""PyTorch reference of exactly what the kernels compute (the test oracle).

Same inputs, same layout (see `layout`: paged cache ``[num_blocks, Hkv,
block_size, C]``, K in ``[..., :D]``, V in ``[..., D:2D]``, a side channel
after), float32 arithmetic, a Python loop over rows. Slot ``s`` of row ``r``
lives in block ``block_table[r, s // bs]`` at offset ``s % bs``. Slow: for
tests and the GPU check only.
"""

from __future__ import annotations

import torch

from tova_vllm.kernels.layout import as_bits


def gather_slots(cache: torch.Tensor, block_table: torch.Tensor, row: int, n: int) -> torch.Tensor:
    """Slots ``0 .. n-1`` of one row: ``[n, Hkv, C]``."""
    bs = cache.shape[2]
    slots = torch.arange(n, device=cache.device)
    blocks = block_table[row, slots // bs].long()
    return cache[blocks, :, slots % bs, :]


def _write_slot(cache, block_table, row, slot, value) -> None:
    bs = cache.shape[2]
    block = int(block_table[row, slot // bs])
    as_bits(cache)[block, :, slot % bs, :] = as_bits(value.to(cache.dtype))


def cached_attention(q, kv_cache, block_table, seq_lens, scale):
    """Attention of one query per row over its cached slots ``0 .. seq_lens[r]
    - 1`` only: ``(out [R, Hq, D] float32, lse [R, Hq] float32)``."""
    rows, hq, dim = q.shape
    group = hq // kv_cache.shape[1]
    out = torch.zeros(rows, hq, dim, dtype=torch.float32, device=q.device)
    lse = torch.full((rows, hq), float("-inf"), dtype=torch.float32, device=q.device)
    for r in range(rows):
        n = int(seq_lens[r])
        if n == 0:
            continue
        kv = gather_slots(kv_cache, block_table, r, n).float().repeat_interleave(group, dim=1)
        s = torch.einsum("hd,nhd->hn", q[r].float(), kv[..., :dim]) * scale
        lse[r] = torch.logsumexp(s, dim=-1)
        out[r] = torch.einsum("hn,nhd->hd", torch.exp(s - lse[r][:, None]), kv[..., dim : 2 * dim])
    return out, lse


def decode_probs(q, new_slot, kv_cache, block_table, held, scale):
    """Per row: ``(probs [Hq, held + 1], values [held + 1, Hq, D])`` float32,
    column ``held`` = the new token."""
    rows, hq, dim = q.shape
    group = hq // kv_cache.shape[1]
    res = []
    for r in range(rows):
        n = int(held[r])
        slots = torch.cat((gather_slots(kv_cache, block_table, r, n), new_slot[r : r + 1].to(kv_cache.dtype)))
        kv = slots.float().repeat_interleave(group, dim=1)  # [n + 1, Hq, C]
        s = torch.einsum("hd,nhd->hn", q[r].float(), kv[..., :dim]) * scale
        res.append((torch.softmax(s, dim=-1), kv[..., dim : 2 * dim]))
    return res


def decode_step(
    query, new_slot, kv_cache, block_table, held, budget, scale, *, max_budget,
    all_reduce=None, num_heads_total=None, output=None, attn_impl=None, return_scores=False,
):
    """`tova_decode_step`'s semantics, in place on ``kv_cache``: attention
    over the held slots + the new token; rows below their budget write the
    new token into slot ``held``; rows at it take the argmin of the per-column
    head sums (after ``all_reduce``; ties -> lowest column, ``torch.argmin``
    picks the first) and write the new token there unless it is the new
    token's own column ``held``. Returns ``(out [R, Hq, D] in the query
    dtype, victim [R] int64[, head-averaged scores [R, max_budget + 1]])``.
    ``output`` / ``attn_impl`` are accepted for signature parity, unused."""
    rows, hq, dim = query.shape
    cols = max_budget + 1
    budgets = budget.tolist() if isinstance(budget, torch.Tensor) else [int(budget)] * rows
    out = torch.empty(rows, hq, dim, dtype=torch.float32, device=query.device)
    sums = torch.full((rows, cols), float("inf"), dtype=torch.float32, device=query.device)
    for r, (p, v) in enumerate(decode_probs(query, new_slot, kv_cache, block_table, held, scale)):
        out[r] = torch.einsum("hn,nhd->hd", p, v)
        sums[r, : p.shape[1]] = p.sum(0)
    if all_reduce is not None:
        sums = all_reduce(sums)
    victim = torch.empty(rows, dtype=torch.int64, device=query.device)
    for r in range(rows):
        h = int(held[r])
        if h < budgets[r]:
            victim[r] = h
        else:
            victim[r] = int(torch.argmin(sums[r, : h + 1]))
        if int(victim[r]) < h or h < budgets[r]:
            _write_slot(kv_cache, block_table, r, int(victim[r]), new_slot[r])
    res = (out.to(query.dtype), victim)
    if return_scores:
        res += (sums / float(num_heads_total or hq),)
    return res


def head_sum(q, kv_cache, block_table, seq_lens, lse, scale, num_cols, new_slot=None):
    """``[R, num_cols]`` float32: per column, the sum over the local query
    heads of ``exp(q.k * scale - lse)``; columns ``< seq_lens``: cached slots,
    column ``seq_lens`` with ``new_slot``: the new token; +inf after."""
    rows, hq, dim = q.shape
    group = hq // kv_cache.shape[1]
    out = torch.full((rows, num_cols), float("inf"), dtype=torch.float32, device=q.device)
    for r in range(rows):
        n = int(seq_lens[r])
        keys = gather_slots(kv_cache, block_table, r, n)
        if new_slot is not None:
            keys = torch.cat((keys, new_slot[r : r + 1].to(kv_cache.dtype)))
        keys = keys[: num_cols, :, :dim].float().repeat_interleave(group, dim=1)
        if keys.shape[0] == 0:
            continue
        s = torch.einsum("hd,nhd->hn", q[r].float(), keys) * scale
        out[r, : keys.shape[0]] = torch.exp(s - lse[r].float()[:, None]).sum(0)
    return out


def prefill_attention(q, kv_cache, block_table, cu_seqlens_q, seq_lens_k, scale):
    """Causal attention, bottom-right aligned: query ``i`` of a row with
    ``q_len`` queries and ``k_len`` keys sees keys ``0 .. k_len - q_len + i``.
    Dense per row (memory quadratic: small shapes only). Returns ``(out [T,
    Hq, D] float32, lse [T, Hq] float32)``."""
    total, hq, dim = q.shape
    group = hq // kv_cache.shape[1]
    out = torch.zeros(total, hq, dim, dtype=torch.float32, device=q.device)
    lse = torch.full((total, hq), float("-inf"), dtype=torch.float32, device=q.device)
    for r in range(block_table.shape[0]):
        q0, q1, n_k = int(cu_seqlens_q[r]), int(cu_seqlens_q[r + 1]), int(seq_lens_k[r])
        n_q = q1 - q0
        if n_q == 0:
            continue
        kv = gather_slots(kv_cache, block_table, r, n_k).float().repeat_interleave(group, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[q0:q1].float(), kv[..., :dim]) * scale
        allowed = torch.arange(n_k, device=q.device)[None, :] <= (
            n_k - n_q + torch.arange(n_q, device=q.device)[:, None]
        )
        s = s.masked_fill(~allowed[None], float("-inf"))
        lse[q0:q1] = torch.logsumexp(s, dim=-1).transpose(0, 1)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), kv[..., dim : 2 * dim])
    return out, lse


def last_query_head_sum(q, lse, kv_cache, block_table, cu_seqlens_q, seq_lens_k, scale, num_cols):
    """Per row, the head sums of ``exp(q.k * scale - lse)`` of its last query
    (index ``cu_seqlens_q[r + 1] - 1``) over keys ``0 .. seq_lens_k[r] - 1``:
    ``[Rp, num_cols]`` float32, +inf past ``seq_lens_k``."""
    idx = (cu_seqlens_q[1:] - 1).long()
    return head_sum(q[idx], kv_cache, block_table, seq_lens_k, lse[idx], scale, num_cols)
