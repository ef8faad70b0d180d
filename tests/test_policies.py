"""Selection rules: the pure functions of `tova_vllm.policies.selection`, the
built-in policies' priorities over `Candidates` views, and the reference
cache's use of them (`tova_vllm.reference.EvictionLayer`), on tiny
hand-computed cases, plus an independent pure-Python simulator of the
documented semantics checked against the reference with hypothesis.

Layers here are driven by hand: `update` appends keys as the model would, and
`finish_step` gets hand-made attention probabilities (``[batch, 9 query heads,
new tokens, slots]``, 3 KV heads: GQA groups of 3)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tova_vllm.config import KVSettings
from tova_vllm.policies import (
    H2O,
    TOVA,
    Candidates,
    EvictionPolicy,
    KeyDiff,
    PolicyOptionError,
    Sink,
    Window,
    policy_class,
    policy_names,
    selection,
)
from tova_vllm.policies.selection import (
    EMPTY,
    OUTSIDE,
    PROTECTED,
    code_bias,
    evict_one,
    head_average,
    keep_top,
    margin,
    mask,
    protect,
)
from tova_vllm.reference import EvictionLayer, prompt_pieces

HQ, HKV, D = 9, 3, 4
INF = float("inf")
BUILTIN = ("tova", "window", "sink", "h2o", "keydiff")


# ------------------------------------------------------------------ helpers


def make(name: str, budget: int, **options) -> KVSettings:
    return KVSettings(policy_class(name)(**options), budget)


def step(layer: EvictionLayer, probs, valid=None, keys=None) -> None:
    """One forward of ``q`` new tokens through ``layer`` with the given
    probabilities ``[B, HQ, q, n_old + q]`` (or ``[HQ, q, n]`` for batch 1) and
    keys ``[B, HKV, q, D]`` (or ``[HKV, q, D]``; random when not given)."""
    probs = torch.as_tensor(probs, dtype=torch.float32)
    if probs.dim() == 3:
        probs = probs[None]
    b, _, q, _ = probs.shape
    if keys is None:
        k = torch.randn(b, HKV, q, D)
    else:
        k = torch.as_tensor(keys, dtype=torch.float32)
        k = (k[None] if k.dim() == 3 else k).expand(b, HKV, q, D).contiguous()
    layer.update(k, k + 1)
    if valid is None:
        valid = torch.ones(b, q, dtype=torch.bool)
    positions = layer.real_seen[:, None] + valid.long().cumsum(-1) - 1
    layer.finish_step(probs, valid, positions)


def kept(layer: EvictionLayer, row: int = 0, head: int = 0) -> list[int]:
    """True positions kept by (row, KV head), chronological."""
    pos = layer.positions[row, head][layer.valid[row, head]]
    return pos.tolist()


def uniform(hq: int, q: int, n: int) -> torch.Tensor:
    """Causal uniform probabilities for q new queries over n slots."""
    p = torch.zeros(hq, q, n)
    for i in range(q):
        upto = n - q + i + 1
        p[:, i, :upto] = 1.0 / upto
    return p


def decode_probs(rows_by_group: list[list[float]]) -> torch.Tensor:
    """[HQ, 1, n]: the new query's probabilities; one row per GQA group (3 query
    heads each), or one row per query head when 9 rows are given."""
    rows = rows_by_group if len(rows_by_group) == HQ else [r for r in rows_by_group for _ in range(3)]
    return torch.tensor(rows, dtype=torch.float32)[:, None, :]


def prefill(layer: EvictionLayer, n: int) -> None:
    step(layer, uniform(HQ, n, n))


def view(positions=None, *, newest=None, budget=4, valid=None, attention=None, keys=None, state=None):
    """A one-row `Candidates` view over the given per-slot data."""
    if positions is not None:
        n = len(positions)
    elif attention is not None:
        n = len(attention)
    else:
        n = (state if state is not None else keys[..., 0]).shape[-1]
    pos = None if positions is None else torch.as_tensor(positions).long()[None, None].expand(1, HKV, n)
    return Candidates(
        newest=torch.tensor([n - 1 if newest is None else newest]),
        budget=torch.tensor([budget]),
        valid=torch.ones(1, 1, n, dtype=torch.bool) if valid is None else torch.as_tensor(valid)[None, None],
        num_kv_heads=HKV,
        attention=None if attention is None else torch.as_tensor(attention, dtype=torch.float32)[None, None],
        positions=pos,
        keys=keys,
        state=state,
    )


# -------------------------------------------------------- pure functions


def test_evict_one_lowest_and_ties_evict_lowest_index():
    assert evict_one(torch.tensor([0.2, 0.1, 0.3])).item() == 1
    assert evict_one(torch.tensor([0.2, 0.1, 0.1, 0.3])).item() == 1  # tie: lowest index
    assert evict_one(torch.tensor([0.5, 0.5, 0.5])).item() == 0
    batch = torch.tensor([[0.3, 0.1, 0.1], [0.0, 0.2, 0.0]])
    assert evict_one(batch).tolist() == [1, 0]


def test_keep_top_hand_cases():
    assert keep_top(torch.tensor([0.2, 0.1, 0.1, 0.3]), 2).tolist() == [0, 3]
    assert keep_top(torch.tensor([0.2, 0.1, 0.1, 0.3]), 3).tolist() == [0, 2, 3]  # tie: slot 1 goes
    assert keep_top(torch.tensor([0.1, 0.1, 0.1]), 2).tolist() == [1, 2]
    assert keep_top(torch.tensor([3.0, 1.0, 2.0]), 5).tolist() == [0, 1, 2]  # keep >= n: all
    assert keep_top(torch.tensor([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0]]), 1).tolist() == [[0], [2]]
    assert keep_top(torch.tensor([[3.0, 1.0, 2.0]]), 0).tolist() == [[]]


def test_head_average_gqa_groups():
    # 9 query heads over 2 slots; query head h belongs to KV head h // 3.
    probs = torch.tensor(
        [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7],  # KV head 0: mean (0.6, 0.4)
         [0.0, 1.0], [0.0, 1.0], [0.3, 0.7],  # KV head 1: mean (0.1, 0.9)
         [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]  # KV head 2: mean (0.5, 0.5)
    )
    torch.testing.assert_close(
        head_average(probs, num_kv_heads=3), torch.tensor([[0.6, 0.4], [0.1, 0.9], [0.5, 0.5]])
    )
    # Over all 9 query heads: (0.6 + 0.1 + 0.5) / 3 = 0.4, (0.4 + 0.9 + 0.5) / 3 = 0.6.
    torch.testing.assert_close(head_average(probs), torch.tensor([0.4, 0.6]))
    assert head_average(probs.half()).dtype == torch.float32
    assert head_average(probs.double()).dtype == torch.float64  # float64 stays float64


def test_protect_and_masks():
    assert PROTECTED == INF and EMPTY == -INF and OUTSIDE == INF
    p = protect(torch.tensor([5.0, 1.0, 2.0]), torch.tensor([False, True, False]))
    assert p.tolist() == [5.0, INF, 2.0]
    p = mask(p, empty=torch.tensor([False, False, True]))
    assert p.tolist() == [5.0, INF, -INF]
    # Empty beats protected: a slot holding no token is always evicted first.
    p = mask(protect(torch.ones(2), torch.tensor([True, True])), empty=torch.tensor([True, False]))
    assert p.tolist() == [-INF, INF]
    assert evict_one(p).item() == 0
    # Outside slots never compete.
    p = mask(torch.tensor([0.3, 0.2, 0.9]), outside=torch.tensor([False, False, True]))
    assert p.tolist()[:2] == pytest.approx([0.3, 0.2]) and p[2] == INF
    assert evict_one(p).item() == 1 and keep_top(p, 2).tolist() == [0, 2]
    # Integer and half priorities are compared in float32, float64 stays float64.
    assert protect(torch.tensor([1, 2]), torch.tensor([False, True])).dtype == torch.float32
    assert mask(torch.tensor([1.0], dtype=torch.float64)).dtype == torch.float64
    assert mask(torch.tensor([1.0], dtype=torch.float16)).dtype == torch.float32


def test_code_bias_is_the_additive_mask():
    codes = torch.tensor([[selection.REAL, selection.EMPTY_SLOT, selection.OUTSIDE_SLOT, selection.REAL]])
    pri = torch.tensor([[0.5, 0.7, 0.1, 0.2]])
    bias = code_bias(codes)
    assert bias.dtype == torch.float32 and bias.tolist() == [[0.0, -INF, INF, 0.0]]
    assert code_bias(codes, torch.float64).dtype == torch.float64
    expected = mask(pri, empty=codes == selection.EMPTY_SLOT, outside=codes == selection.OUTSIDE_SLOT)
    assert (pri + bias).tolist() == expected.tolist()
    assert evict_one(pri + bias).item() == 1  # the empty slot goes first


def test_margin_reports_the_relative_gap():
    m = margin(torch.tensor([0.2, 0.25, 0.5]), 0, 1)
    assert m["chosen"] == pytest.approx(0.2) and m["other"] == pytest.approx(0.25)
    assert m["relative_gap"] == pytest.approx(0.05 / 0.25)
    assert margin(torch.zeros(2), 0, 1)["relative_gap"] == 0.0


# ------------------------------------------------- policies over a view


def test_window_priority_is_the_position():
    pos = [0, 1, 2, 3, 7, 8, 9]
    assert keep_top(Window().priority(view(pos)), 3).tolist() == [[[4, 5, 6]]]


def test_sink_protects_the_first_positions():
    pos = [0, 1, 2, 3, 7, 8, 9]
    pri = Sink().priority(view(pos))  # default 4 sinks
    assert pri.shape == (1, 1, 7)
    assert torch.isinf(pri[0, 0]).tolist() == [True] * 4 + [False] * 3
    assert keep_top(pri, 5).tolist() == [[[0, 1, 2, 3, 6]]]
    assert keep_top(Sink(num_sinks=2).priority(view(pos)), 4).tolist() == [[[0, 1, 5, 6]]]
    assert keep_top(Sink(num_sinks=0).priority(view(pos)), 2).tolist() == [[[5, 6]]]


def test_h2o_recent_window_and_state():
    assert H2O().recent(torch.tensor([8])).item() == 4
    assert H2O().recent(torch.tensor([1])).item() == 1  # at least the newest
    assert H2O().recent(torch.tensor([2])).item() == 1  # at most budget - 1
    assert H2O(recent_ratio=0.25).recent(torch.tensor([10, 6])).tolist() == [2, 2]  # 2.5, 1.5: half to even
    assert H2O(recent_ratio=0.9).recent(torch.tensor([10])).item() == 9
    pos = [0, 1, 2, 3, 7, 8, 9]
    state = torch.tensor([5.0, 1.0, 3.0, 2.0, 0.5, 0.0, 0.0])[None, None].expand(1, HKV, 7).clone()
    state[0, 1, 0] = 0.0  # KV head 1 thinks little of position 0
    pri = H2O().priority(view(pos, newest=9, budget=4, state=state))  # recent = 2: positions 8, 9
    assert pri.shape == (1, HKV, 7)
    assert torch.isinf(pri[0]).tolist() == [[False] * 5 + [True] * 2] * HKV
    # Heavy hitters per KV head.
    assert keep_top(pri, 4).tolist() == [[[0, 2, 5, 6], [2, 3, 5, 6], [0, 2, 5, 6]]]
    # accumulate adds this step's attention.
    s = H2O().accumulate(torch.zeros(2, 3), torch.ones(2, 3))
    assert s.tolist() == [[1.0] * 3] * 2


def test_tova_priority_is_the_attention():
    att = [0.125, 0.5, 0.25, 0.25]
    assert TOVA().priority(view(attention=att)).tolist() == [[att]]
    assert evict_one(TOVA().priority(view(attention=att))).item() == 0


def test_keydiff_prefers_keys_unlike_the_mean_and_ignores_invalid_slots():
    e = torch.eye(D)
    keys = torch.stack([e[0], e[0], e[0], e[1]])[None, None].expand(1, HKV, 4, D)
    pri = KeyDiff().priority(view(keys=keys))  # per KV head: [1, 3, 4]
    assert pri.shape == (1, HKV, 4)
    assert keep_top(pri, 1).tolist() == [[[3]] * HKV]  # the odd key out
    # The key norm does not matter, only its direction.
    scaled = keys.clone()
    scaled[..., 3, :] *= 8
    torch.testing.assert_close(KeyDiff().priority(view(keys=scaled)), pri)
    # An invalid slot does not count in the mean: with slot 3 invalid the mean is
    # e0 and slot 3 (orthogonal to it) is still the least similar.
    keys2 = torch.stack([e[0], e[1], e[1], e[2]])[None, None].expand(1, HKV, 4, D)
    valid = torch.tensor([True, True, True, False])
    pri_all = KeyDiff().priority(view(keys=keys2))
    pri_masked = KeyDiff().priority(view(keys=keys2, valid=valid))
    # All four: mean (1, 2, 1)/4: e1 is the most similar, e0 and e2 tie.
    assert pri_all[0, 0, 1] < pri_all[0, 0, 0] == pri_all[0, 0, 3]
    # Without slot 3: mean (1, 2)/3, orthogonal to slot 3's e2 (similarity 0).
    r5 = 1 / math.sqrt(5)
    assert pri_masked[0, 0].tolist() == pytest.approx([-r5, -2 * r5, -2 * r5, 0.0], abs=1e-6)


def test_candidates_fill_lazily_and_refuse_undeclared_inputs():
    calls = []

    def attention():
        calls.append(1)
        return torch.ones(1, 1, 3)

    v = Candidates(
        newest=torch.tensor([2]), budget=torch.tensor([2]), valid=torch.ones(1, 1, 3, dtype=torch.bool),
        num_kv_heads=HKV, attention=attention,
    )
    assert calls == []
    assert v.attention.shape == (1, 1, 3) and v.attention.shape == (1, 1, 3)
    assert calls == [1]  # computed once
    with pytest.raises(AttributeError, match="reads_keys"):
        v.keys
    with pytest.raises(AttributeError, match="positions"):
        v.positions


def test_policy_capabilities_and_value_semantics():
    assert policy_names()[:5] == BUILTIN
    assert not TOVA.per_kv_head and TOVA.reads_attention and TOVA.cuda_fast_path
    assert H2O.per_kv_head and H2O.accumulates and not H2O.prefix_cacheable
    assert KeyDiff.per_kv_head and KeyDiff.reads_keys and not KeyDiff.reads_attention
    assert Window.reads_positions and Sink.reads_positions and not Sink.per_kv_head
    assert H2O.needs_whole_query_groups() and not KeyDiff.needs_whole_query_groups()
    assert not TOVA.needs_whole_query_groups()
    # Frozen, hashable, compared by value: requests group by policy + options.
    assert Sink(num_sinks=2) == Sink(num_sinks=2) != Sink()
    assert len({Sink(), Sink(num_sinks=4), H2O(), H2O(recent_ratio=0.5), TOVA()}) == 3
    with pytest.raises(Exception):
        Sink().num_sinks = 3  # type: ignore[misc]
    assert Sink(num_sinks=3).settings() == {"kv_num_sinks": 3}
    assert H2O().settings() == {"kv_h2o_recent_ratio": 0.5}
    assert TOVA().settings() == {}
    for name in BUILTIN:
        assert policy_class(name).describe()
        assert issubclass(policy_class(name), EvictionPolicy)


def test_policy_option_checks_against_the_budget():
    Sink(num_sinks=3).check(4)
    H2O().check(1)
    TOVA().check(1)
    for policy, budget in [(Sink(num_sinks=4), 4), (Sink(num_sinks=-1), 8), (H2O(recent_ratio=1.0), 4),
                           (H2O(recent_ratio=0.0), 4)]:
        with pytest.raises(PolicyOptionError):
            policy.check(budget)


# -------------------------------------------------- hypothesis properties


priorities = st.lists(st.integers(0, 4), min_size=1, max_size=12).map(
    lambda v: torch.tensor(v, dtype=torch.float64)
)


@given(priorities, st.integers(0, 14), st.data())
def test_keep_top_properties(pri, keep, data):
    n = pri.numel()
    protected = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    p = protect(pri, protected)
    idx = keep_top(p, keep)
    assert idx.numel() == min(keep, n)
    assert idx.tolist() == sorted(set(idx.tolist()))  # ascending, unique
    if int(protected.sum()) <= keep:
        assert set(torch.nonzero(protected).flatten().tolist()) <= set(idx.tolist())
    evicted = sorted(set(range(n)) - set(idx.tolist()))
    if evicted and idx.numel():
        # Every evicted slot ranks below every kept one by (priority, index).
        worst_kept = min((p[i].item(), i) for i in idx.tolist())
        assert all((p[e].item(), e) < worst_kept for e in evicted)


@given(priorities, st.integers(0, 12))
def test_keep_top_equals_repeated_evict_one(pri, keep):
    """A bulk keep_top keeps what evicting one at a time (fixed priorities) keeps."""
    slots = list(range(pri.numel()))
    p = pri.clone()
    while len(slots) > keep:
        i = evict_one(p).item()
        del slots[i]
        p = torch.cat([p[:i], p[i + 1 :]])
    assert keep_top(pri, keep).tolist() == slots


@given(st.integers(1, 3), st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, float("inf"), float("-inf")]),
                                   min_size=3, max_size=36), st.data())
def test_keep_top_threshold_equals_sorted(rows, values, data):
    """The CPU's sort-free keep_top keeps exactly what the stable sort keeps,
    row by row, with ties and infinities (PROTECTED, EMPTY)."""
    n = len(values) // rows
    pri = torch.tensor(values[: rows * n], dtype=torch.float32).view(rows, n)
    keep = data.draw(st.integers(0, n - 1))
    assert torch.equal(selection.keep_top_threshold(pri, keep), selection.keep_top_sorted(pri, keep))


def test_keep_top_threshold_with_nan_keeps_what_the_sort_keeps():
    pri = torch.tensor([[0.5, float("nan"), 0.1, 0.9, 0.3]])
    assert torch.equal(selection.keep_top_threshold(pri, 2), selection.keep_top_sorted(pri, 2))


@given(priorities, st.data())
def test_evict_one_is_the_lowest_then_the_first(pri, data):
    n = pri.numel()
    empty = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    p = mask(pri, empty=empty)
    i = evict_one(p).item()
    assert (p[i].item(), i) == min((v, j) for j, v in enumerate(p.tolist()))
    if empty.any():
        assert empty[i]


# ------------------------------------------- the reference's selection, by hand


def test_tova_gqa_averages_all_query_heads():
    layer = EvictionLayer(make("tova", 3))
    prefill(layer, 3)
    assert kept(layer) == [0, 1, 2]
    # Slots 0..2 old, slot 3 the new token (position 3); one row per GQA group.
    probs = decode_probs([
        [0.40, 0.05, 0.15, 0.40],  # KV head 0's query heads alone would evict slot 1
        [0.10, 0.30, 0.20, 0.40],
        [0.10, 0.30, 0.30, 0.30],
    ])
    # Mean over all 9 query heads: (0.200, 0.217, 0.217, 0.367): evict slot 0.
    step(layer, probs)
    for h in range(HKV):  # every KV head keeps the same set
        assert kept(layer, head=h) == [1, 2, 3]


def test_tova_tie_evicts_oldest():
    layer = EvictionLayer(make("tova", 3))
    prefill(layer, 3)
    step(layer, decode_probs([[0.4, 0.1, 0.1, 0.4]] * 3))
    assert kept(layer) == [0, 2, 3]


def test_tova_evicts_the_new_token_when_lowest():
    layer = EvictionLayer(make("tova", 3))
    prefill(layer, 3)
    keys_before = layer.keys.clone()
    step(layer, decode_probs([[0.3, 0.3, 0.3, 0.1]] * 3))
    assert kept(layer) == [0, 1, 2]
    torch.testing.assert_close(layer.keys, keys_before)
    assert layer.seen == 4  # the token was seen, just not kept


def test_tova_prefill_bulk_uses_last_query():
    layer = EvictionLayer(make("tova", 2))
    probs = uniform(HQ, 4, 4)
    probs[:, 0, :] = torch.tensor([1.0, 0, 0, 0])
    probs[:, -1, :] = torch.tensor([0.1, 0.5, 0.1, 0.3])
    step(layer, probs)
    assert kept(layer) == [1, 3]
    layer = EvictionLayer(make("tova", 3))
    probs[:, -1, :] = torch.tensor([0.2, 0.3, 0.2, 0.3])  # tie 0/2: slot 0 goes
    step(layer, probs)
    assert kept(layer) == [1, 2, 3]


def test_tova_prompt_chunks_reduce_after_each_chunk():
    """A ``chunked`` prompt as the reference runs it (forwards of ``chunk``
    tokens): each chunk attends over the kept tokens plus itself and is reduced
    by its last query."""
    layer = EvictionLayer(KVSettings(TOVA(), 2, "chunked", 3))
    assert prompt_pieces(7, layer.settings) == [(0, 3), (3, 6), (6, 7)]
    probs = uniform(HQ, 3, 3)
    probs[:, -1] = torch.tensor([0.5, 0.1, 0.4])
    step(layer, probs)  # positions 0, 1, 2 -> keep 0, 2
    assert kept(layer) == [0, 2]
    probs = uniform(HQ, 3, 5)  # 2 kept + 3 new (positions 3, 4, 5)
    probs[:, -1] = torch.tensor([0.1, 0.3, 0.2, 0.1, 0.3])  # keep slots 1 (pos 2) and 4 (pos 5)
    step(layer, probs)
    assert kept(layer) == [2, 5]
    probs = uniform(HQ, 1, 3)
    probs[:, -1] = torch.tensor([0.2, 0.5, 0.3])  # a 1-token chunk: evict one (pos 2)
    step(layer, probs)
    assert kept(layer) == [5, 6]


def test_budget_at_least_length_never_evicts():
    for name in BUILTIN:
        layer = EvictionLayer(make(name, 7))
        prefill(layer, 4)
        for _ in range(3):
            step(layer, uniform(HQ, 1, layer.keys.shape[-2] + 1))
        assert layer.keys.shape[-2] == 7
        for h in range(HKV):
            assert kept(layer, head=h) == list(range(7))
        step(layer, uniform(HQ, 1, 8))
        assert layer.keys.shape[-2] == 7  # the 8th token makes it evict


def test_window_keeps_most_recent():
    layer = EvictionLayer(make("window", 4))
    prefill(layer, 6)  # bulk: 2..5
    assert kept(layer) == [2, 3, 4, 5]
    for _ in range(2):
        step(layer, decode_probs([[1.0, 0, 0, 0, 0]] * 3))  # attention is ignored
    assert kept(layer) == [4, 5, 6, 7]


def test_sink_protects_first_tokens():
    layer = EvictionLayer(make("sink", 4, num_sinks=2))
    prefill(layer, 3)
    for _ in range(5):
        step(layer, uniform(HQ, 1, layer.keys.shape[-2] + 1))
    assert kept(layer) == [0, 1, 6, 7]
    layer = EvictionLayer(make("sink", 5))  # default 4 sinks
    prefill(layer, 10)
    assert kept(layer) == [0, 1, 2, 3, 9]


def test_h2o_keeps_recent_and_per_head_heavy_hitters():
    # budget 4: 2 recent + 2 heavy hitters per KV head.
    layer = EvictionLayer(make("h2o", 4))
    # Prefill of 4 tokens: every query of KV head g's group puts 0.9 on token g
    # (when causal allows), the rest spread evenly.
    probs = torch.zeros(HQ, 4, 4)
    for hq in range(HQ):
        g = hq // 3
        for i in range(4):
            row = torch.zeros(4)
            if g <= i:
                row[: i + 1] = 0.1 / i if i else 0.0
                row[g] = 0.9 if i else 1.0
            else:
                row[: i + 1] = 1.0 / (i + 1)
            probs[hq, i] = row
    step(layer, probs)
    assert layer.keys.shape[-2] == 4  # P == budget: nothing evicted yet
    # Decode position 4: the query puts everything on its heavy hitter again.
    dec = torch.zeros(HQ, 1, 5)
    for hq in range(HQ):
        dec[hq, 0, hq // 3] = 1.0
    step(layer, dec)
    # Protected: positions 3, 4. Accumulated scores of tokens 0, 1, 2 (prompt
    # column sums + this step), by hand:
    #   KV head 0: 1+.9+.9+.9+1 = 4.7,  .1+.05+.033 = .183,  .05+.033 = .083 -> evict 2
    #   KV head 1: 1+.1+.05+.033 = 1.18, .9+.9+.9+1 = 3.7,   .05+.033 = .083 -> evict 2
    #   KV head 2: 1+.5+.05+.033 = 1.58, .5+.05+.033 = .583, .9+.9+1 = 2.8   -> evict 1
    assert kept(layer, head=0) == [0, 1, 3, 4]
    assert kept(layer, head=1) == [0, 1, 3, 4]
    assert kept(layer, head=2) == [0, 2, 3, 4]
    # Next step: new token 5 gets nothing at all, yet it is protected (recent).
    dec = torch.zeros(HQ, 1, 5)
    dec[:, 0, 0] = 1.0
    step(layer, dec)
    # Protected: 4, 5. KV head 0: token 1 (.183) vs token 3 (now unprotected, .033): evict 3.
    assert kept(layer, head=0) == [0, 1, 4, 5]
    assert kept(layer, head=2) == [0, 2, 4, 5]


def test_keydiff_per_head_by_hand():
    # Keys per KV head (unit vectors e0..e3, some scaled), prompt of 3, budget 2:
    #   head 0: e0, e0, e1   mean (2, 1)/3: e0 slots most similar, tie: slot 0 goes
    #   head 1: e0, e1, e1   mean (1, 2)/3: e1 slots most similar, tie: slot 1 goes
    #   head 2: 2e0, e0, e2  the norm does not count: like head 0, slot 0 goes
    e = torch.eye(D)
    keys = torch.stack([
        torch.stack([e[0], e[0], e[1]]),
        torch.stack([e[0], e[1], e[1]]),
        torch.stack([2 * e[0], e[0], e[2]]),
    ])  # [HKV, 3, D]
    layer = EvictionLayer(make("keydiff", 2))
    step(layer, uniform(HQ, 3, 3), keys=keys)
    assert [kept(layer, head=h) for h in range(HKV)] == [[1, 2], [0, 2], [1, 2]]
    # Decode (3 slots: 2 kept + the new one), new key e3 on every head:
    #   head 0: e0, e1, e3: all orthogonal, equal similarity: slot 0 (pos 1) goes
    #   head 1: e0, e1, e3: likewise, pos 0 goes
    step(layer, uniform(HQ, 1, 3), keys=e[3].expand(HKV, 1, D))
    assert [kept(layer, head=h) for h in range(HKV)] == [[2, 3]] * HKV
    # A new key equal to a kept one: the two are the most similar to the mean,
    # and of the two the older (lower slot) goes.
    step(layer, uniform(HQ, 1, 3), keys=e[3].expand(HKV, 1, D))
    assert [kept(layer, head=h) for h in range(HKV)] == [[2, 4]] * HKV
    assert layer.seen == 5


def test_padding_is_never_kept_nor_counted():
    # Row 0 has 2 pad tokens then 3 real; row 1 has 5 real. Budget 4.
    layer = EvictionLayer(make("tova", 4))
    valid = torch.tensor([[False, False, True, True, True], [True] * 5])
    probs = uniform(HQ, 5, 5)[None].repeat(2, 1, 1, 1)
    probs[1, :, -1] = torch.tensor([0.3, 0.1, 0.2, 0.2, 0.2])
    step(layer, probs, valid=valid)
    assert kept(layer, row=0) == [0, 1, 2]  # all 3 real tokens (true positions 0..2)
    assert kept(layer, row=1) == [0, 2, 3, 4]
    assert layer.keys.shape[-2] == 4  # row 0 still holds one (masked) pad slot
    # Decode: row 0 now has 4 real tokens <= budget: the pad slot goes, not a token.
    dec = torch.full((2, HQ, 1, 5), 0.25)
    dec[0, :, 0, 0] = 0.0  # the pad slot (index 0 of row 0 after compaction)
    dec[1, :, 0] = torch.tensor([0.3, 0.2, 0.2, 0.1, 0.2])  # row 1 evicts position 4
    step(layer, dec)
    assert kept(layer, row=0) == [0, 1, 2, 3]
    assert kept(layer, row=1) == [0, 2, 3, 5]


@pytest.mark.parametrize("name", ["window", "sink", "h2o", "keydiff"])
def test_padding_is_evicted_first_by_every_policy(name):
    # Row 0: 3 pads then 2 real tokens; budget 3: its 2 real tokens are kept
    # (a pad slot stays, masked), whatever the policy thinks of the pads'
    # positions (-1), keys or scores.
    layer = EvictionLayer(make(name, 3, **({"num_sinks": 1} if name == "sink" else {})))
    valid = torch.tensor([[False, False, False, True, True], [True] * 5])
    step(layer, uniform(HQ, 5, 5)[None].repeat(2, 1, 1, 1), valid=valid)
    for h in range(HKV):
        assert kept(layer, row=0, head=h) == [0, 1]
        assert len(kept(layer, row=1, head=h)) == 3
    step(layer, uniform(HQ, 1, 4)[None].repeat(2, 1, 1, 1))
    for h in range(HKV):
        assert kept(layer, row=0, head=h) == [0, 1, 2]


# ---------------------------------- an independent simulator (pure Python)


def h2o_recent(budget: int, ratio: float) -> int:
    return min(max(round(budget * ratio), 1), max(budget - 1, 1))


def keydiff_priorities(keys: list[list[float]]) -> list[float]:
    """-cos(key, mean of the unit keys) per slot (0 similarity to a zero mean)."""
    units = [[x / math.sqrt(sum(y * y for y in k)) for x in k] for k in keys]
    anchor = [sum(u[d] for u in units) / len(units) for d in range(D)]
    na = math.sqrt(sum(a * a for a in anchor))
    out = []
    for k in keys:
        nk = math.sqrt(sum(x * x for x in k))
        out.append(0.0 if na == 0 else -sum(x * a for x, a in zip(k, anchor)) / (nk * na))
    return out


def simulate(
    s: KVSettings, probs_steps: list[torch.Tensor], key_steps: list[torch.Tensor]
) -> list[list[int]]:
    """The documented semantics written out with lists: returns, per KV head,
    the kept positions after every forward (prompt pieces, then decode steps).

    ``probs_steps[i]`` is the ``[HQ, q, n + q]`` of forward ``i`` over the ``n``
    slots then held and its ``q`` new tokens, ``key_steps[i]`` their keys
    ``[HKV, q, D]``; integer-valued so that float32 sums are exact."""
    k, group, policy = s.budget, HQ // HKV, s.policy
    per_head = policy.per_kv_head
    slots = [[] for _ in range(HKV)]  # per KV head: list of [position, accumulated, key]
    seen = 0
    for probs, keys in zip(probs_steps, key_steps):
        q = probs.shape[1]
        for h in range(HKV):
            slots[h] += [[seen + i, 0.0, keys[h, i].tolist()] for i in range(q)]
        seen += q
        for h in range(HKV):
            n = len(slots[h])
            heads = range(h * group, (h + 1) * group) if per_head else range(HQ)
            for j in range(n):
                slots[h][j][1] += sum(float(probs[hq, i, j]) for hq in heads for i in range(q)) / group
            if n <= k:
                continue
            newest = seen - 1
            if policy.name == "keydiff":
                kd = keydiff_priorities([key for _, _, key in slots[h]])
            pri = []
            for j, (pos, acc, _) in enumerate(slots[h]):
                if policy.name == "tova":
                    v = sum(float(probs[hq, -1, j]) for hq in range(HQ)) / HQ
                elif policy.name == "h2o":
                    v = INF if pos > newest - h2o_recent(k, policy.recent_ratio) else acc
                elif policy.name == "sink":
                    v = INF if pos < policy.num_sinks else pos
                elif policy.name == "keydiff":
                    v = kd[j]
                else:
                    v = pos
                pri.append((v, j))
            evict = {j for _, j in sorted(pri)[: n - k]}
            slots[h] = [sl for j, sl in enumerate(slots[h]) if j not in evict]
    return [[pos for pos, _, _ in slots[h]] for h in range(HKV)]


def pieces(prompt_len: int, s: KVSettings) -> list[tuple[int, int]]:
    """The prompt forwards of a prompt mode, written out again."""
    if s.prompt_mode == "bulk":
        return [(0, prompt_len)]
    if s.prompt_mode == "chunked":
        return [(a, min(a + s.chunk, prompt_len)) for a in range(0, prompt_len, s.chunk)]
    first = min(prompt_len, s.budget)
    return [(0, first)] + [(p, p + 1) for p in range(first, prompt_len)]


@settings(max_examples=80, deadline=None)
@given(
    name=st.sampled_from(BUILTIN),
    budget=st.integers(2, 6),
    prompt_len=st.integers(1, 9),
    n_decode=st.integers(0, 6),
    mode=st.sampled_from(["bulk", "chunked", "stream"]),
    chunk=st.integers(1, 5),
    ratio=st.sampled_from([0.5, 0.25, 0.75]),
    seed=st.integers(0, 2**16),
)
def test_reference_matches_simulator(name, budget, prompt_len, n_decode, mode, chunk, ratio, seed):
    options = {"sink": {"num_sinks": min(2, budget - 1)}, "h2o": {"recent_ratio": ratio}}.get(name, {})
    s = KVSettings(policy_class(name)(**options), budget, mode, chunk if mode == "chunked" else None)
    gen = torch.Generator().manual_seed(seed)
    # Small integers: many exact ties, so the tie rule is exercised. For
    # per-KV-head policies the three query heads of a group share their row, so
    # that the group means (and so the accumulated scores) stay integers: exact
    # in float32 and in Python.
    heads = HKV if s.policy.per_kv_head else HQ

    def draw(q, n_old):
        p = torch.randint(0, 3, (heads, q, n_old + q), generator=gen).float()
        p[..., n_old:] = p[..., n_old:].tril()  # causal among the new tokens
        return p.repeat_interleave(HQ // heads, dim=0)

    def draw_keys(q):
        # Keys along the axes (+-1 or +-2 times e_d): their similarities to the
        # mean key are then exact functions of the axis counts, in float32 as in
        # Python, so the simulator's ties are the reference's ties.
        axis = torch.randint(0, D, (HKV, q), generator=gen)
        scale = torch.tensor([-2.0, -1.0, 1.0, 2.0])[torch.randint(0, 4, (HKV, q), generator=gen)]
        return torch.nn.functional.one_hot(axis, D).float() * scale[..., None]

    forwards = pieces(prompt_len, s)
    assert forwards == prompt_pieces(prompt_len, s)
    sizes = [b - a for a, b in forwards] + [1] * n_decode
    steps, keys = [], []
    n = 0
    for q in sizes:
        steps.append(draw(q, n))
        keys.append(draw_keys(q))
        n = min(n + q, budget)
    layer = EvictionLayer(s)
    for probs, key in zip(steps, keys):
        step(layer, probs, keys=key)
        assert layer.keys.shape[-2] <= budget
    expected = simulate(s, steps, keys)
    for h in range(HKV):
        assert kept(layer, head=h) == expected[h]
    if not s.policy.per_kv_head:
        assert all(e == expected[0] for e in expected)
