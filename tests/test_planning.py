"""The host-side step planner (`tova_vllm.backend.planning`), with no engine:
segments and waves of hand-made batches, and a property test that simulates
requests step by step (random prompt lengths, budgets, prompt modes, chunks
and scheduler chunkings) with its own stateful bookkeeping and checks the
planner's stateless plan against it, and the slots it uses against
`slots_needed` (what the scheduler side allocates)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tova_vllm.backend.planning import (
    BULK,
    CHUNKED,
    MODE_CODES,
    STREAM,
    Segment,
    cdiv,
    chunked_held,
    plan_step,
    slots_needed,
)

BS = 16


@dataclass
class Row:
    """One row of a step: ``q`` tokens from position ``computed`` of a request."""

    computed: int
    q: int
    prompt: int
    budget: int
    mode: int = BULK
    chunk: int = 0
    group: int = 0


def plan(rows: list[Row], block_size: int = BS):
    qs = np.concatenate([[0], np.cumsum([r.q for r in rows])])
    arr = lambda attr: np.array([getattr(r, attr) for r in rows], dtype=np.int64)  # noqa: E731
    p = plan_step(
        qs, arr("computed"), arr("prompt"), arr("budget"), arr("mode"),
        np.array([r.chunk or r.budget for r in rows], dtype=np.int64), arr("group"), block_size,
    )
    check_coverage(p, rows, qs)
    return p


def check_coverage(p, rows: list[Row], qs) -> None:
    """Every token of the step is in exactly one segment or wave entry, at its
    own position; the waves' group slices are contiguous and cover the wave."""
    seen: dict[int, int] = {}
    for s in p.segments:
        assert s.length > 0
        for i in range(s.length):
            tok = s.tok_start + i
            assert tok not in seen
            seen[tok] = s.pos_start + i
            assert qs[s.row] <= tok < qs[s.row + 1]
    for w in p.waves:
        assert w.size > 0
        assert len(w.tokens) == len(w.positions) == len(w.held) == len(w.budgets) == w.size
        for r, tok, pos in zip(w.rows.tolist(), w.tokens.tolist(), w.positions.tolist()):
            assert tok not in seen
            seen[tok] = pos
            assert qs[r] <= tok < qs[r + 1]
        assert len(set(w.rows.tolist())) == w.size  # one token per row per wave
        # Group slices: contiguous, in order, covering the wave, one group each.
        assert w.groups and w.groups[0][1] == 0 and w.groups[-1][2] == w.size
        for (g, s, e), nxt in zip(w.groups, [*w.groups[1:], None]):
            assert s < e
            assert all(rows[r].group == g for r in w.rows[s:e].tolist())
            if nxt is not None:
                assert nxt[1] == e and nxt[0] > g
    total = int(qs[-1])
    assert sorted(seen) == list(range(total))
    for r, row in enumerate(rows):
        for i in range(row.q):
            assert seen[int(qs[r]) + i] == row.computed + i


def segs(p) -> list[tuple]:
    """Segments as (row, tok_start, tok_end, pos_start, ctx, reduce)."""
    return [(s.row, s.tok_start, s.tok_end, s.pos_start, s.ctx, s.reduce) for s in p.segments]


# ----------------------------------------------------------------- pieces


def test_helpers():
    assert MODE_CODES == {"bulk": BULK, "chunked": CHUNKED, "stream": STREAM}
    assert [cdiv(a, 4) for a in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]
    # chunked_held(t, k, C): the kept min(boundary, k) plus the current chunk's tokens.
    assert [chunked_held(t, 16, 12) for t in (0, 5, 12, 20, 24, 30, 36)] == [0, 5, 12, 20, 16, 22, 16]
    assert [chunked_held(t, 4, 3) for t in (3, 5, 6, 7)] == [3, 5, 4, 5]
    s = Segment(0, 3, 10, 0, 0, False, 8, 0)
    assert s.length == 7


# ---------------------------------------------------------------- decode


