"""Paged decode attention with the softmax log-sum-exp, over a row's cached
slots plus (optionally) a new token that is not in the cache.

A decode row ``r`` attends over its cached slots ``0 .. seq_lens[r] - 1``
(see `layout` for the cache) and, with ``new_slot`` (``[R, Hkv, C]``, K in
``[:D]``, V in ``[D:2D]``), over the new token too: one softmax over
``seq_lens + 1`` keys. The new token is merged analytically::

    s_new = q . k_new * scale          (per query head)
    lse   = logaddexp(lse_cached, s_new)
    out   = out_cached * exp(lse_cached - lse) + v_new * exp(s_new - lse)

Which kernel attends over the cached slots (`select_attention`, cached per
(device, head size, block size, query dtype, cache dtype)):

* ``"flash_attn"``: vLLM's FlashAttention (``vllm.vllm_flash_attn``,
  ``flash_attn_varlen_func(..., return_softmax_lse=True)``) on the strided
  K/V views, on CUDA when vLLM reports a supported FA version and the query
  and cache dtypes are the same half type (FA rejects mixed dtypes: "query
  and key must have the same dtype").
* ``"vllm_triton"``: vLLM's Triton decode attention
  (``vllm.v1.attention.ops.triton_decode_attention.decode_attention_fwd``,
  which writes the LSE), on CUDA when vLLM has Triton otherwise.
* ``"triton"``: this module's split-KV kernel (flash-decoding, two stages;
  the new token is merged in the second stage), everywhere else: CUDA
  without vLLM (the GPU check machine) and the CPU under
  ``TRITON_INTERPRET=1``.

For the first two the new token is merged by the same second-stage kernel
with one "split" (`merge_new_token`). The split count depends only on the
host bound ``max_seq_len`` (`num_splits_for`), never on the row count, so the
compiled variants do not change with the batch size.
"""

from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl

from tova_vllm.kernels._common import _pv, _qk, dot_in_f32, group_tile
from tova_vllm.kernels.layout import check_kv_cache, key_value_views

# Under vLLM's logger tree when vLLM is there; this package must not import
# vLLM (the GPU check runs without it).
logger = logging.getLogger(f"vllm.{__name__}")

ATTENTION_IMPLS = ("flash_attn", "vllm_triton", "triton")
_HALF = (torch.float16, torch.bfloat16)


