"""How a keep priority becomes a choice: the one sign convention, the tie rule
and the masks, shared by the transformers reference (`tova_vllm.reference`),
the vLLM backend (`tova_vllm.backend`) and the tests.

* **Higher priority = kept longer.** A policy returns, per candidate slot, a
  finite keep priority; `PROTECTED` (+inf) marks a slot it never evicts.
* **Masks, applied by the caller after the policy:** an `EMPTY` slot holds no
  token (padding in the reference; the free slot a not-yet-full request
  writes its new token to in the engine) and goes first (-inf). An `OUTSIDE`
  slot is not one of the row's slots at all (the padding of a batched gather)
  and never competes (+inf; a row always has an unprotected real slot or an
  empty one, which ranks lower).
* **Ties: the lowest slot index is evicted first** (``torch.argmin`` and a
  stable ascending sort both pick the first of equal values). In the reference
  a slot's index is its chronological order, so a tie evicts the oldest token;
  in the paged cache slots are reused in place, so a tie between two cached
  slots may pick another token there, and a cached slot always loses a tie to
  the newest token (which is the last column). Exact ties of float
  probabilities are rare on real text; parity tests report the margin where
  two implementations choose differently (`margin`).

Priorities are compared in at least float32 (float64 stays float64, so the
reference can be compared with other implementations in float64).
"""

from __future__ import annotations

import torch

PROTECTED = float("inf")
EMPTY = float("-inf")
OUTSIDE = float("inf")

# The codes a batched caller (the engine's metadata builder) gives its slots;
# `CODE_BIAS[code]` is what `mask` adds for them.
REAL, EMPTY_SLOT, OUTSIDE_SLOT = 0, 1, 2
CODE_BIAS = (0.0, EMPTY, OUTSIDE)


def as_priority(priority: torch.Tensor) -> torch.Tensor:
    """The priority in the dtype selection compares: float32, or float64 when
    it already is."""
    if priority.dtype == torch.float64:
        return priority
    return priority.float()


def protect(priority: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """``priority`` with the ``protected`` slots never evicted."""
    return as_priority(priority).masked_fill(protected, PROTECTED)


def mask(
    priority: torch.Tensor,
    empty: torch.Tensor | None = None,
    outside: torch.Tensor | None = None,
) -> torch.Tensor:
    """A policy's priority with the caller's masks: empty slots first, slots
    outside the row never (`EMPTY` wins over a policy's `PROTECTED`)."""
    p = as_priority(priority)
    if empty is not None:
        p = p.masked_fill(empty, EMPTY)
    if outside is not None:
        p = p.masked_fill(outside, OUTSIDE)
    return p


def code_bias(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive form of `mask` for batched callers: ``priority + bias``
    gives the same result for finite priorities (the engine adds it in one
    operation per layer)."""
    table = torch.tensor(CODE_BIAS, dtype=dtype, device=codes.device)
    return table[codes.long()]


def evict_one(priority: torch.Tensor) -> torch.Tensor:
    """Index of the slot to evict along the last dim: the lowest priority,
    ties to the lowest index."""
    return torch.argmin(priority, dim=-1)


def keep_top(priority: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (ascending) of the ``keep`` slots to keep along the last dim.

    Evicts the ``n - keep`` lowest priorities; ties evict the lowest index
    first, so it keeps exactly what `evict_one` applied ``n - keep`` times to
    fixed priorities keeps. On the CPU by a threshold (`keep_top_threshold`:
    a selection, no sort); elsewhere by a stable sort (`keep_top_sorted`).
    """
    n = priority.shape[-1]
    if keep >= n:
        shape = (*priority.shape[:-1], n)
        return torch.arange(n, device=priority.device).expand(shape).clone()
    if priority.device.type == "cpu":
        return keep_top_threshold(priority, keep)
    return keep_top_sorted(priority, keep)


def keep_top_sorted(priority: torch.Tensor, keep: int) -> torch.Tensor:
    """`keep_top` by a stable ascending sort (``keep < n``)."""
    n = priority.shape[-1]
    order = torch.sort(priority, dim=-1, stable=True).indices
    kept = order[..., n - keep :]
    return torch.sort(kept, dim=-1).values


def keep_top_threshold(priority: torch.Tensor, keep: int) -> torch.Tensor:
    """`keep_top` without a sort (``keep < n``): the ``e = n - keep``-th
    lowest priority ``v`` splits the slots; all below ``v`` go, and of those
    equal to ``v`` the lowest indices go until ``e`` have; the rest, in index
    order, are kept. Without a tie at ``v`` (the usual case) that is just
    the slots above ``v``: five operations, where two sorts took four times
    as long on the CPU at 2,112 slots."""
    n = priority.shape[-1]
    evict = n - keep
    if evict == n:
        return torch.empty((*priority.shape[:-1], 0), dtype=torch.long, device=priority.device)
    v = torch.kthvalue(priority, evict, dim=-1, keepdim=True).values
    kept = priority > v
    total = keep * (kept.numel() // n)
    if int(kept.sum()) != total:  # a tie at v in some row
        equal = priority == v
        below = (priority < v).sum(dim=-1, keepdim=True)
        kept |= equal & (equal.cumsum(dim=-1) > evict - below)
        if int(kept.sum()) != total:  # NaN (no order): as the sort orders it
            return keep_top_sorted(priority, keep)
    return kept.nonzero()[:, -1].view(*priority.shape[:-1], keep)


def margin(priority: torch.Tensor, chosen: int, other: int) -> dict[str, float]:
    """How close two candidates of one row were (for parity reports): their
    priorities and the difference relative to the larger magnitude."""
    a, b = float(priority[..., chosen]), float(priority[..., other])
    scale = max(abs(a), abs(b), 1e-30)
    return {"chosen": a, "other": b, "relative_gap": abs(a - b) / scale}


def head_average(probs: torch.Tensor, num_kv_heads: int | None = None) -> torch.Tensor:
    """Average attention probabilities ``[..., num_q_heads, n]`` over query
    heads, or with ``num_kv_heads`` within each KV head's query group (GQA:
    query head ``h`` belongs to KV head ``h // (num_q_heads // num_kv_heads)``),
    giving ``[..., num_kv_heads, n]``. In at least float32."""
    probs = as_priority(probs)
    if num_kv_heads is None:
        return probs.mean(dim=-2)
    hq, n = probs.shape[-2], probs.shape[-1]
    return probs.reshape(*probs.shape[:-2], num_kv_heads, hq // num_kv_heads, n).mean(dim=-2)