def test_plain_decode_batch_one_wave_per_block_bucket():
    rows = [
        Row(computed=10, q=1, prompt=5, budget=64, group=1),  # held 10: 1 block  -> bucket 0
        Row(computed=100, q=1, prompt=50, budget=64, group=0),  # held 64: 4 blocks -> bucket 2
        Row(computed=40, q=1, prompt=30, budget=64, group=1),  # held 40: 3 blocks -> bucket 1
        Row(computed=20, q=1, prompt=20, budget=32, group=0),  # held 20: 2 blocks -> bucket 1
        Row(computed=200, q=1, prompt=9, budget=64, group=1),  # held 64: 4 blocks -> bucket 2
        Row(computed=15, q=1, prompt=15, budget=16, group=2),  # held 15: 1 block  -> bucket 0
    ]
    p = plan(rows)
    assert p.segments == []
    assert len(p.waves) == 3
    w0, w1, w2 = p.waves
    assert w0.rows.tolist() == [0, 5] and w0.num_blocks == 1 and w0.groups == [(1, 0, 1), (2, 1, 2)]
    # Rows ordered by policy group (stable): row 3 (group 0) before row 2 (group 1).
    assert w1.rows.tolist() == [3, 2] and w1.num_blocks == 3 and w1.groups == [(0, 0, 1), (1, 1, 2)]
    assert w1.held.tolist() == [20, 40] and w1.positions.tolist() == [20, 40]
    assert not w1.tokens_contiguous
    assert w2.rows.tolist() == [1, 4] and w2.num_blocks == 4 and w2.groups == [(0, 0, 1), (1, 1, 2)]
    assert w2.held.tolist() == [64, 64] and w2.budgets.tolist() == [64, 64]
    assert w2.tokens.tolist() == [1, 4]


def test_uniform_decode_batch_is_one_wave_with_contiguous_tokens():
    rows = [Row(computed=100 + i, q=1, prompt=50, budget=64, group=3) for i in range(5)]
    p = plan(rows)
    assert p.segments == [] and len(p.waves) == 1
    (w,) = p.waves
    assert w.rows.tolist() == list(range(5)) and w.tokens.tolist() == list(range(5))
    assert w.tokens_contiguous and w.groups == [(3, 0, 5)] and w.num_blocks == 4
    # A row that is not full yet gathers the free slot it writes to as well.
    (w,) = plan([Row(computed=16, q=1, prompt=16, budget=64)]).waves
    assert w.held.tolist() == [16] and w.num_blocks == 2  # slots 0..16: 2 blocks of 16
    (w,) = plan([Row(computed=15, q=1, prompt=15, budget=64)]).waves
    assert w.num_blocks == 1
    (w,) = plan([Row(computed=64, q=1, prompt=15, budget=64)]).waves
    assert w.held.tolist() == [64] and w.num_blocks == 4  # full: evicts in place


# ---------------------------------------------------------------- prompts


def test_bulk_prompt_in_one_scheduler_chunk():
    p = plan([Row(computed=0, q=100, prompt=100, budget=32)])
    assert segs(p) == [(0, 0, 100, 0, 0, True)] and p.waves == []
    assert p.segments[0].budget == 32 and p.segments[0].length == 100
    # Not longer than the budget: nothing to reduce.
    assert segs(plan([Row(computed=0, q=32, prompt=32, budget=32)])) == [(0, 0, 32, 0, 0, False)]


def test_bulk_prompt_in_several_scheduler_chunks():
    # ctx == the first position (slot = position while prefilling); the reduction
    # only on the prompt's last segment.
    assert segs(plan([Row(computed=0, q=40, prompt=100, budget=32)])) == [(0, 0, 40, 0, 0, False)]
    assert segs(plan([Row(computed=40, q=40, prompt=100, budget=32)])) == [(0, 0, 40, 40, 40, False)]
    p = plan([Row(computed=80, q=20, prompt=100, budget=32)])
    assert segs(p) == [(0, 0, 20, 80, 80, True)] and p.waves == []
    assert segs(plan([Row(computed=10, q=20, prompt=30, budget=32)])) == [(0, 0, 20, 10, 10, False)]


