"""Triton kernels of the CUDA fast path (the TOVA decode step on the paged
cache: attention with LSE over the held slots + the new token, fused head-sum
scoring, argmin, one write; the prompt path: paged causal attention with LSE
and the last query's head sums), and `reference`: the same in plain PyTorch.

Cache layout: `layout` (vLLM's LBNHC, ``C = 2 * D + 16 bytes`` per (slot,
head): K, V, side channel).

Imports only torch and triton (vLLM lazily, for its attention kernels), so
the GPU check runs where vLLM is absent. Triton reads ``TRITON_INTERPRET``
when a kernel is defined, i.e. when this package is first imported.
"""

from tova_vllm.kernels.attention import (
    ATTENTION_IMPLS,
    decode_attention,
    merge_new_token,
    select_attention,
    triton_decode_attention,
)
from tova_vllm.kernels.decode_step import tova_decode_step
from tova_vllm.kernels.layout import make_kv_cache, side_channel_elems, slot_elems
from tova_vllm.kernels.prefill import last_query_head_sum, paged_prefill_attention
from tova_vllm.kernels.scoring import head_sum, masked_argmin, select_and_write

__all__ = [
    "ATTENTION_IMPLS",
    "decode_attention",
    "head_sum",
    "last_query_head_sum",
    "make_kv_cache",
    "masked_argmin",
    "merge_new_token",
    "paged_prefill_attention",
    "select_and_write",
    "select_attention",
    "side_channel_elems",
    "slot_elems",
    "tova_decode_step",
    "triton_decode_attention",
]
