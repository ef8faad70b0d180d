"""Prompt-path kernels: paged causal attention with LSE for prompt chunks,
and the last prompt query's head-summed probabilities (TOVA's bulk top-k).

* `paged_prefill_attention`: causal, bottom-right aligned (query ``i`` of a
  row with ``q_len`` queries and ``k_len`` keys sees keys ``0 .. k_len -
  q_len + i``); keys/values are read from the paged cache (engine layout,
  see `layout`) through the block table, the chunk's own K/V already written
  there by the caller.
  - CUDA with vLLM's FlashAttention (same rule as decode,
    `attention.select_attention`: query and cache the same half dtype):
    ``flash_attn_varlen_func`` with ``block_table`` (its ``causal=True`` is
    bottom-right aligned). No host sync.
  - Otherwise (CUDA without vLLM, the CPU): PyTorch, row by row, in tiles of
    ``PREFILL_QUERY_TILE`` queries, float32: per tile the scores take
    ``Hq * PREFILL_QUERY_TILE * k_len * 4`` bytes (twice, scores and
    probabilities), linear in ``k_len`` (128 MiB each for 32 heads at 8k
    keys). Reads ``cu_seqlens_q`` / ``seq_lens_k`` on the host (one sync).
* `last_query_head_sum`: the decode scoring kernel (`scoring.head_sum`) with
  ``seq_len = k_len`` and no new column, on each row's last query and its LSE.
"""

from __future__ import annotations

import torch

from tova_vllm.kernels import attention, scoring
from tova_vllm.kernels.layout import check_kv_cache, key_value_views

# Queries per tile of the PyTorch fallback (see the module docstring).
PREFILL_QUERY_TILE = 128
PREFILL_IMPLS = ("flash_attn", "torch")


def _check(q, kv_cache, block_table, cu_seqlens_q, seq_lens_k):
    if q.dim() != 3:
        raise ValueError(f"q must be [T, Hq, D]; got {tuple(q.shape)}")
    check_kv_cache(kv_cache, q.shape[-1])
    if q.shape[1] % kv_cache.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {kv_cache.shape[1]} KV heads")
    rows = block_table.shape[0]
    if cu_seqlens_q.shape != (rows + 1,) or seq_lens_k.shape != (rows,):
        raise ValueError("cu_seqlens_q must be [Rp + 1] and seq_lens_k [Rp] for block_table [Rp, nb]")


def paged_prefill_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens_k: torch.Tensor,
    scale: float,
    max_seqlen_q: int,
    max_seqlen_k: int,
    out: torch.Tensor | None = None,
    *,
    impl: str | None = None,
    query_tile: int = PREFILL_QUERY_TILE,
):
    """Causal paged attention of the prompt chunks: ``q [T, Hq, D]`` (rows
    ``cu_seqlens_q[r] .. cu_seqlens_q[r + 1] - 1``), row ``r``'s keys: slots
    ``0 .. seq_lens_k[r] - 1`` of ``block_table[r]`` (``seq_lens_k >=
    q_len``). Returns ``(out [T, Hq, D] in q's dtype, lse [T, Hq] float32)``.
    ``impl``: ``"flash_attn"`` or ``"torch"`` (default: FlashAttention where
    `attention.select_attention` picks it, else PyTorch)."""
    _check(q, kv_cache, block_table, cu_seqlens_q, seq_lens_k)
    if out is None:
        out = torch.empty_like(q)
    if impl is None:
        chosen = attention.select_attention(q.device, q.shape[-1], kv_cache.shape[2], q.dtype, kv_cache.dtype)
        impl = "flash_attn" if chosen == "flash_attn" else "torch"
    if impl == "flash_attn":
        return _flash_attn_prefill(
            q, kv_cache, block_table, cu_seqlens_q, seq_lens_k, scale, max_seqlen_q, max_seqlen_k, out
        )
    if impl == "torch":
        return _torch_prefill(q, kv_cache, block_table, cu_seqlens_q, seq_lens_k, scale, out, query_tile)
    raise ValueError(f"prefill impl must be one of {PREFILL_IMPLS}; got {impl!r}")


