"""The KV page of the TOVA backend, and the slot-index arithmetic.

Each (block, KV head, slot) cell holds ``C = 2 * head_size + SIDE`` elements
of the cache dtype: the key, the value, then a 16-byte side channel with the
slot's true position (int32, bytes 0-3) and its accumulated score (float32,
bytes 4-7, for policies that accumulate, e.g. H2O), padded to 16 bytes so
that every head's row stays 16-byte aligned for FlashAttention. The side
channel is part of vLLM's page (`TovaAttentionSpec.state_content_bytes`), so
vLLM's memory profiling and block counts include it, and copying a slot moves
its position and score with its K/V in one operation: a block's stale values
are never read by its next owner, since every slot a request reads it wrote
itself. Cost: 16 bytes per slot and KV head beside K+V's ``2 * head_size *
dtype`` bytes (3.1% at head size 64 in float32 or 128 in bfloat16).

The backend declares vLLM's LBNHC layout (``[layer, block, slot, head, C]``
in memory), so a layer's cache viewed slot-major is one contiguous
``[num_blocks * block_size, Hkv, C]`` tensor (`SlotView`): a slot is one
index, ``block_id * block_size + offset``, and a whole slot (every head, K, V,
position, score) moves with one ``index_copy_``.
"""

from __future__ import annotations

import torch

SIDE_BYTES = 16
# Where the flat slot index of "nowhere" points: slot 0 of vLLM's null block
# (block 0, never given to a request). A new token the policy evicts at once is
# written there instead of being skipped, which keeps the write one operation.
SINK_SLOT = 0


def side_elements(dtype: torch.dtype) -> int:
    return SIDE_BYTES // dtype.itemsize


def content_bytes(head_size: int, dtype: torch.dtype) -> int:
    """Bytes per (slot, KV head): K, V and the side channel."""
    return 2 * head_size * dtype.itemsize + SIDE_BYTES


def encode_side(positions: torch.Tensor, dtype: torch.dtype, scores: torch.Tensor | None = None) -> torch.Tensor:
    """The side channel ``[..., SIDE]`` in ``dtype`` for the given positions
    (and float32 scores; 0 when None)."""
    words = torch.zeros((*positions.shape, SIDE_BYTES // 4), dtype=torch.int32, device=positions.device)
    words[..., 0] = positions.to(torch.int32)
    if scores is not None:
        words[..., 1] = scores.to(torch.float32).view(torch.int32)
    return words.view(dtype)


def slot_ids(blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat slot indices of every slot of ``blocks`` (``[..., nb]`` block
    ids): ``[..., nb * block_size]``, in slot order."""
    offs = torch.arange(block_size, device=blocks.device)
    return (blocks.unsqueeze(-1) * block_size + offs).flatten(-2)


def row_slot_ids(block_row: torch.Tensor, slots: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat slot indices of a request's slots ``slots`` (its block-table
    row ``block_row``)."""
    return block_row[torch.div(slots, block_size, rounding_mode="floor")].long() * block_size + slots % block_size


class SlotView:
    """One layer's KV cache, slot-major: ``slots`` ``[num_blocks * bs, Hkv, C]``
    (a view, no copy), with typed views of the side channel."""

    def __init__(self, kv_cache: torch.Tensor, head_size: int) -> None:
        nb, hkv, bs, c = kv_cache.shape
        if c != 2 * head_size + side_elements(kv_cache.dtype):
            raise RuntimeError(
                f"tova-vllm: the KV cache's last dimension is {c}; the TOVA page needs "
                f"2 * head_size + {side_elements(kv_cache.dtype)} = "
                f"{2 * head_size + side_elements(kv_cache.dtype)} (TovaAttentionSpec.state_content_bytes)"
            )
        slot_major = kv_cache.permute(0, 2, 1, 3)
        if not slot_major.is_contiguous():
            raise RuntimeError(
                "tova-vllm: the KV cache is not in the LBNHC layout the TOVA backend declares "
                f"(strides {tuple(kv_cache.stride())}); was VLLM_KV_CACHE_LAYOUT set to another layout?"
            )
        self.cache = kv_cache
        self.block_size = bs
        self.num_kv_heads = hkv
        self.head_size = head_size
        self.slots = slot_major.view(nb * bs, hkv, c)
        self.pages = slot_major.view(nb, bs * hkv * c)  # one row per block: what decode gathers
        side = self.slots[..., 2 * head_size :].view(torch.int32)  # [S, Hkv, 4]
        self.positions = side[..., 0]  # [S, Hkv] int32
        self.scores = side[..., 1:2].view(torch.float32)[..., 0]  # [S, Hkv] float32