def test_chunked_prompt_segments_at_chunk_multiples():
    # P = 50, k = 16, C = 12, in one scheduler chunk.
    p = plan([Row(computed=0, q=50, prompt=50, budget=16, mode=CHUNKED, chunk=12)])
    assert segs(p) == [
        (0, 0, 12, 0, 0, False),  # 12 <= 16: nothing to reduce
        (0, 12, 24, 12, 12, True),  # 24 held > 16
        (0, 24, 36, 24, 16, True),
        (0, 36, 48, 36, 16, True),
        (0, 48, 50, 48, 16, True),  # the prompt's end: 18 > 16
    ]
    assert p.waves == []
    # Not longer than the budget: chunks, but no reduction.
    p = plan([Row(computed=0, q=10, prompt=10, budget=16, mode=CHUNKED, chunk=4)])
    assert segs(p) == [(0, 0, 4, 0, 0, False), (0, 4, 8, 4, 4, False), (0, 8, 10, 8, 8, False)]
    # A chunk of at least the prompt: like bulk.
    p = plan([Row(computed=0, q=30, prompt=30, budget=16, mode=CHUNKED, chunk=64)])
    assert segs(p) == [(0, 0, 30, 0, 0, True)]


def test_chunked_prompt_with_a_scheduler_chunk_ending_mid_chunk():
    row = dict(prompt=50, budget=16, mode=CHUNKED, chunk=12)
    p = plan([Row(computed=0, q=30, **row)])
    assert segs(p) == [
        (0, 0, 12, 0, 0, False),
        (0, 12, 24, 12, 12, True),
        (0, 24, 30, 24, 16, False),  # ends inside the chunk [24, 36): no reduction yet
    ]
    p = plan([Row(computed=30, q=20, **row)])
    assert segs(p) == [
        (0, 0, 6, 30, 22, True),  # continues the chunk: 16 kept + 6 of it held
        (0, 6, 18, 36, 16, True),
        (0, 18, 20, 48, 16, True),
    ]
    # Ending exactly on a chunk boundary: reduced there.
    p = plan([Row(computed=0, q=24, **row)])
    assert segs(p)[-1] == (0, 12, 24, 12, 12, True)


def test_stream_prompt_first_budget_tokens_then_waves():
    p = plan([Row(computed=0, q=50, prompt=50, budget=16, mode=STREAM)])
    assert segs(p) == [(0, 0, 16, 0, 0, False)]
    assert len(p.waves) == 34
    for j, w in enumerate(p.waves):
        assert w.rows.tolist() == [0] and w.tokens.tolist() == [16 + j]
        assert w.positions.tolist() == [16 + j] and w.held.tolist() == [16]
    # Not longer than the budget: one segment, nothing else.
    p = plan([Row(computed=0, q=10, prompt=10, budget=16, mode=STREAM)])
    assert segs(p) == [(0, 0, 10, 0, 0, False)] and p.waves == []
    # Split by the scheduler inside the first min(P, k) tokens.
    p = plan([Row(computed=0, q=10, prompt=50, budget=16, mode=STREAM)])
    assert segs(p) == [(0, 0, 10, 0, 0, False)] and p.waves == []
    p = plan([Row(computed=10, q=20, prompt=50, budget=16, mode=STREAM)])
    assert segs(p) == [(0, 0, 6, 10, 10, False)]
    assert [w.positions.tolist() for w in p.waves] == [[16 + j] for j in range(14)]
    assert [w.tokens.tolist() for w in p.waves] == [[6 + j] for j in range(14)]
    # Past the first k tokens: waves only.
    p = plan([Row(computed=30, q=5, prompt=50, budget=16, mode=STREAM)])
    assert p.segments == [] and [w.held.tolist() for w in p.waves] == [[16]] * 5


def test_recompute_prompt_and_outputs_in_one_step():
    # A preempted request recomputes its 20 prompt tokens and 5 outputs at once:
    # the prompt's segment (reduced to k), then one wave per output token.
    p = plan([Row(computed=0, q=25, prompt=20, budget=8)])
    assert segs(p) == [(0, 0, 20, 0, 0, True)]
    assert [w.positions.tolist() for w in p.waves] == [[20], [21], [22], [23], [24]]
    assert [w.tokens.tolist() for w in p.waves] == [[20], [21], [22], [23], [24]]
    assert [w.held.tolist() for w in p.waves] == [[8]] * 5
    # A prompt shorter than the budget: held = min(position, k) grows to k.
    p = plan([Row(computed=0, q=10, prompt=5, budget=8)])
    assert segs(p) == [(0, 0, 5, 0, 0, False)]
    assert [w.held.tolist() for w in p.waves] == [[5], [6], [7], [8], [8]]
    # Chunked, and resumed mid-prompt.
    p = plan([Row(computed=12, q=16, prompt=20, budget=8, mode=CHUNKED, chunk=6)])
    assert segs(p) == [(0, 0, 6, 12, 8, True), (0, 6, 8, 18, 8, True)]
    assert [w.held.tolist() for w in p.waves] == [[8]] * 8


