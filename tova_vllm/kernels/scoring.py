"""Fused TOVA scoring on the paged KV cache, and the eviction (Triton).

Two stages, so tensor-parallel ranks can all-reduce between them:

1. `head_sum`: one program per (row, tile of columns). Columns ``0 ..
   seq_lens[r] - 1`` are the row's cached slots, read in place through the
   block table (strided LBNHC cache, see `layout`); with ``new_slot`` column
   ``seq_lens[r]`` is the new token, whose key comes from ``new_slot`` and
   goes through the same tile arithmetic (so a new key equal to a cached one
   scores bit-identically). Per column: ``sum_h exp(q_h . k * scale - lse_h)``
   over the local query heads, with the attention's log-sum-exp (no second
   softmax pass); GQA: each KV head's tile is loaded once for its whole query
   group. Columns past the row's last one get +inf.
2. `select_and_write`: one program per row. Rows below their budget take
   ``victim = held`` (the free slot); rows at their budget take the argmin of
   the sums over columns ``0 .. held`` (ties -> the lowest column, so a cached
   slot loses an exact tie against the new token). Then the new token's whole
   slot (``C`` elements, bit exact) is written to slot ``victim`` unless
   ``victim == held`` at the budget (the new token itself is dropped).

The head *average* is ``sum / num_query_heads_of_the_layer``; dividing by a
constant does not move the argmin, so ranks all-reduce sums.
Everything stays on the device: no host sync, no loop over rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tova_vllm.kernels._common import _qk, dot_in_f32, group_tile
from tova_vllm.kernels.layout import as_bits, check_kv_cache


@triton.jit
def _head_sum_kernel(
    q_ptr, kv_ptr, bt_ptr, seq_ptr, lse_ptr, new_ptr, out_ptr,
    scale, num_kv_heads, num_cols,
    stride_qr, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_btr, stride_btb,
    stride_lr, stride_lh,
    stride_nr, stride_nh, stride_nc,
    stride_or, stride_os,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_NEW: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    row = tl.program_id(0)
    tile = tl.program_id(1)
    seq = tl.load(seq_ptr + row)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    cached = offs_n < seq
    if HAS_NEW:
        is_new = offs_n == seq
        valid = cached | is_new
        last = seq + 1
    else:
        valid = cached
        last = seq
    # int64: block index * block stride overflows int32 on large caches.
    blk = tl.load(
        bt_ptr + row * stride_btr + (offs_n // PAGE) * stride_btb, mask=cached, other=0
    ).to(tl.int64)
    slot_off = blk * stride_kb + (offs_n % PAGE).to(tl.int64) * stride_ks
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    kmask = cached[:, None] & mask_d[None, :]
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < GROUP
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    # Tiles past the row's last column do no work (fixed grid, ragged rows).
    heads_here = tl.where(tile * BLOCK_N < last, num_kv_heads, 0)
    for kvh in range(0, heads_here):
        k = tl.load(
            kv_ptr + slot_off[:, None] + kvh * stride_kh + offs_d[None, :] * stride_kd,
            mask=kmask,
            other=0.0,
        )
        if HAS_NEW:
            k_new = tl.load(
                new_ptr + row * stride_nr + kvh * stride_nh + offs_d * stride_nc, mask=mask_d, other=0.0
            )
            k = tl.where(is_new[:, None], k_new[None, :].to(k.dtype), k)
        heads = kvh * GROUP + offs_h
        q = tl.load(
            q_ptr + row * stride_qr + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
            mask=mask_h[:, None] & mask_d[None, :],
            other=0.0,
        )
        # Padded heads: lse = +inf, so their exp() is 0.
        lse = tl.load(
            lse_ptr + row * stride_lr + heads * stride_lh, mask=mask_h, other=float("inf")
        ).to(tl.float32)
        s = _qk(q, k, USE_DOT, DOT_F32) * scale
        acc += tl.sum(tl.exp(s - lse[:, None]), axis=0)
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
    for start in range(0, tl.minimum(num_cols, seq), BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = (offs < num_cols) & (offs < seq)
        x = tl.load(s_ptr + row * stride_sr + offs * stride_ss, mask=m, other=float("inf"))
        x = tl.where(m, x.to(tl.float32), float("inf"))
        v, i = tl.min(x, 0, return_indices=True, return_indices_tie_break_left=True)
        # Strict: an equal minimum in a later tile has a higher index.
        better = v < best
        best_i = tl.where(better, start + i, best_i)
        best = tl.where(better, v, best)
    tl.store(out_ptr + row, best_i.to(out_ptr.dtype.element_ty))


@triton.jit
def _select_write_kernel(
    s_ptr, held_ptr, budget_ptr, victim_ptr, new_ptr, cache_ptr, bt_ptr,
    num_cols, num_kv_heads, slot_len,
    stride_sr, stride_ss,
    stride_nr, stride_nh, stride_nc,
    stride_cb, stride_ch, stride_cs, stride_cc,
    stride_btr, stride_btb,
    PAGE: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    held = tl.load(held_ptr + row).to(tl.int32)
    budget = tl.load(budget_ptr + row).to(tl.int32)
    evict = held >= budget
    # argmin over columns 0 .. held (held = the new token); only at the budget.
    n = tl.where(evict, tl.minimum(held + 1, num_cols), 0)
    best = tl.full([], float("inf"), tl.float32)
    best_i = tl.zeros([], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(s_ptr + row * stride_sr + offs * stride_ss, mask=m, other=float("inf"))
        x = tl.where(m, x.to(tl.float32), float("inf"))
        v, i = tl.min(x, 0, return_indices=True, return_indices_tie_break_left=True)
        better = v < best  # strict: ties keep the lower index
        best_i = tl.where(better, start + i, best_i)
        best = tl.where(better, v, best)
    victim = tl.where(evict, best_i, held)
    tl.store(victim_ptr + row, victim.to(victim_ptr.dtype.element_ty))
    # Write the new token's whole slot unless it is the one dropped.
    write = (victim < held) | (held < budget)
    blk = tl.load(bt_ptr + row * stride_btr + (victim // PAGE) * stride_btb, mask=write, other=0).to(tl.int64)
    base = blk * stride_cb + (victim % PAGE).to(tl.int64) * stride_cs
    offs_c = tl.arange(0, BLOCK_C)
    # The mask is built as a vector comparison (a broadcast scalar bool is
    # not a valid mask in Triton's interpreter).
    write_vec = (offs_c * 0 + write.to(tl.int32)) > 0
    for h in range(0, num_kv_heads):
        for c0 in range(0, slot_len, BLOCK_C):
            c = c0 + offs_c
            mc = (c < slot_len) & write_vec
            x = tl.load(new_ptr + row * stride_nr + h * stride_nh + c * stride_nc, mask=mc, other=0)
            tl.store(cache_ptr + base + h * stride_ch + c * stride_cc, x, mask=mc)


def _check(q, kv_cache, block_table, seq_lens, lse, new_slot):
    if q.dim() != 3:
        raise ValueError(f"q must be [R, Hq, D]; got {tuple(q.shape)}")
    rows, hq, dim = q.shape
    check_kv_cache(kv_cache, dim)
    hkv = kv_cache.shape[1]
    if hq % hkv:
        raise ValueError(f"incompatible heads: q {tuple(q.shape)}, cache {tuple(kv_cache.shape)}")
    if block_table.shape[0] != rows or seq_lens.shape[0] != rows or tuple(lse.shape) != (rows, hq):
        raise ValueError("block_table [R, nb], seq_lens [R] and lse [R, Hq] must match q's rows")
    if new_slot is not None and (new_slot.dim() != 3 or new_slot.shape[:2] != (rows, hkv)):
        raise ValueError(f"new_slot must be [R, Hkv, C]; got {tuple(new_slot.shape)}")


def head_sum(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    num_cols: int,
    *,
    new_slot: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    block_n: int = 64,
) -> torch.Tensor:
    """Per row and column, ``sum_h exp(q_h . k * scale - lse_h)`` over the
    local query heads: ``[R, num_cols]`` float32. Columns ``0 .. seq_lens[r]
    - 1``: the cached slots; with ``new_slot [R, Hkv, C]``, column
    ``seq_lens[r]``: the new token; +inf past that. Columns ``>= num_cols``
    are not scored.

    q: [R, Hq, D]; kv_cache: [num_blocks, Hkv, block_size, C] (any strides;
    keys in ``[..., :D]``); block_table: [R, nb] ints; seq_lens: [R] ints;
    lse: [R, Hq] (any strides, natural log)."""
    _check(q, kv_cache, block_table, seq_lens, lse, new_slot)
    rows, hq, dim = q.shape
    hkv, page = kv_cache.shape[1], kv_cache.shape[2]
    if out is None:
        out = torch.empty(rows, num_cols, dtype=torch.float32, device=q.device)
    if rows == 0 or num_cols == 0:
        return out
    group = hq // hkv
    block_h, use_dot = group_tile(group)
    if new_slot is None:
        new_arg, new_strides = kv_cache, (0, 0, 0)
    else:
        new_arg, new_strides = new_slot, new_slot.stride()
    grid = (rows, triton.cdiv(num_cols, block_n))
    _head_sum_kernel[grid](
        q, kv_cache, block_table, seq_lens, lse, new_arg, out,
        float(scale), hkv, num_cols,
        *q.stride(), *kv_cache.stride(), *block_table.stride(), *lse.stride(), *new_strides,
        *out.stride(),
        GROUP=group,
        BLOCK_H=block_h,
        PAGE=page,
        HEAD_DIM=dim,
        BLOCK_D=triton.next_power_of_2(dim),
        BLOCK_N=block_n,
        HAS_NEW=new_slot is not None,
        USE_DOT=use_dot,
        DOT_F32=dot_in_f32(q.dtype, kv_cache.dtype),
        num_warps=4,
    )
    return out


def masked_argmin(
    scores: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor | None = None, block: int = 256
) -> torch.Tensor:
    """Per row, the column ``< seq_lens[r]`` with the lowest score; ties ->
    the lowest index. ``[R]`` int64 (0 for a row with no valid column)."""
    rows, cols = scores.shape
    if out is None:
        out = torch.empty(rows, dtype=torch.int64, device=scores.device)
    if rows == 0:
        return out
    block = min(block, triton.next_power_of_2(max(cols, 1)))
    _argmin_kernel[(rows,)](scores, seq_lens, out, cols, *scores.stride(), BLOCK=block, num_warps=4)
    return out


def select_and_write(
    sums: torch.Tensor,
    held: torch.Tensor,
    budget: torch.Tensor,
    new_slot: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    *,
    victim: torch.Tensor | None = None,
    block: int = 256,
) -> torch.Tensor:
    """Victim per row and the one write (see the module docstring).

    sums: [R, >= max(held) + 1] float32 (column ``held`` = the new token);
    held, budget: [R] ints; new_slot: [R, Hkv, C] in the cache dtype;
    kv_cache: [num_blocks, Hkv, block_size, C]. Returns ``victim`` [R] int64."""
    rows, cols = sums.shape
    if new_slot.dim() != 3 or new_slot.shape[:2] != (rows, kv_cache.shape[1]) or (
        new_slot.shape[2] != kv_cache.shape[3]
    ):
        raise ValueError(
            f"new_slot must be [R, Hkv, C] = [{rows}, {kv_cache.shape[1]}, {kv_cache.shape[3]}]; "
            f"got {tuple(new_slot.shape)}"
        )
    if new_slot.dtype != kv_cache.dtype:
        raise ValueError(f"new_slot dtype {new_slot.dtype} != cache dtype {kv_cache.dtype}")
    if victim is None:
        victim = torch.empty(rows, dtype=torch.int64, device=sums.device)
    if rows == 0:
        return victim
    cache_bits, new_bits = as_bits(kv_cache), as_bits(new_slot)
    slot_len = kv_cache.shape[3]
    _select_write_kernel[(rows,)](
        sums, held, budget, victim, new_bits, cache_bits, block_table,
        cols, kv_cache.shape[1], slot_len,
        *sums.stride(), *new_bits.stride(), *cache_bits.stride(), *block_table.stride(),
        PAGE=kv_cache.shape[2],
        BLOCK=min(block, triton.next_power_of_2(max(cols, 1))),
        BLOCK_C=min(1024, triton.next_power_of_2(slot_len)),
        num_warps=4,
    )
    return victim
