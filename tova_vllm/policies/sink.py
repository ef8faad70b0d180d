"""Attention sinks (StreamingLLM, arXiv 2309.17453): the first tokens plus a
recent window (the paper's "window+4")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tova_vllm.policies.base import Candidates, EvictionPolicy, option
from tova_vllm.policies.registry import register_policy
from tova_vllm.policies.selection import protect


@register_policy
@dataclass(frozen=True)
class Sink(EvictionPolicy):
    """Keeps the first kv_num_sinks tokens plus the most recent ones (StreamingLLM)."""

    name: ClassVar[str] = "sink"
    reads_positions: ClassVar[bool] = True

    num_sinks: int = option(
        4, key="kv_num_sinks", min=0, below_budget=True, help="first tokens always kept"
    )

    def priority(self, view: Candidates):
        pos = view.positions[:, :1]
        return protect(pos, pos < self.num_sinks)