def test_mixed_batch():
    rows = [
        Row(computed=100, q=1, prompt=50, budget=32, group=0),  # decode, full: 2 blocks
        Row(computed=0, q=40, prompt=40, budget=32, group=1),  # bulk prompt
        Row(computed=0, q=20, prompt=20, budget=8, mode=STREAM, group=0),  # stream prompt
        Row(computed=5, q=1, prompt=3, budget=32, group=1),  # decode, 1 block
        Row(computed=0, q=9, prompt=30, budget=8, mode=CHUNKED, chunk=4, group=2),  # chunked, mid-chunk
    ]
    p = plan(rows)
    assert segs(p) == [
        (1, 1, 41, 0, 0, True),
        (2, 41, 49, 0, 0, False),
        (4, 62, 66, 0, 0, False),
        (4, 66, 70, 4, 4, False),  # 8 held == k: nothing to reduce
        (4, 70, 71, 8, 8, False),  # mid-chunk
    ]
    # Wave 0: rows 0, 2, 3 (bucketed: rows 2 and 3 gather 1 block, row 0 two);
    # waves 1..11: row 2's streamed prompt tokens 9..19.
    first = [(w.rows.tolist(), w.num_blocks) for w in p.waves[:2]]
    assert first == [([2, 3], 1), ([0], 2)]
    assert p.waves[0].groups == [(0, 0, 1), (1, 1, 2)]
    assert p.waves[0].tokens.tolist() == [49, 61] and p.waves[1].tokens.tolist() == [0]
    assert [w.rows.tolist() for w in p.waves[2:]] == [[2]] * 11
    assert [w.positions.tolist() for w in p.waves[2:]] == [[9 + j] for j in range(11)]


# -------------------------------------------------------------- slots_needed


def test_slots_needed_by_mode():
    # Bulk: the prompt while it is prefilled (also when it is recomputed with
    # outputs), then the budget.
    assert slots_needed(40, 100, 32, BULK, 32, False) == 40
    assert slots_needed(105, 100, 32, BULK, 32, False) == 100
    assert slots_needed(10, 8, 32, BULK, 32, False) == 10
    assert slots_needed(101, 100, 32, BULK, 32, True) == 32
    # Chunked: k + C while the prompt is processed.
    assert slots_needed(40, 100, 32, CHUNKED, 12, False) == 40
    assert slots_needed(90, 100, 32, CHUNKED, 12, False) == 44
    assert slots_needed(101, 100, 32, CHUNKED, 12, True) == 32
    # Stream: never more than the budget.
    assert slots_needed(90, 100, 32, STREAM, 32, False) == 32
    assert slots_needed(10, 100, 32, STREAM, 32, False) == 10


# -------------------------------------------------------------- the property


@dataclass
class Request:
    prompt: int
    budget: int
    mode: int
    chunk: int
    total: int  # prompt + output tokens
    group: int
    steps: list[int]  # scheduler chunk sizes
    computed: int = 0
    held: int = 0  # the simulator's own count of slots held


