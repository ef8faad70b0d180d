"""Paged decode attention that also returns the softmax log-sum-exp.

Which kernel runs (`select_attention`):

* ``"flash_attn"``: vLLM's FlashAttention (``vllm.vllm_flash_attn``,
  ``flash_attn_varlen_func(..., return_softmax_lse=True)``), on CUDA when vLLM
  is importable and reports a supported FA version (FA2 on sm80+, FA3 on
  Hopper). vLLM 0.32's own FlashAttention backend uses this cache layout
  (``[blocks, Hkv, bs, 2D]`` viewed as ``[blocks, bs, Hkv, D]``).
* ``"vllm_triton"``: vLLM's Triton decode attention
  (``vllm.v1.attention.ops.triton_decode_attention.decode_attention_fwd``,
  which writes the LSE), on CUDA when vLLM has Triton but no FlashAttention.
* ``"triton"``: this module's split-KV kernel (flash-decoding, two stages),
  everywhere else: CUDA without vLLM (the GPU check machine) and the CPU
  under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

# Under vLLM's logger tree when vLLM is there; this package must not import
# vLLM (the GPU check runs without it).
logger = logging.getLogger(f"vllm.{__name__}")

ATTENTION_IMPLS = ("flash_attn", "vllm_triton", "triton")


@triton.jit
def _attn_split_kernel(
    q_ptr, kv_ptr, bt_ptr, seq_ptr, mid_o_ptr, mid_lse_ptr,
    scale, num_splits,
    stride_qr, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_btr, stride_btb,
    stride_mr, stride_mh, stride_ms, stride_md,
    stride_lr, stride_lh, stride_ls,
    GROUP: tl.constexpr,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    kvh = head // GROUP
    seq = tl.load(seq_ptr + row)
    # Splits are whole tiles: a row's tiles are shared out evenly.
    per_split = tl.cdiv(tl.cdiv(seq, BLOCK_N), num_splits) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    qv = tl.load(
        q_ptr + row * stride_qr + head * stride_qh + offs_d * stride_qd, mask=mask_d, other=0.0
    ).to(tl.float32)
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = offs_n < end
        blk = tl.load(
            bt_ptr + row * stride_btr + (offs_n // PAGE) * stride_btb, mask=valid, other=0
        ).to(tl.int64)
        base = blk * stride_kb + (offs_n % PAGE).to(tl.int64) * stride_ks + kvh * stride_kh
        kmask = valid[:, None] & mask_d[None, :]
        k = tl.load(kv_ptr + base[:, None] + offs_d[None, :] * stride_kd, mask=kmask, other=0.0)
        s = tl.sum(k.to(tl.float32) * qv[None, :], axis=1) * scale
        s = tl.where(valid, s, float("-inf"))
        # Values follow the keys in the last dim: offset HEAD_DIM.
        v = tl.load(
            kv_ptr + base[:, None] + (offs_d[None, :] + HEAD_DIM) * stride_kd, mask=kmask, other=0.0
        ).to(tl.float32)
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    has = l_i > 0
    o = tl.where(has, acc / tl.where(has, l_i, 1.0), 0.0)
    tl.store(
        mid_o_ptr + row * stride_mr + head * stride_mh + split * stride_ms + offs_d * stride_md,
        o,
        mask=mask_d,
    )
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(mid_lse_ptr + row * stride_lr + head * stride_lh + split * stride_ls, lse)


@triton.jit
def _attn_combine_kernel(
    mid_o_ptr, mid_lse_ptr, out_ptr, lse_ptr, num_splits,
    stride_mr, stride_mh, stride_ms, stride_md,
    stride_lr, stride_lh, stride_ls,
    stride_or, stride_oh, stride_od,
    stride_xr, stride_xh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    mask_d = offs_d < HEAD_DIM
    lse_s = tl.load(
        mid_lse_ptr + row * stride_lr + head * stride_lh + offs_s * stride_ls,
        mask=mask_s,
        other=float("-inf"),
    )
    m = tl.max(lse_s, axis=0)
    finite = m > float("-inf")
    w = tl.where(mask_s & (lse_s > float("-inf")), tl.exp(lse_s - tl.where(finite, m, 0.0)), 0.0)
    o_s = tl.load(
        mid_o_ptr + row * stride_mr + head * stride_mh
        + offs_s[:, None] * stride_ms + offs_d[None, :] * stride_md,
        mask=mask_s[:, None] & mask_d[None, :],
        other=0.0,
    )
    total = tl.sum(w, axis=0)
    o = tl.sum(w[:, None] * o_s, axis=0) / tl.where(finite, total, 1.0)
    tl.store(
        out_ptr + row * stride_or + head * stride_oh + offs_d * stride_od,
        o.to(out_ptr.dtype.element_ty),
        mask=mask_d,
    )
    lse = tl.where(finite, m + tl.log(tl.where(finite, total, 1.0)), float("-inf"))
    tl.store(lse_ptr + row * stride_xr + head * stride_xh, lse)


def num_splits_for(rows: int, heads: int, max_seq_len: int, block_n: int = 64) -> int:
    """Enough splits to give the GPU ~2k programs, never more than tiles."""
    tiles = max(triton.cdiv(max_seq_len, block_n), 1)
    return max(1, min(tiles, triton.cdiv(2048, max(rows * heads, 1)), 64))


def triton_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int = 64,
):
    """One query per row over slots ``0 .. seq_lens[r] - 1`` of the paged
    K|V cache. ``max_seq_len`` (a host int bounding ``seq_lens``) only sizes
    the split count, so no host sync. Returns ``(out [R, Hq, D], lse [R, Hq]
    float32)``; a row with ``seq_lens == 0`` gets zeros and -inf."""
    rows, hq, dim = q.shape
    hkv = kv_cache.shape[1]
    if hq % hkv or kv_cache.shape[3] != 2 * dim:
        raise ValueError(f"q {tuple(q.shape)} does not fit the K|V cache {tuple(kv_cache.shape)}")
    if out is None:
        out = torch.empty_like(q)
    if lse is None:
        lse = torch.empty(rows, hq, dtype=torch.float32, device=q.device)
    if rows == 0:
        return out, lse
    splits = num_splits or num_splits_for(rows, hq, max_seq_len, block_n)
    mid_o = torch.empty(rows, hq, splits, dim, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(rows, hq, splits, dtype=torch.float32, device=q.device)
    block_d = triton.next_power_of_2(dim)
    _attn_split_kernel[(rows, hq, splits)](
        q, kv_cache, block_table, seq_lens, mid_o, mid_lse,
        float(scale), splits,
        *q.stride(), *kv_cache.stride(), *block_table.stride(), *mid_o.stride(), *mid_lse.stride(),
        GROUP=hq // hkv,
        PAGE=kv_cache.shape[2],
        HEAD_DIM=dim,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        num_warps=4,
    )
    _attn_combine_kernel[(rows, hq)](
        mid_o, mid_lse, out, lse, splits,
        *mid_o.stride(), *mid_lse.stride(), *out.stride(), *lse.stride(),
        HEAD_DIM=dim,
        BLOCK_D=block_d,
        BLOCK_S=triton.next_power_of_2(splits),
        num_warps=4,
    )
    return out, lse


# -- vLLM's kernels (CUDA, vLLM installed) -----------------------------------


def _flash_attn_version(head_size: int, block_size: int) -> int | None:
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


def _vllm_triton_available() -> bool:
    try:
        from vllm.triton_utils import HAS_TRITON
        from vllm.v1.attention.ops import triton_decode_attention  # noqa: F401
    except Exception:
        return False
    return bool(HAS_TRITON)


def select_attention(
    device: torch.device, head_size: int, block_size: int, dtype: torch.dtype | None = None
) -> str:
    """The attention kernel for this device (see the module docstring).
    FlashAttention only for fp16/bf16 caches and block sizes divisible by 16."""
    if device.type == "cuda":
        fa_ok = dtype in (None, torch.float16, torch.bfloat16) and block_size % 16 == 0
        if fa_ok and _flash_attn_version(head_size, block_size) is not None:
            return "flash_attn"
        if _vllm_triton_available():
            return "vllm_triton"
    return "triton"


def flash_attn_decode(q, kv_cache, block_table, seq_lens, scale, max_seq_len, out=None):
    """vLLM's FlashAttention over the paged cache, one query per row."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    rows, hq, dim = q.shape
    key_cache, value_cache = kv_cache.transpose(1, 2).split(dim, dim=-1)
    if out is None:
        out = torch.empty_like(q)
    cu_q = torch.arange(rows + 1, dtype=torch.int32, device=q.device)
    version = _flash_attn_version(dim, kv_cache.shape[2])
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
        fa_version=version,
    )
    # FlashAttention returns the varlen LSE as [Hq, total_q].
    return out, (lse.transpose(0, 1) if lse.shape[0] == hq and lse.shape[1] == rows else lse)


