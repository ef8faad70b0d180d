"""Triton helpers shared by the attention and scoring kernels.

GQA-aware tiles: a program holds the query heads of one KV head as a
``[BLOCK_H, D]`` block (``BLOCK_H`` = the group padded to a power of two, at
least 16 for ``tl.dot``) and loads each K/V tile once for the whole group.
With one query head per KV head (MHA) ``BLOCK_H = 1`` and the contractions
are plain multiply-and-sum (``USE_DOT = False``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_NATIVE_DOT = (torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """Triton's interpreter (``TRITON_INTERPRET=1``, the CPU tests)."""
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # older triton
        return os.environ.get("TRITON_INTERPRET") == "1"


def group_tile(group: int) -> tuple[int, bool]:
    """``(BLOCK_H, USE_DOT)`` for a query group of ``group`` heads per KV head."""
    if group == 1:
        return 1, False
    return max(16, triton.next_power_of_2(group)), True


def dot_in_f32(q_dtype: torch.dtype, kv_dtype: torch.dtype) -> bool:
    """Whether the contractions run on float32 operands (IEEE, no TF32).

    Native fp16/bf16 ``tl.dot`` (fp32 accumulation; products of two halves
    are exact in fp32) needs both operands in the same half type. Otherwise
    (fp32 caches, a query dtype different from the cache's) both go to fp32.
    Triton's interpreter multiplies bf16 operands as their raw uint16 bits,
    so under the interpreter bf16 also goes through fp32 (same math)."""
    if q_dtype != kv_dtype or q_dtype not in _NATIVE_DOT:
        return True
    return q_dtype == torch.bfloat16 and interpreting()


@triton.jit
def _qk(q, k, USE_DOT: tl.constexpr, DOT_F32: tl.constexpr):
    """``q [BLOCK_H, D] . k [BLOCK_N, D]^T`` -> ``[BLOCK_H, BLOCK_N]`` float32."""
    if USE_DOT:
        if DOT_F32:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k.to(q.dtype)))
    else:
        s = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
    return s


@triton.jit
def _pv(p, v, USE_DOT: tl.constexpr, DOT_F32: tl.constexpr):
    """``p [BLOCK_H, BLOCK_N] (fp32) @ v [BLOCK_N, D]`` -> ``[BLOCK_H, D]`` float32."""
    if USE_DOT:
        if DOT_F32:
            o = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            o = tl.dot(p.to(v.dtype), v)
    else:
        o = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
    return o