def simulate_step(reqs: list[Request], order: list[int], block_size: int) -> None:
    rows = [reqs[i] for i in order]
    sizes = [min(r.steps.pop(0) if r.steps else 1, r.total - r.computed) for r in rows]
    qs = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    arr = lambda f: np.array([f(r) for r in rows], dtype=np.int64)  # noqa: E731
    p = plan_step(
        qs, arr(lambda r: r.computed), arr(lambda r: r.prompt), arr(lambda r: r.budget),
        arr(lambda r: r.mode), arr(lambda r: r.chunk), arr(lambda r: r.group), block_size,
    )
    check_coverage(
        p, [Row(r.computed, q, r.prompt, r.budget, r.mode, r.chunk, r.group) for r, q in zip(rows, sizes)], qs
    )
    max_slot = [-1] * len(rows)  # highest slot index each row writes this step
    pos_next = [r.computed for r in rows]
    for s in p.segments:
        r = rows[s.row]
        k, c = r.budget, r.chunk
        end = s.pos_start + s.length
        assert s.pos_start == pos_next[s.row]  # in order, no gap
        assert s.budget == k and s.group == r.group
        assert end <= r.prompt
        assert s.ctx == r.held, (s, r)  # the planner's stateless count is the simulator's
        if r.mode == CHUNKED:
            assert s.pos_start // c == (end - 1) // c  # never across a chunk boundary
            at_boundary = end % c == 0 or end == r.prompt
            assert s.reduce == (at_boundary and r.held + s.length > k)
        elif r.mode == BULK:
            assert s.reduce == (end == r.prompt and r.prompt > k)
        else:
            assert not s.reduce and end <= min(r.prompt, k)
        max_slot[s.row] = max(max_slot[s.row], s.ctx + s.length - 1)
        r.held += s.length
        if s.reduce:
            assert r.held > k
            r.held = k
        pos_next[s.row] = end
    for w in p.waves:
        nb = []
        for i, row in enumerate(w.rows.tolist()):
            r = rows[row]
            k = r.budget
            assert int(w.positions[i]) == pos_next[row]
            assert int(w.held[i]) == r.held, (w, r)
            assert int(w.budgets[i]) == k
            assert pos_next[row] >= (min(r.prompt, k) if r.mode == STREAM else r.prompt)
            held = r.held
            # A row that is not full writes its free slot `held`; a full one
            # writes over the slot it evicts (< k).
            max_slot[row] = max(max_slot[row], min(held, k - 1))
            need = cdiv(min(held + 1, k), block_size)
            assert need <= w.num_blocks
            nb.append(need)
            # Blocks gathered lie within what the scheduler side allocated.
            prompt_done = r.computed >= r.prompt
            allocated = slots_needed(r.computed + sizes[row], r.prompt, k, r.mode, r.chunk, prompt_done)
            assert need <= cdiv(allocated, block_size)
            r.held = min(held + 1, k)
            pos_next[row] += 1
        assert w.num_blocks == max(nb)
        buckets = {int(np.floor(np.log2(max(n, 1)))) for n in nb}
        assert len(buckets) == 1
    for i, r in enumerate(rows):
        end = r.computed + sizes[i]
        assert pos_next[i] == end
        needed = slots_needed(end, r.prompt, r.budget, r.mode, r.chunk, r.computed >= r.prompt)
        assert max_slot[i] < needed, (r, max_slot[i], needed)
        assert r.held <= needed  # the slots still held stay allocated
        if end >= r.prompt or r.mode == STREAM:
            assert r.held <= r.budget
        elif r.mode == CHUNKED:
            assert r.held <= r.budget + r.chunk
        r.computed = end


requests = st.builds(
    lambda prompt, budget, mode, chunk, outputs, group, steps: Request(
        prompt, budget, mode, chunk, prompt + outputs, group, steps
    ),
    prompt=st.integers(1, 60),
    budget=st.integers(1, 24),
    mode=st.sampled_from([BULK, CHUNKED, STREAM]),
    chunk=st.integers(1, 16),
    outputs=st.integers(0, 6),
    group=st.integers(0, 2),
    steps=st.lists(st.integers(1, 30), min_size=0, max_size=6),
)


@settings(max_examples=150, deadline=None)
@given(reqs=st.lists(requests, min_size=1, max_size=4), block_size=st.sampled_from([1, 4, 16]), data=st.data())
def test_plans_match_a_stateful_simulation_and_fit_slots_needed(reqs, block_size, data):
    for _ in range(200):
        active = [i for i, r in enumerate(reqs) if r.computed < r.total]
        if not active:
            break
        order = data.draw(st.permutations(active))
        simulate_step(reqs, order, block_size)
    assert all(r.computed == r.total for r in reqs)
