"""KNorm (kvpress' KnormPress): per KV head, keeps the keys with the lowest L2 norm."""

from dataclasses import dataclass
from typing import ClassVar

from tova_vllm.policies import Candidates, EvictionPolicy, option, register_policy
from tova_vllm.policies.selection import protect


@register_policy
@dataclass(frozen=True)
class KNorm(EvictionPolicy):
    """Per KV head, keeps the keys with the lowest L2 norm (query-agnostic, kvpress' KnormPress)."""

    name: ClassVar[str] = "knorm"
    per_kv_head: ClassVar[bool] = True
    reads_keys: ClassVar[bool] = True
    reads_positions: ClassVar[bool] = True

    protect_recent: int = option(1, min=0, below_budget=True, help="most recent tokens always kept")

    def priority(self, view: Candidates):
        recent = view.positions > (view.newest.view(-1, 1, 1) - self.protect_recent)
        return protect(-view.keys.float().norm(dim=-1), recent)