def vllm_triton_decode(q, kv_cache, block_table, seq_lens, scale, max_seq_len, out=None, block_n=64):
    """vLLM's Triton decode attention (split-KV), which writes the LSE."""
    from vllm.v1.attention.ops.triton_decode_attention import decode_attention_fwd

    return call_vllm_triton_decode(
        decode_attention_fwd, q, kv_cache, block_table, seq_lens, scale, max_seq_len, out, block_n
    )


def call_vllm_triton_decode(
    fn, q, kv_cache, block_table, seq_lens, scale, max_seq_len, out=None, block_n=64
):
    rows, hq, dim = q.shape
    key_cache, value_cache = kv_cache.transpose(1, 2).split(dim, dim=-1)  # [blocks, bs, Hkv, D]
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty(rows, hq, dtype=torch.float32, device=q.device)
    splits = num_splits_for(rows, hq, max_seq_len, block_n)
    logits = torch.empty(rows, hq, splits, dim + 1, dtype=torch.float32, device=q.device)
    fn(
        q, key_cache, value_cache, out, lse, block_table, seq_lens, logits, splits, scale,
        page_size=kv_cache.shape[2],
    )
    return out, lse


def decode_attention(
    q, kv_cache, block_table, seq_lens, scale, max_seq_len, out=None, impl: str | None = None
):
    """Paged decode attention with LSE on the selected kernel; ``(out, lse [R, Hq])``."""
    impl = impl or select_attention(q.device, q.shape[-1], kv_cache.shape[2], kv_cache.dtype)
    if impl == "flash_attn":
        return flash_attn_decode(q, kv_cache, block_table, seq_lens, scale, max_seq_len, out)
    if impl == "vllm_triton":
        return vllm_triton_decode(q, kv_cache, block_table, seq_lens, scale, max_seq_len, out)
    if impl == "triton":
        return triton_decode_attention(q, kv_cache, block_table, seq_lens, scale, max_seq_len, out)
    raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}; got {impl!r}")
