"""Window: the most recent tokens (the paper's simplest baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tova_vllm.policies.base import Candidates, EvictionPolicy
from tova_vllm.policies.registry import register_policy


@register_policy
@dataclass(frozen=True)
class Window(EvictionPolicy):
    """Keeps the most recent tokens."""

    name: ClassVar[str] = "window"
    reads_positions: ClassVar[bool] = True

    def priority(self, view: Candidates):
        # Every KV head holds the same tokens: head 0's positions say it all.
        return view.positions[:, :1]
