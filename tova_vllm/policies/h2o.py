"""H2O, heavy-hitter oracle (arXiv 2306.14048), head-wise as its authors run it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from tova_vllm.policies.base import Candidates, EvictionPolicy, option
from tova_vllm.policies.registry import register_policy
from tova_vllm.policies.selection import protect


@register_policy
@dataclass(frozen=True)
class H2O(EvictionPolicy):
    """Per KV head, a recent window plus the heavy hitters by attention accumulated over every query so far."""

    name: ClassVar[str] = "h2o"
    per_kv_head: ClassVar[bool] = True
    reads_positions: ClassVar[bool] = True
    accumulates: ClassVar[bool] = True
    # Every prompt query adds to the scores: a prefix-cache hit skips them.
    prefix_cacheable: ClassVar[bool] = False

    recent_ratio: float = option(
        0.5,
        key="kv_h2o_recent_ratio",
        min=0,
        max=1,
        min_open=True,
        max_open=True,
        help="share of the budget kept as the recent window; the rest are heavy hitters",
    )

    def recent(self, budget: torch.Tensor) -> torch.Tensor:
        """Most recent tokens protected per budget: round(budget * ratio),
        at least 1 (the newest), at most budget - 1 (half to even, like
        Python's round)."""
        r = torch.round(budget.double() * self.recent_ratio).long().clamp(min=1)
        return torch.minimum(r, (budget - 1).clamp(min=1))

    def priority(self, view: Candidates):
        recent = self.recent(view.budget)
        protected = view.positions > (view.newest - recent)[:, None, None]
        return protect(view.state, protected)

    def accumulate(self, state, attention):
        return state + attention
