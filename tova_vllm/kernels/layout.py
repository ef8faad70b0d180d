"""The KV cache layout the engine hands the kernels, and small helpers.

Per layer, ``kv_cache`` is a logical ``[num_blocks, Hkv, block_size, C]``
tensor in the cache dtype with vLLM's LBNHC physical layout::

    torch.empty(num_blocks, block_size, Hkv, C, dtype=dt).transpose(1, 2)

i.e. per block, heads step by ``C`` elements and tokens by ``Hkv * C``.
``C = 2 * D + S`` with ``S = 16 bytes / element size`` (fp32: 4, fp16/bf16: 8):

* ``[0, D)``: K;  ``[D, 2D)``: V;
* ``[2D, C)``: a 16-byte side channel per (slot, head): int32 true position
  at bytes 0..3, float32 accumulated score at bytes 4..7, 8 bytes padding
  (so every head row stays 16-byte aligned for FlashAttention).

The kernels read only K and V; when they write a slot they write its whole
``C`` elements (the caller supplies them), bit for bit. Block 0 is vLLM's
null block, never used by a request. Slot ``s`` of a row lives in block
``block_table[row, s // block_size]`` at offset ``s % block_size``.
"""

from __future__ import annotations

import torch

SIDE_CHANNEL_BYTES = 16
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def side_channel_elems(dtype: torch.dtype) -> int:
    """Elements of the 16-byte side channel in ``dtype`` (fp32: 4, fp16/bf16: 8)."""
    size = torch.empty((), dtype=dtype).element_size()
    if SIDE_CHANNEL_BYTES % size:
        raise ValueError(f"cache dtype {dtype} does not divide the {SIDE_CHANNEL_BYTES}-byte side channel")
    return SIDE_CHANNEL_BYTES // size


def slot_elems(head_size: int, dtype: torch.dtype) -> int:
    """``C = 2 * head_size + side_channel_elems(dtype)``."""
    return 2 * head_size + side_channel_elems(dtype)


def make_kv_cache(num_blocks, num_kv_heads, block_size, head_size, dtype, device=None) -> torch.Tensor:
    """An (uninitialised) cache exactly as the engine allocates it."""
    c = slot_elems(head_size, dtype)
    return torch.empty(num_blocks, block_size, num_kv_heads, c, dtype=dtype, device=device).transpose(1, 2)


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """The same memory as a same-size integer tensor (same shape and strides):
    copies through it are bit exact (the side channel holds int32/float32 bit
    patterns that a float copy could canonicalise, e.g. NaN payloads)."""
    return t.view(_BITS[t.element_size()])


def check_kv_cache(kv_cache: torch.Tensor, head_size: int) -> None:
    """Shape checks only (no sync): 4-D, last dim >= 2 * head_size, unit last stride."""
    if kv_cache.dim() != 4:
        raise ValueError(f"kv_cache must be [num_blocks, Hkv, block_size, C]; got {tuple(kv_cache.shape)}")
    if kv_cache.shape[3] < 2 * head_size:
        raise ValueError(f"kv_cache last dim {kv_cache.shape[3]} < 2 * head_size ({2 * head_size})")
    if kv_cache.stride(3) != 1:
        raise ValueError("kv_cache's last dim must be contiguous")


def key_value_views(kv_cache: torch.Tensor, head_size: int):
    """K and V as strided ``[num_blocks, block_size, Hkv, D]`` views (what
    FlashAttention's and vLLM's Triton paged kernels take)."""
    kv = kv_cache.transpose(1, 2)
    return kv[..., :head_size], kv[..., head_size : 2 * head_size]
