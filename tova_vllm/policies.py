"""KV eviction policies as small pure functions on tensors.

Shared by the transformers reference (`tova_vllm.reference`) and the vLLM
attention backend (`tova_vllm.backend`), so both evict by the same rule.

Every policy is expressed the same way: per cached slot it gives a *keep
priority* (higher = kept longer) and a *protected* mask (never evicted while
protected). Selection is then one shared rule:

* evict the lowest priority among unprotected, valid slots;
* ties: the slot with the lowest index is evicted first (``torch.argmin`` and a
  stable ascending sort both pick the first of equal values).

In the reference, slot index == chronological order, so a tie evicts the oldest
token. In the paged vLLM cache, slots are reused in place, so a tie may pick a
different token there; exact float ties of head-averaged softmax probabilities
do not occur on real text (see tests), so greedy tokens still match.

Policies (budget ``k`` tokens per layer; see ../shared/design.md):

* ``tova``: priority = the last query's attention probabilities averaged over
  all query heads of the layer (GQA aware: over query heads, not KV heads).
* ``window``: priority = position (keep the most recent ``k``).
* ``sink``: priority = position, the first ``num_sinks`` positions protected
  (StreamingLLM: first S tokens plus the most recent ``k - S``).
* ``h2o``: head-wise. Per KV head, priority = attention accumulated over every
  query so far (mean over that KV head's query heads); the most recent
  `h2o_recent_size` tokens (half the budget by default) are protected, the
  rest compete as heavy hitters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

POLICIES: tuple[str, ...] = ("tova", "window", "sink", "h2o")
DEFAULT_NUM_SINKS = 4
DEFAULT_H2O_RECENT_RATIO = 0.5


@dataclass(frozen=True)
class PolicyConfig:
    """A validated eviction policy: name, budget and policy-specific options."""

    name: str
    budget: int
    num_sinks: int = DEFAULT_NUM_SINKS
    h2o_recent_ratio: float = DEFAULT_H2O_RECENT_RATIO

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ValueError(
                f"kv_policy must be one of {', '.join(POLICIES)}; got {self.name!r}"
            )
        if isinstance(self.budget, bool) or not isinstance(self.budget, int):
            raise ValueError(
                f"kv_budget must be a positive integer (tokens per layer); "
                f"got {self.budget!r}"
            )
        if self.budget <= 0:
            raise ValueError(
                f"kv_budget must be a positive integer (tokens per layer); "
                f"got {self.budget}"
            )
        if self.name == "sink":
            if (
                isinstance(self.num_sinks, bool)
                or not isinstance(self.num_sinks, int)
                or not 0 <= self.num_sinks < self.budget
            ):
                raise ValueError(
                    f"kv_num_sinks must be an integer in [0, kv_budget - 1] = "
                    f"[0, {self.budget - 1}]; got {self.num_sinks!r}"
                )
        if self.name == "h2o":
            r = self.h2o_recent_ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1:
                raise ValueError(
                    f"kv_h2o_recent_ratio must be a number in (0, 1); got {r!r}"
                )

    @property
    def head_wise(self) -> bool:
        """Whether each KV head keeps its own token set (H2O)."""
        return self.name == "h2o"

    @property
    def needs_attention(self) -> bool:
        """Whether selection reads attention probabilities."""
        return self.name in ("tova", "h2o")

    @property
    def h2o_recent(self) -> int:
        return h2o_recent_size(self.budget, self.h2o_recent_ratio)


def h2o_recent_size(budget: int, recent_ratio: float = DEFAULT_H2O_RECENT_RATIO) -> int:
    """Number of most recent tokens H2O protects; the rest of the budget are
    heavy hitters. At least 1 (the newest token), at most ``budget - 1``."""
    return min(max(int(round(budget * recent_ratio)), 1), max(budget - 1, 1))


def head_average(probs: torch.Tensor, num_kv_heads: int | None = None) -> torch.Tensor:
    """Average attention probabilities over query heads.

    ``probs``: ``[..., num_q_heads, n]``. With ``num_kv_heads`` given, average
    within each KV head's query group instead (GQA: query head ``h`` belongs to
    KV head ``h // (num_q_heads // num_kv_heads)``), giving
    ``[..., num_kv_heads, n]``. Always accumulated in float32.
    """
    probs = probs.float()
    if num_kv_heads is None:
        return probs.mean(dim=-2)
    hq, n = probs.shape[-2], probs.shape[-1]
    group = hq // num_kv_heads
    return probs.reshape(*probs.shape[:-2], num_kv_heads, group, n).mean(dim=-2)


def window_priority(positions: torch.Tensor) -> torch.Tensor:
    """Keep the most recent: priority is the true position."""
    return positions.to(torch.float64)


def sink_protected(positions: torch.Tensor, num_sinks: int) -> torch.Tensor:
    return positions < num_sinks


def recent_protected(positions: torch.Tensor, newest: torch.Tensor | int, recent: int):
    """Protect the ``recent`` most recent positions (``newest`` included)."""
    if isinstance(newest, torch.Tensor):
        newest = newest.unsqueeze(-1) if newest.dim() < positions.dim() else newest
    return positions > newest - recent


def masked_priority(
    priority: torch.Tensor,
    protected: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Priority with protected slots at +inf and invalid slots at -inf (so an
    empty slot is 'evicted' first and a protected one never)."""
    p = priority.to(torch.float64)
    if protected is not None:
        p = p.masked_fill(protected, float("inf"))
    if valid is not None:
        p = p.masked_fill(~valid, float("-inf"))
    return p


def evict_one(priority: torch.Tensor) -> torch.Tensor:
    """Index of the slot to evict along the last dim (lowest priority; ties: the
    lowest index)."""
    return torch.argmin(priority, dim=-1)


def keep_top(priority: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (ascending) of the ``keep`` slots to keep along the last dim.

    Evicts the ``n - keep`` lowest priorities; ties evict the lowest index first
    (a stable ascending sort), matching `evict_one`.
    """
    n = priority.shape[-1]
    if keep >= n:
        shape = (*priority.shape[:-1], n)
        return torch.arange(n, device=priority.device).expand(shape).clone()
    order = torch.sort(priority, dim=-1, stable=True).indices
    kept = order[..., n - keep :]
    return torch.sort(kept, dim=-1).values
