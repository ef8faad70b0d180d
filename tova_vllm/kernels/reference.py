"""PyTorch reference of exactly what the Triton kernels compute.

Same inputs, same layout (paged cache ``[num_blocks, num_kv_heads, block_size,
2 * head_size]``, keys in ``[..., :D]``, values in ``[..., D:]``), float32
arithmetic. Per decode row ``r`` the valid slots are ``0 .. seq_lens[r] - 1``;
slot ``s`` lives in block ``block_table[r, s // bs]`` at offset ``s % bs``.
Slow (a Python loop over rows): for tests and the GPU check only.
"""

from __future__ import annotations

import torch


def gather_slots(cache: torch.Tensor, block_table: torch.Tensor, row: int, n: int) -> torch.Tensor:
    """Slots ``0 .. n-1`` of one row: ``[n, Hkv, last_dim]``."""
    bs = cache.shape[2]
    slots = torch.arange(n, device=cache.device)
    blocks = block_table[row, slots // bs].long()
    return cache[blocks, :, slots % bs, :]


def head_sum(q, key_cache, block_table, seq_lens, lse, scale, num_cols) -> torch.Tensor:
    """``[R, num_cols]`` float32: per slot, sum over the local query heads of
    ``exp(q.k * scale - lse)``; +inf past a row's valid slots."""
    rows, hq, _ = q.shape
    group = hq // key_cache.shape[1]
    out = torch.full((rows, num_cols), float("inf"), dtype=torch.float32, device=q.device)
    for r in range(rows):
        n = min(int(seq_lens[r]), num_cols)
        if n == 0:
            continue
        keys = gather_slots(key_cache, block_table, r, n).float()  # [n, Hkv, D]
        keys = keys.repeat_interleave(group, dim=1)  # [n, Hq, D]
        s = torch.einsum("hd,nhd->hn", q[r].float(), keys) * scale
        out[r, :n] = torch.exp(s - lse[r].float()[:, None]).sum(0)
    return out


def masked_argmin(scores, seq_lens) -> torch.Tensor:
    """Per row, the lowest score among slots ``< seq_lens[r]``; ties: the
    lowest slot index (``torch.argmin`` picks the first)."""
    cols = torch.arange(scores.shape[1], device=scores.device)
    masked = scores.masked_fill(cols[None, :] >= seq_lens[:, None], float("inf"))
    return torch.argmin(masked, dim=1)


def decode_attention(q, kv_cache, block_table, seq_lens, scale):
    """Attention of one query per row over its valid slots.
    Returns ``(out [R, Hq, D] float32, lse [R, Hq] float32, natural log)``."""
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
        out[r] = torch.einsum("hn,nhd->hd", torch.exp(s - lse[r][:, None]), kv[..., dim:])
    return out, lse


def write_slots(kv_cache, block_table, slots, key, value) -> None:
    bs = kv_cache.shape[2]
    rows = torch.arange(slots.shape[0], device=kv_cache.device)
    blocks = block_table[rows, slots // bs].long()
    kv_cache[blocks, :, slots % bs, :] = torch.cat((key, value), dim=-1).to(kv_cache.dtype)


def decode_step(q, key, value, kv_cache, block_table, seq_lens, budget, scale):
    """The whole TOVA decode step, in place on ``kv_cache``: write the new
    token to slot ``seq_lens - 1``, attend, and for rows holding ``budget + 1``
    slots copy the scratch slot ``budget`` over the head-averaged argmin.
    Returns ``(out, victim)``; ``victim`` is ``seq_lens - 1`` where nothing is
    evicted (the copy is then a self-copy)."""
    seq_lens = seq_lens.long()
    write_slots(kv_cache, block_table, seq_lens - 1, key, value)
    dim = q.shape[-1]
    out, lse = decode_attention(q, kv_cache, block_table, seq_lens, scale)
    scores = head_sum(q, kv_cache[..., :dim], block_table, seq_lens, lse, scale, budget + 1)
    victim = masked_argmin(scores, seq_lens)
    victim = torch.where(seq_lens == budget + 1, victim, seq_lens - 1)
    bs = kv_cache.shape[2]
    rows = torch.arange(q.shape[0], device=q.device)
    src = block_table[rows, (seq_lens - 1) // bs].long(), (seq_lens - 1) % bs
    dst = block_table[rows, victim // bs].long(), victim % bs
    kv_cache[dst[0], :, dst[1], :] = kv_cache[src[0], :, src[1], :]
    return out, victim
