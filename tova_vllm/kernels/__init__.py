"""Triton kernels of the CUDA fast path (fused TOVA scoring on the paged
cache, paged decode attention with LSE, the whole decode step), and
`reference`: the same computations in plain PyTorch.

Imports only torch and triton (vLLM lazily, for its attention kernels), so
the GPU check runs where vLLM is absent. Triton reads ``TRITON_INTERPRET``
when a kernel is defined, i.e. when this package is first imported.
"""

from tova_vllm.kernels.attention import (
    ATTENTION_IMPLS,
    decode_attention,
    select_attention,
    triton_decode_attention,
)
from tova_vllm.kernels.decode_step import tova_decode_step
from tova_vllm.kernels.scoring import head_sum, masked_argmin, tova_select

__all__ = [
    "ATTENTION_IMPLS",
    "decode_attention",
    "head_sum",
    "masked_argmin",
    "select_attention",
    "tova_decode_step",
    "tova_select",
    "triton_decode_attention",
]