def _flash_attn_prefill(q, kv_cache, block_table, cu_seqlens_q, seq_lens_k, scale, max_q, max_k, out):
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    total, hq, dim = q.shape
    key_cache, value_cache = key_value_views(kv_cache, dim)
    _, lse = flash_attn_varlen_func(
        q=q,
        k=key_cache,
        v=value_cache,
        out=out,
        cu_seqlens_q=cu_seqlens_q.to(torch.int32),
        max_seqlen_q=max_q,
        seqused_k=seq_lens_k.to(torch.int32),
        max_seqlen_k=max_k,
        softmax_scale=scale,
        causal=True,
        block_table=block_table.to(torch.int32),
        return_softmax_lse=True,
        fa_version=attention.flash_attn_version(dim, kv_cache.shape[2]),
    )
    # FlashAttention returns the varlen LSE as [Hq, total_q].
    return out, (lse.transpose(0, 1) if lse.shape == (hq, total) else lse)


def _torch_prefill(q, kv_cache, block_table, cu_seqlens_q, seq_lens_k, scale, out, tile):
    total, hq, dim = q.shape
    hkv, bs = kv_cache.shape[1], kv_cache.shape[2]
    group = hq // hkv
    lse = torch.empty(total, hq, dtype=torch.float32, device=q.device)
    cu = cu_seqlens_q.tolist()
    k_lens = seq_lens_k.tolist()
    for r, n_k in enumerate(k_lens):
        q0, q1 = cu[r], cu[r + 1]
        n_q = q1 - q0
        if n_q == 0:
            continue
        if n_k < n_q:
            raise ValueError(f"row {r}: {n_k} keys < {n_q} queries (the chunk's K/V must be in the cache)")
        nb = -(-n_k // bs)
        kv = kv_cache[block_table[r, :nb].long()]  # [nb, Hkv, bs, C] (a gather: a copy)
        kv = kv.transpose(1, 2).reshape(nb * bs, hkv, -1)[:n_k]
        keys = kv[..., :dim].float()
        values = kv[..., dim : 2 * dim].float()
        key_idx = torch.arange(n_k, device=q.device)
        for t0 in range(0, n_q, tile):
            t1 = min(n_q, t0 + tile)
            qt = q[q0 + t0 : q0 + t1].float().view(t1 - t0, hkv, group, dim)
            s = torch.einsum("thgd,khd->hgtk", qt, keys) * scale  # [Hkv, G, tq, k]
            limit = n_k - n_q + torch.arange(t0, t1, device=q.device)
            s.masked_fill_(key_idx[None, :] > limit[:, None], float("-inf"))
            l = torch.logsumexp(s, dim=-1)  # [Hkv, G, tq]
            p = torch.exp(s - torch.where(torch.isinf(l), 0.0, l)[..., None])
            o = torch.einsum("hgtk,khd->thgd", p, values)
            out[q0 + t0 : q0 + t1] = o.reshape(t1 - t0, hq, dim).to(out.dtype)
            lse[q0 + t0 : q0 + t1] = l.permute(2, 0, 1).reshape(t1 - t0, hq)
    return out, lse


def last_query_head_sum(
    q: torch.Tensor,
    lse: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens_k: torch.Tensor,
    scale: float,
    max_seqlen_k: int,
    *,
    out: torch.Tensor | None = None,
    block_n: int = 64,
) -> torch.Tensor:
    """For each (prompt-ending) row ``r``: the head-summed probabilities of
    its last query (``cu_seqlens_q[r + 1] - 1``, with its ``lse``, e.g. from
    `paged_prefill_attention`) over its keys ``0 .. seq_lens_k[r] - 1``:
    ``[Rp, max_seqlen_k]`` float32, +inf past ``seq_lens_k[r]``. Sums over
    the local query heads: under tensor parallelism all-reduce them, and
    divide by the layer's query heads for the average. No host sync."""
    _check(q, kv_cache, block_table, cu_seqlens_q, seq_lens_k)
    idx = (cu_seqlens_q[1:] - 1).long()
    return scoring.head_sum(
        q[idx], kv_cache, block_table, seq_lens_k, lse[idx], scale, max_seqlen_k, out=out, block_n=block_n
    )
