"""TOVA (Token Omission Via Attention, arXiv 2401.06104)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tova_vllm.policies.base import Candidates, EvictionPolicy
from tova_vllm.policies.registry import register_policy


@register_policy
@dataclass(frozen=True)
class TOVA(EvictionPolicy):
    """Drops the token the newest query attends to least, averaged over the layer's query heads."""

    name: ClassVar[str] = "tova"
    reads_attention: ClassVar[bool] = True
    cuda_fast_path: ClassVar[bool] = True

    def priority(self, view: Candidates):
        return view.attention
