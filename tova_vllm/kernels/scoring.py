"""Fused TOVA scoring on the paged KV cache (Triton).

Two stages, so tensor-parallel ranks can all-reduce between them:

1. `head_sum`: one program per (decode row, tile of slots). It reads the
   row's keys in place (block table + the strided key view of the combined
   K|V cache), computes ``q.k * scale`` for every local query head, turns it
   into a probability with the attention's log-sum-exp (``exp(s - lse)``, no
   second softmax pass) and sums over the query heads (GQA: each KV-head tile
   is loaded once and used by its whole query group). Slots past the row's
   length get +inf.
2. `masked_argmin`: one program per row, walks the tiles keeping the first
   minimum: the slot to evict, ties -> lowest slot index.

The head *average* is ``head_sum / num_query_heads_of_the_layer``; dividing by
a constant does not move the argmin, so ranks all-reduce sums.
Everything stays on the device: no host sync, no loop over rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _head_sum_kernel(
    q_ptr, k_ptr, bt_ptr, seq_ptr, lse_ptr, out_ptr,
    scale, num_kv_heads, num_cols,
    stride_qr, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_btr, stride_btb,
    stride_lr, stride_lh,
    stride_or, stride_os,
    GROUP: tl.constexpr,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    tile = tl.program_id(1)
    seq = tl.load(seq_ptr + row)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = offs_n < seq
    # int64: block index * block stride overflows int32 on large caches.
    blk = tl.load(
        bt_ptr + row * stride_btr + (offs_n // PAGE) * stride_btb, mask=valid, other=0
    ).to(tl.int64)
    slot_off = blk * stride_kb + (offs_n % PAGE).to(tl.int64) * stride_ks
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    kmask = valid[:, None] & mask_d[None, :]
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for kvh in range(num_kv_heads):
        k = tl.load(
            k_ptr + slot_off[:, None] + kvh * stride_kh + offs_d[None, :] * stride_kd,
            mask=kmask,
            other=0.0,
        ).to(tl.float32)
        for g in tl.static_range(GROUP):
            head = kvh * GROUP + g
            qv = tl.load(
                q_ptr + row * stride_qr + head * stride_qh + offs_d * stride_qd,
                mask=mask_d,
                other=0.0,
            ).to(tl.float32)
            lse = tl.load(lse_ptr + row * stride_lr + head * stride_lh).to(tl.float32)
            s = tl.sum(k * qv[None, :], axis=1) * scale
            acc += tl.exp(s - lse)
    acc = tl.where(valid, acc, float("inf"))
    tl.store(out_ptr + row * stride_or + offs_n * stride_os, acc, mask=offs_n < num_cols)


@triton.jit
def _argmin_kernel(
    s_ptr, seq_ptr, out_ptr, num_cols, stride_sr, stride_ss,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    seq = tl.load(seq_ptr + row)
    best = tl.full([], float("inf"), tl.float32)
    best_i = tl.zeros([], dtype=tl.int32)
    for start in range(0, num_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = (offs < num_cols) & (offs < seq)
        x = tl.load(s_ptr + row * stride_sr + offs * stride_ss, mask=m, other=float("inf"))
        x = tl.where(m, x.to(tl.float32), float("inf"))
        v, i = tl.min(x, 0, return_indices=True, return_indices_tie_break_left=True)
        # Strict: an equal minimum in a later tile has a higher slot index.
        better = v < best
        best_i = tl.where(better, start + i, best_i)
        best = tl.where(better, v, best)
    tl.store(out_ptr + row, best_i.to(out_ptr.dtype.element_ty))


def _check(q, key_cache, block_table, seq_lens, lse):
    if q.dim() != 3 or key_cache.dim() != 4:
        raise ValueError("q must be [R, Hq, D] and key_cache [num_blocks, Hkv, block_size, D]")
    rows, hq, dim = q.shape
    hkv = key_cache.shape[1]
    if hq % hkv or key_cache.shape[3] != dim:
        raise ValueError(f"incompatible heads/head size: q {tuple(q.shape)}, keys {tuple(key_cache.shape)}")
    if block_table.shape[0] != rows or seq_lens.shape[0] != rows or tuple(lse.shape) != (rows, hq):
        raise ValueError("block_table [R, nb], seq_lens [R] and lse [R, Hq] must match q's rows")


def head_sum(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    num_cols: int,
    out: torch.Tensor | None = None,
    block_n: int = 64,
) -> torch.Tensor:
    """Per decode row and slot, ``sum_h exp(q_h.k * scale - lse_h)`` over the
    local query heads: ``[R, num_cols]`` float32, +inf where ``slot >=
    seq_lens[r]``. Slots ``>= num_cols`` are not scored.

    q: [R, Hq, D]; key_cache: [num_blocks, Hkv, block_size, D] (any strides,
    e.g. ``kv_cache[..., :D]``); block_table: [R, >= cdiv(seq, bs)] ints;
    seq_lens: [R] ints; lse: [R, Hq] (any strides, natural log)."""
    _check(q, key_cache, block_table, seq_lens, lse)
    rows, hq, dim = q.shape
    hkv, page = key_cache.shape[1], key_cache.shape[2]
    if out is None:
        out = torch.empty(rows, num_cols, dtype=torch.float32, device=q.device)
    if rows == 0 or num_cols == 0:
        return out
    grid = (rows, triton.cdiv(num_cols, block_n))
    _head_sum_kernel[grid](
        q, key_cache, block_table, seq_lens, lse, out,
        float(scale), hkv, num_cols,
        *q.stride(), *key_cache.stride(), *block_table.stride(), *lse.stride(), *out.stride(),
        GROUP=hq // hkv,
        PAGE=page,
        HEAD_DIM=dim,
        BLOCK_D=triton.next_power_of_2(dim),
        BLOCK_N=block_n,
        num_warps=4,
    )
    return out


def masked_argmin(
    scores: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor | None = None, block: int = 256
) -> torch.Tensor:
    """Per row, the slot ``< seq_lens[r]`` with the lowest score; ties -> the
    lowest slot index. ``[R]`` int64. (0 for a row with no valid slot.)"""
    rows, cols = scores.shape
    if out is None:
        out = torch.empty(rows, dtype=torch.int64, device=scores.device)
    if rows == 0:
        return out
    block = min(block, triton.next_power_of_2(max(cols, 1)))
    _argmin_kernel[(rows,)](scores, seq_lens, out, cols, *scores.stride(), BLOCK=block, num_warps=4)
    return out


def tova_select(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    num_cols: int,
    num_heads_total: int | None = None,
    return_scores: bool = False,
):
    """Slot to evict per row (head-average argmin over slots ``0 ..
    min(seq_lens, num_cols) - 1``, ties -> lowest index). With
    ``return_scores``, also the head-averaged scores ``[R, num_cols]``
    (``num_heads_total`` = the layer's query heads, default ``q``'s)."""
    sums = head_sum(q, key_cache, block_table, seq_lens, lse, scale, num_cols)
    victim = masked_argmin(sums, seq_lens)
    if not return_scores:
        return victim
    return victim, sums / float(num_heads_total or q.shape[1])