@triton.jit
def _attn_split_kernel(
    q_ptr, kv_ptr, bt_ptr, seq_ptr, mid_o_ptr, mid_lse_ptr,
    scale,
    stride_qr, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_btr, stride_btb,
    stride_mr, stride_mh, stride_ms, stride_md,
    stride_lr, stride_lh, stride_ls,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """One program per (row, KV head, split): the KV head's whole query group
    over the split's share of the row's cached slots; partial out + LSE."""
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(seq_ptr + row)
    # Splits are whole tiles: a row's tiles are shared out evenly.
    per_split = tl.cdiv(tl.cdiv(seq, BLOCK_N), NUM_SPLITS) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq)
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < GROUP
    heads = kvh * GROUP + offs_h
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    qmask = mask_h[:, None] & mask_d[None, :]
    q = tl.load(
        q_ptr + row * stride_qr + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=qmask,
        other=0.0,
    )
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    head_off = kvh.to(tl.int64) * stride_kh
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = offs_n < end
        # int64: block index * block stride overflows int32 on large caches.
        blk = tl.load(
            bt_ptr + row * stride_btr + (offs_n // PAGE) * stride_btb, mask=valid, other=0
        ).to(tl.int64)
        base = blk * stride_kb + (offs_n % PAGE).to(tl.int64) * stride_ks + head_off
        kmask = valid[:, None] & mask_d[None, :]
        k = tl.load(kv_ptr + base[:, None] + offs_d[None, :] * stride_kd, mask=kmask, other=0.0)
        # Values follow the keys in the last dim: offset HEAD_DIM.
        v = tl.load(
            kv_ptr + base[:, None] + (offs_d[None, :] + HEAD_DIM) * stride_kd, mask=kmask, other=0.0
        )
        s = _qk(q, k, USE_DOT, DOT_F32) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _pv(p, v, USE_DOT, DOT_F32)
        m_i = m_new
    has = l_i > 0
    o = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
    tl.store(
        mid_o_ptr + row * stride_mr + heads[:, None] * stride_mh + split * stride_ms
        + offs_d[None, :] * stride_md,
        o,
        mask=qmask,
    )
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(mid_lse_ptr + row * stride_lr + heads * stride_lh + split * stride_ls, lse, mask=mask_h)


# FlashAttention's LSE arrives as a transposed [Hq, R] view: its strides follow
# R, and Triton would specialise them (== 1, % 16) into per-batch variants.
@triton.jit(do_not_specialize=["stride_mr", "stride_mh", "stride_ms", "stride_lr", "stride_lh", "stride_ls"])
def _attn_combine_kernel(
    mid_o_ptr, mid_lse_ptr, q_ptr, new_ptr, out_ptr, lse_ptr,
    scale,
    stride_mr, stride_mh, stride_ms, stride_md,
    stride_lr, stride_lh, stride_ls,
    stride_qr, stride_qh, stride_qd,
    stride_nr, stride_nh, stride_nc,
    stride_or, stride_oh, stride_od,
    stride_xr, stride_xh,
    GROUP: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_NEW: tl.constexpr,
):
    """One program per (row, query head): merge the splits' partials (and the
    new token, with ``HAS_NEW``) into the output and the final LSE."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < NUM_SPLITS
    mask_d = offs_d < HEAD_DIM
    lse_s = tl.load(
        mid_lse_ptr + row * stride_lr + head * stride_lh + offs_s * stride_ls,
        mask=mask_s,
        other=float("-inf"),
    ).to(tl.float32)
    # FlashAttention reports +inf for a row with no keys: no mass there.
    lse_s = tl.where(mask_s & (lse_s < float("inf")), lse_s, float("-inf"))
    o_s = tl.load(
        mid_o_ptr + row * stride_mr + head * stride_mh
        + offs_s[:, None] * stride_ms + offs_d[None, :] * stride_md,
        mask=mask_s[:, None] & mask_d[None, :],
        other=0.0,
    ).to(tl.float32)
    m = tl.max(lse_s, axis=0)
    if HAS_NEW:
        kvh = head // GROUP
        qv = tl.load(
            q_ptr + row * stride_qr + head * stride_qh + offs_d * stride_qd, mask=mask_d, other=0.0
        ).to(tl.float32)
        new_base = new_ptr + row * stride_nr + kvh * stride_nh
        k_new = tl.load(new_base + offs_d * stride_nc, mask=mask_d, other=0.0).to(tl.float32)
        v_new = tl.load(new_base + (offs_d + HEAD_DIM) * stride_nc, mask=mask_d, other=0.0).to(tl.float32)
        s_new = tl.sum(qv * k_new, axis=0) * scale
        m = tl.maximum(m, s_new)
    finite = m > float("-inf")
    m_safe = tl.where(finite, m, 0.0)
    w = tl.where(lse_s > float("-inf"), tl.exp(lse_s - m_safe), 0.0)
    total = tl.sum(w, axis=0)
    o = tl.sum(w[:, None] * o_s, axis=0)
    if HAS_NEW:
        w_new = tl.exp(s_new - m_safe)
        total += w_new
        o += w_new * v_new
    o = o / tl.where(total > 0, total, 1.0)
    tl.store(
        out_ptr + row * stride_or + head * stride_oh + offs_d * stride_od,
        o.to(out_ptr.dtype.element_ty),
        mask=mask_d,
    )
    lse = tl.where(finite, m + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    tl.store(lse_ptr + row * stride_xr + head * stride_xh, lse)


def num_splits_for(max_seq_len: int, block_n: int = 64) -> int:
    """Split-KV count from the host bound on the keys per row only (about 256
    keys per split, at most 16, never more than tiles). Not from the row
    count: the split count is a compile-time constant, and a count that
    followed the batch would recompile whenever the batch changes bucket."""
    tiles = max(triton.cdiv(max_seq_len, block_n), 1)
    return max(1, min(tiles, triton.cdiv(max_seq_len, 256), 16))


def _check(q, kv_cache, block_table, seq_lens, new_slot):
    if q.dim() != 3:
        raise ValueError(f"q must be [R, Hq, D]; got {tuple(q.shape)}")
    rows, hq, dim = q.shape
    check_kv_cache(kv_cache, dim)
    hkv = kv_cache.shape[1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if block_table.dim() != 2 or block_table.shape[0] != rows or seq_lens.shape != (rows,):
        raise ValueError("block_table [R, nb] and seq_lens [R] must match q's rows")
    if new_slot is not None and (
        new_slot.dim() != 3 or new_slot.shape[:2] != (rows, hkv) or new_slot.shape[2] < 2 * dim
    ):
        raise ValueError(f"new_slot must be [R, Hkv, C >= 2D]; got {tuple(new_slot.shape)}")


def _combine(mid_o, mid_lse, q, new_slot, scale, out, lse, group, splits):
    rows, hq, dim = q.shape
    if new_slot is None:
        new_arg, new_strides = mid_o, (0, 0, 0)
    else:
        new_arg, new_strides = new_slot, new_slot.stride()
    _attn_combine_kernel[(rows, hq)](
        mid_o, mid_lse, q, new_arg, out, lse,
        float(scale),
        *mid_o.stride(), *mid_lse.stride(), *q.stride(), *new_strides, *out.stride(), *lse.stride(),
        GROUP=group,
        NUM_SPLITS=splits,
        HEAD_DIM=dim,
        BLOCK_D=triton.next_power_of_2(dim),
        BLOCK_S=triton.next_power_of_2(splits),
        HAS_NEW=new_slot is not None,
        num_warps=4,
    )


def triton_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
    *,
    new_slot: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int = 64,
):
    """One query per row over its cached slots ``0 .. seq_lens[r] - 1`` (and
    the new token ``new_slot[r]`` when given). ``max_seq_len``: a host int
    bounding ``seq_lens``; it sizes the split count only (no host sync).
    Returns ``(out [R, Hq, D] in q's dtype, lse [R, Hq] float32)``; a row
    with no key at all gets zeros and -inf."""
    _check(q, kv_cache, block_table, seq_lens, new_slot)
    rows, hq, dim = q.shape
    hkv = kv_cache.shape[1]
    if out is None:
        out = torch.empty_like(q)
    if lse is None:
        lse = torch.empty(rows, hq, dtype=torch.float32, device=q.device)
    if rows == 0:
        return out, lse
    splits = num_splits or num_splits_for(max_seq_len, block_n)
    group = hq // hkv
    block_h, use_dot = group_tile(group)
    mid_o = torch.empty(rows, hq, splits, dim, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(rows, hq, splits, dtype=torch.float32, device=q.device)
    _attn_split_kernel[(rows, hkv, splits)](
        q, kv_cache, block_table, seq_lens, mid_o, mid_lse,
        float(scale),
        *q.stride(), *kv_cache.stride(), *block_table.stride(), *mid_o.stride(), *mid_lse.stride(),
        GROUP=group,
        BLOCK_H=block_h,
        NUM_SPLITS=splits,
        PAGE=kv_cache.shape[2],
        HEAD_DIM=dim,
        BLOCK_D=triton.next_power_of_2(dim),
        BLOCK_N=block_n,
        USE_DOT=use_dot,
        DOT_F32=dot_in_f32(q.dtype, kv_cache.dtype),
        num_warps=4,
    )
    _combine(mid_o, mid_lse, q, new_slot, scale, out, lse, group, splits)
    return out, lse


def merge_new_token(
    q: torch.Tensor,
    out_cached: torch.Tensor,
    lse_cached: torch.Tensor,
    new_slot: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
):
    """Attention over the cached slots (``out_cached [R, Hq, D]``,
    ``lse_cached [R, Hq]``, any strides, e.g. FlashAttention's transposed
    LSE) merged with the new token ``new_slot [R, Hkv, C]``: returns
    ``(out [R, Hq, D], lse [R, Hq] float32)`` over ``held + 1`` keys."""
    rows, hq, _ = q.shape
    if out is None:
        out = torch.empty_like(q)
    if lse is None:
        lse = torch.empty(rows, hq, dtype=torch.float32, device=q.device)
    if rows == 0:
        return out, lse
    group = hq // new_slot.shape[1]
    _combine(out_cached.unsqueeze(2), lse_cached.unsqueeze(2), q, new_slot, scale, out, lse, group, 1)
    return out, lse


# -- vLLM's kernels (CUDA, vLLM installed) -----------------------------------


def _probe_flash_attn(head_size: int, block_size: int) -> int | None:
    """vLLM's FlashAttention version for these shapes, or None. Calls vLLM's
    ``get_flash_attn_version``, which logs at error level on GPUs without
    FA: run it through the caches below only."""
    try:
        from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
        from vllm.vllm_flash_attn import flash_attn_varlen_func  # noqa: F401
        from vllm.vllm_flash_attn.flash_attn_interface import is_fa_version_supported
    except Exception:  # vLLM absent, or built without FlashAttention
        return None
    try:
        version = get_flash_attn_version(head_size=head_size, kv_cache_block_size=block_size)
    except Exception:
        return None
    if version is None or not is_fa_version_supported(version):
        return None
    return version


def _probe_vllm_triton() -> bool:
    try:
        from vllm.triton_utils import HAS_TRITON
        from vllm.v1.attention.ops import triton_decode_attention  # noqa: F401
    except Exception:
        return False
    return bool(HAS_TRITON)


@functools.lru_cache(maxsize=None)
def flash_attn_version(head_size: int, block_size: int) -> int | None:
    """Cached `_probe_flash_attn`."""
    return _probe_flash_attn(head_size, block_size)


@functools.lru_cache(maxsize=None)
def vllm_triton_available() -> bool:
    return _probe_vllm_triton()


def select_attention(
    device: torch.device | str,
    head_size: int,
    block_size: int,
    q_dtype: torch.dtype | None = None,
    kv_dtype: torch.dtype | None = None,
) -> str:
    """The attention kernel for these inputs (see the module docstring); one
    probe per distinct arguments (cached). FlashAttention only when the query
    and cache dtypes are equal and fp16/bf16 (``None`` = same as the other)
    and the block size is a multiple of 16."""
    device = torch.device(device)
    q_dtype = q_dtype or kv_dtype
    kv_dtype = kv_dtype or q_dtype
    return _select(device.type, device.index, int(head_size), int(block_size), q_dtype, kv_dtype)


@functools.lru_cache(maxsize=None)
def _select(device_type, device_index, head_size, block_size, q_dtype, kv_dtype) -> str:
    if device_type != "cuda":
        return "triton"
    same_half = q_dtype == kv_dtype and (q_dtype is None or q_dtype in _HALF)
    if same_half and block_size % 16 == 0 and flash_attn_version(head_size, block_size) is not None:
        impl = "flash_attn"
    elif vllm_triton_available():
        impl = "vllm_triton"
    else:
        impl = "triton"
    logger.debug(
        "tova-vllm: attention %s for head %d, block %d, query %s, cache %s",
        impl, head_size, block_size, q_dtype, kv_dtype,
    )
    return impl


select_attention.cache_info = _select.cache_info  # type: ignore[attr-defined]


def clear_selection_cache() -> None:
    """Forget every cached selection and probe (tests)."""
    _select.cache_clear()
    flash_attn_version.cache_clear()
    vllm_triton_available.cache_clear()


select_attention.cache_clear = clear_selection_cache  # type: ignore[attr-defined]


def flash_attn_cached(q, kv_cache, block_table, seq_lens, scale, max_seq_len):
    """vLLM's FlashAttention over each row's cached slots, one query per row:
    ``(out [R, Hq, D], lse [R, Hq])`` (the LSE is FA's ``[Hq, R]``, transposed
    as a view)."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    rows, hq, dim = q.shape
    key_cache, value_cache = key_value_views(kv_cache, dim)
    out = torch.empty_like(q)
    cu_q = torch.arange(rows + 1, dtype=torch.int32, device=q.device)
    _, lse = flash_attn_varlen_func(
        q=q,
        k=key_cache,
        v=value_cache,
        out=out,
        cu_seqlens_q=cu_q,
        max_seqlen_q=1,
        seqused_k=seq_lens.to(torch.int32),
        max_seqlen_k=max_seq_len,
        softmax_scale=scale,
        causal=True,
        block_table=block_table.to(torch.int32),
        return_softmax_lse=True,
        fa_version=flash_attn_version(dim, kv_cache.shape[2]),
    )
    # FlashAttention returns the varlen LSE as [Hq, total_q].
    return out, (lse.transpose(0, 1) if lse.shape == (hq, rows) else lse)


def vllm_triton_cached(q, kv_cache, block_table, seq_lens, scale, max_seq_len, block_n=64):
    """vLLM's Triton decode attention (split-KV, writes the LSE) over the
    cached slots."""
    from vllm.v1.attention.ops.triton_decode_attention import decode_attention_fwd

    return call_vllm_triton_decode(
        decode_attention_fwd, q, kv_cache, block_table, seq_lens, scale, max_seq_len, block_n
    )


def call_vllm_triton_decode(fn, q, kv_cache, block_table, seq_lens, scale, max_seq_len, block_n=64):
    """Call a ``decode_attention_fwd``-compatible ``fn`` on the strided K/V
    views; the split count comes from ``max_seq_len`` only."""
    rows, hq, dim = q.shape
    key_cache, value_cache = key_value_views(kv_cache, dim)  # [blocks, bs, Hkv, D]
    out = torch.empty_like(q)
    lse = torch.empty(rows, hq, dtype=torch.float32, device=q.device)
    splits = num_splits_for(max_seq_len, block_n)
    logits = torch.empty(rows, hq, splits, dim + 1, dtype=torch.float32, device=q.device)
    fn(
        q, key_cache, value_cache, out, lse, block_table, seq_lens, logits, splits, scale,
        page_size=kv_cache.shape[2],
    )
    return out, lse


def decode_attention(
    q, kv_cache, block_table, seq_lens, scale, max_seq_len, *, new_slot=None, out=None,
    impl: str | None = None,
):
    """Paged decode attention with LSE on the selected kernel, over the cached
    slots (and ``new_slot``): ``(out [R, Hq, D], lse [R, Hq] float32)``."""
    impl = impl or select_attention(q.device, q.shape[-1], kv_cache.shape[2], q.dtype, kv_cache.dtype)
    if impl == "triton":
        return triton_decode_attention(
            q, kv_cache, block_table, seq_lens, scale, max_seq_len, new_slot=new_slot, out=out
        )
    _check(q, kv_cache, block_table, seq_lens, new_slot)
    if impl == "flash_attn":
        out_c, lse_c = flash_attn_cached(q, kv_cache, block_table, seq_lens, scale, max_seq_len)
    elif impl == "vllm_triton":
        out_c, lse_c = vllm_triton_cached(q, kv_cache, block_table, seq_lens, scale, max_seq_len)
    else:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}; got {impl!r}")
    if new_slot is None:
        if out is not None:
            out.copy_(out_c)
            return out, lse_c
        return out_c, lse_c
    return merge_new_token(q, out_c, lse_c, new_slot, scale, out=out)
