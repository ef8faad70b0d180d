"""Planning one step, on the host: a pure function of the batch (no tensors
on the device, no engine), unit-tested on its own (tests/test_planning.py).

The slot invariant, per request and layer, with budget ``k``: the request's
kept tokens are slots ``0 .. held - 1`` of its block-table row (any order:
attention does not depend on it, keys carry their RoPE position already),
``held <= k`` once its prompt is processed. Everything below follows from
positions, prompt lengths and the request's settings, so the worker keeps no
per-request state: preemption (recompute), rows moving in the batch and rows
leaving need no bookkeeping.

* **Prompt segments.** Prompt tokens are processed in segments, each one
  attending causally over the slots held before it plus itself, written after
  them. ``bulk`` (and the first ``min(P, k)`` tokens of a ``stream`` prompt):
  slot = position; after the prompt's last token, a prompt longer than ``k``
  is reduced to the ``k`` tokens the policy keeps. ``chunked``: chunks of
  ``C`` tokens from position 0; after each chunk (and after the prompt's last
  token) the cache is reduced to ``k`` by the policy, so a request holds at
  most ``k + C`` slots. A scheduler chunk may end inside a chunk: the next
  step continues it (the slots held follow from the position alone:
  `chunked_held`).
* **Waves.** Every later token (every token of a streamed prompt past its
  first ``k``, and recomputed output tokens) at position ``p`` sees the
  ``held = min(p, k)`` kept slots plus itself; if ``held == k`` the policy
  evicts one of the ``k + 1`` (possibly the new token), else the new token
  goes to slot ``held``. Wave ``j`` holds the ``j``-th such token of every row
  (a plain decode step is one wave), so a preempted request that recomputes
  prompt and output in one chunk evicts exactly as it did while decoding.
  Rows of a wave gather whole blocks, so a wave is bucketed by block count
  (powers of two) and its rows are ordered by policy group (each group is
  then a contiguous slice).
* **With prefix caching** (a ``bulk`` prompt whose policy is
  ``prefix_cacheable``): the request's block-table row is ``[prompt region:
  cdiv(P, block_size) blocks, slot = position, shared and hashed][kept region]``.
  The prompt is written positionally in its region (blocks another request
  computed may be hit there); at its end the kept tokens (all of them when
  ``P <= k``) are copied into the kept region, and from then on only the kept
  region is used (`prompt_region_blocks`: the kept region's first block). The
  scheduler then replaces the prompt region with null blocks; hashed ones go
  back to the pool still cached.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BULK, CHUNKED, STREAM = 0, 1, 2
MODE_CODES = {"bulk": BULK, "chunked": CHUNKED, "stream": STREAM}


def cdiv(a, b):
    return -(-a // b)


def chunked_held(t: int, budget: int, chunk: int) -> int:
    """Slots a ``chunked`` prompt holds after its first ``t`` tokens (before
    the reduction at the prompt's end): the kept ``min(boundary, k)`` plus the
    tokens of the current chunk."""
    boundary = (t // chunk) * chunk
    return min(boundary, budget) + (t - boundary)


def prompt_region_blocks(prompt_len: int, block_size: int, mode: int, cacheable: bool, prefix_caching: bool) -> int:
    """Blocks of a request's prompt region (0: no region, the kept tokens
    stay in place): a bulk prompt whose policy is prefix-cacheable, on an
    engine with prefix caching."""
    if prefix_caching and cacheable and mode == BULK:
        return cdiv(prompt_len, block_size)
    return 0


@dataclass(frozen=True)
class Segment:
    """Prompt tokens ``[tok_start, tok_end)`` of the step (positions from
    ``pos_start``) of row ``row``: attend over the ``ctx`` slots held before
    and themselves, written to slots ``ctx ..``; then, if ``reduce``, keep
    ``budget`` of the ``ctx + len`` slots, in slots ``0 ..`` of the block-table
    row from block ``dest_block`` on (0: in place; the kept region of a
    request with a prompt region)."""

    row: int
    tok_start: int
    tok_end: int
    pos_start: int
    ctx: int
    reduce: bool
    budget: int
    group: int
    dest_block: int = 0

    @property
    def in_prompt_region(self) -> bool:
        """Written positionally in a shared prompt region: every such segment
        of a step is written before any row attends (another request may
        read these blocks in the same step)."""
        return self.dest_block > 0

    @property
    def length(self) -> int:
        return self.tok_end - self.tok_start


@dataclass
class Wave:
    """One token of each of its rows; arrays ``[R]`` (int64), rows ordered by
    policy group: ``groups`` = ``(group, start, end)`` slices of them.
    ``offsets``: the first block of each row's kept slots."""

    rows: np.ndarray
    tokens: np.ndarray
    positions: np.ndarray
    held: np.ndarray
    budgets: np.ndarray
    offsets: np.ndarray
    num_blocks: int  # blocks gathered per row (the largest of the wave's rows)
    groups: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(self.rows.shape[0])

    @property
    def tokens_contiguous(self) -> bool:
        t = self.tokens
        return bool(t.size) and int(t[-1]) - int(t[0]) == t.size - 1 and bool(np.all(np.diff(t) == 1))


