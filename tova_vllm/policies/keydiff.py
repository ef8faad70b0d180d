"""KeyDiff (arXiv 2504.15364, kvpress' KeyDiffPress): query-agnostic."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F

from tova_vllm.policies.base import Candidates, EvictionPolicy
from tova_vllm.policies.registry import register_policy


@register_policy
@dataclass(frozen=True)
class KeyDiff(EvictionPolicy):
    """Per KV head, keeps the keys least similar to the mean key (query-agnostic)."""

    name: ClassVar[str] = "keydiff"
    per_kv_head: ClassVar[bool] = True
    reads_keys: ClassVar[bool] = True

    def priority(self, view: Candidates):
        keys = view.keys.float()  # [R, Hkv, n, D]
        valid = view.valid.unsqueeze(-1)  # [R, 1, n, 1]: the mean is over real slots only
        unit = F.normalize(keys, dim=-1)
        anchor = (unit * valid).sum(dim=-2, keepdim=True) / valid.sum(dim=-2, keepdim=True).clamp(min=1)
        return -F.cosine_similarity(keys, anchor, dim=-1)