@dataclass
class StepPlan:
    segments: list[Segment]
    waves: list[Wave]


def plan_step(
    query_start: np.ndarray,
    num_computed: np.ndarray,
    num_prompt: np.ndarray,
    budget: np.ndarray,
    mode: np.ndarray,
    chunk: np.ndarray,
    group: np.ndarray,
    block_size: int,
    prompt_blocks: np.ndarray | None = None,
) -> StepPlan:
    """The step's segments and waves. Per row ``r`` (arrays of ``n`` ints,
    ``query_start`` ``n + 1``): the step computes tokens at positions
    ``num_computed[r] ..`` (``query_start[r+1] - query_start[r]`` of them) of
    a request with ``num_prompt[r]`` prompt tokens, budget ``budget[r]``,
    prompt mode ``mode[r]`` (`MODE_CODES`), chunk ``chunk[r]``, policy group
    ``group[r]`` and ``prompt_blocks[r]`` blocks of prompt region
    (`prompt_region_blocks`; default none)."""
    query_start = np.asarray(query_start, dtype=np.int64)
    num_computed = np.asarray(num_computed, dtype=np.int64)
    num_prompt = np.asarray(num_prompt, dtype=np.int64)
    budget = np.asarray(budget, dtype=np.int64)
    mode = np.asarray(mode, dtype=np.int64)
    n = num_computed.shape[0]
    prompt_blocks = np.zeros(n, dtype=np.int64) if prompt_blocks is None else np.asarray(prompt_blocks, np.int64)
    q_len = np.diff(query_start)
    end = num_computed + q_len
    # Where the prompt phase ends: a streamed prompt's first min(P, k) tokens
    # evict nothing, so they go in one causal pass like a bulk prompt.
    phase_end = np.where(mode == STREAM, np.minimum(num_prompt, budget), num_prompt)
    seq_start = np.maximum(num_computed, phase_end)  # first token after the prompt phase
    segments: list[Segment] = []
    for r in np.nonzero(num_computed < np.minimum(end, phase_end))[0].tolist():
        segments.extend(
            _segments(r, query_start, num_computed, end, phase_end, num_prompt, budget, mode, chunk, group, prompt_blocks)
        )
    counts = np.maximum(end - seq_start, 0)
    waves: list[Wave] = []
    for j in range(int(counts.max(initial=0))):
        rows = np.nonzero(counts > j)[0]
        pos = seq_start[rows] + j
        tok = query_start[rows] + (seq_start[rows] - num_computed[rows]) + j
        k = budget[rows]
        held = np.minimum(pos, k)
        # Blocks to gather: the held slots, and the free slot `held` a row
        # that is not full writes its new token to.
        nb = cdiv(np.minimum(held + 1, k), block_size)
        bucket = np.floor(np.log2(np.maximum(nb, 1))).astype(np.int64)
        for b in np.unique(bucket).tolist():
            sel = np.nonzero(bucket == b)[0]
            order = sel[np.argsort(group[rows[sel]], kind="stable")]
            g = group[rows[order]]
            starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
            bounds = [(int(g[s]), int(s), int(e)) for s, e in zip(starts, np.r_[starts[1:], g.size])]
            waves.append(
                Wave(
                    rows=rows[order],
                    tokens=tok[order],
                    positions=pos[order],
                    held=held[order],
                    budgets=k[order],
                    offsets=prompt_blocks[rows[order]],
                    num_blocks=int(nb[order].max()),
                    groups=bounds,
                )
            )
    return StepPlan(segments, waves)


def split_wave(w: Wave, take: set[int], block_size: int) -> tuple[Wave | None, Wave | None]:
    """``w``'s rows of the policy groups in ``take``, and the others: two
    waves (None where empty), rows still ordered by group. A wave whose
    groups run on different compute paths is split this way."""
    parts = []
    for chosen in (True, False):
        bounds = [(g, a, b) for g, a, b in w.groups if (g in take) == chosen]
        if not bounds:
            parts.append(None)
            continue
        idx = np.concatenate([np.arange(a, b) for _, a, b in bounds])
        starts = np.cumsum([0] + [b - a for _, a, b in bounds])
        held = w.held[idx]
        budgets = w.budgets[idx]
        parts.append(
            Wave(
                rows=w.rows[idx],
                tokens=w.tokens[idx],
                positions=w.positions[idx],
                held=held,
                budgets=budgets,
                offsets=w.offsets[idx],
                num_blocks=int(cdiv(np.minimum(held + 1, budgets), block_size).max()),
                groups=[(g, int(a), int(b)) for (g, _, _), a, b in zip(bounds, starts[:-1], starts[1:])],
            )
        )
    return parts[0], parts[1]


def _segments(r, query_start, num_computed, end, phase_end, num_prompt, budget, mode, chunk, group, prompt_blocks):
    first, last = int(num_computed[r]), int(min(end[r], phase_end[r]))
    tok0 = int(query_start[r]) - first  # token index of position `first` is tok0 + first
    k, prompt = int(budget[r]), int(num_prompt[r])
    out = []
    if mode[r] == CHUNKED:
        c = int(chunk[r])
        a = first
        while a < last:
            b = min((a // c + 1) * c, last)
            ctx = chunked_held(a, k, c)
            at_boundary = b % c == 0 or b == prompt
            out.append(Segment(r, tok0 + a, tok0 + b, a, ctx, at_boundary and ctx + (b - a) > k, k, int(group[r])))
            a = b
    else:
        region = int(prompt_blocks[r])
        # With a prompt region the kept tokens always move to the kept region.
        reduce = last == prompt and mode[r] == BULK and (prompt > k or region > 0)
        out.append(Segment(r, tok0 + first, tok0 + last, first, first, reduce, k, int(group[r]), region))
    return out


def slots_needed(
    num_tokens: int,
    prompt_len: int,
    budget: int,
    mode: int,
    chunk: int,
    prompt_done: bool,
    prompt_blocks: int = 0,
    block_size: int = 16,
) -> int:
    """Slots of its block-table row a request needs for its first
    ``num_tokens`` tokens (the scheduler side's allocation; the worker never
    uses more): the prompt's while a bulk prompt is being prefilled (also when
    a preempted request recomputes prompt and output in one chunk), ``k + C``
    while a chunked prompt is, else the budget; with a prompt region, the
    region plus the kept slots from the prompt's last token on."""
    if prompt_blocks:
        if num_tokens < prompt_len:
            return num_tokens
        return prompt_blocks * block_size + min(num_tokens, budget)
    if prompt_done or mode == STREAM:
        return min(num_tokens, budget)
    if mode == CHUNKED:
        return min(num_tokens, budget + chunk)
    return min(num_tokens, max(prompt_len, budget))


def peak_blocks(
    prompt_len: int,
    max_tokens: int,
    budget: int,
    mode: int,
    chunk: int,
    prompt_blocks: int,
    block_size: int,
) -> int:
    """The most blocks a request ever holds at once (`slots_needed` over its
    life): a bulk prompt's tokens (with a prompt region, the region and the
    kept slots at the prompt's end), ``k + C`` for a chunked prompt, then at
    most the budget."""
    computed = prompt_len + max(max_tokens, 1) - 1  # the last token's K/V is never computed
    if prompt_blocks:
        prompt_peak = prompt_blocks + cdiv(min(prompt_len, budget), block_size)
    elif mode == BULK:
        prompt_peak = cdiv(prompt_len, block_size)
    elif mode == CHUNKED:
        prompt_peak = cdiv(min(prompt_len, budget + chunk), block_size)
    else:
        prompt_peak = cdiv(min(prompt_len, budget), block_size)
    return max(prompt_peak, cdiv(min(computed, budget), block_size))
