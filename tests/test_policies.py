"""Selection rules: the pure functions of `tova_vllm.policies` and the
reference cache's use of them (`tova_vllm.reference.EvictionLayer`), on tiny
hand-computed cases, plus an independent pure-Python simulator of the
documented semantics checked against the reference with hypothesis.

Layers here are driven by hand: `update` appends keys as the model would, and
`finish_step` gets hand-made attention probabilities (``[batch, 9 query heads,
new tokens, slots]``, 3 KV heads: GQA groups of 3)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tova_vllm import policies
from tova_vllm.policies import (
    PolicyConfig,
    evict_one,
    head_average,
    keep_top,
    masked_priority,
    recent_protected,
    sink_protected,
    window_priority,
)
from tova_vllm.reference import EvictionLayer

HQ, HKV, D = 9, 3, 4
INF = float("inf")


# ------------------------------------------------------------------ helpers


def step(layer: EvictionLayer, probs, valid=None) -> None:
    """One forward of ``q`` new tokens through ``layer`` with the given
    probabilities ``[B, HQ, q, n_old + q]`` (or ``[HQ, q, n]`` for batch 1)."""
    probs = torch.as_tensor(probs, dtype=torch.float32)
    if probs.dim() == 3:
        probs = probs[None]
    b, _, q, _ = probs.shape
    k = torch.randn(b, HKV, q, D)
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


def test_priority_helpers():
    pos = torch.tensor([0, 1, 2, 3, 7, 8, 9])
    assert keep_top(window_priority(pos), 3).tolist() == [4, 5, 6]
    assert sink_protected(pos, 4).tolist() == [True] * 4 + [False] * 3
    assert recent_protected(pos, 9, 2).tolist() == [False] * 5 + [True] * 2
    p = masked_priority(
        torch.tensor([5.0, 1.0, 2.0]),
        protected=torch.tensor([False, True, False]),
        valid=torch.tensor([True, True, False]),
    )
    assert p.tolist() == [5.0, INF, -INF]
    # Invalid beats protected: a padding slot is always evicted first.
    p = masked_priority(torch.ones(2), torch.tensor([True, True]), torch.tensor([False, True]))
    assert p.tolist() == [-INF, INF]


def test_policy_config_validation():
    assert PolicyConfig("h2o", 8).h2o_recent == 4
    assert PolicyConfig("h2o", 1).h2o_recent == 1
    assert PolicyConfig("h2o", 8).head_wise and not PolicyConfig("tova", 8).head_wise
    for bad in [dict(name="lru", budget=8), dict(name="tova", budget=0),
                dict(name="sink", budget=4, num_sinks=4), dict(name="h2o", budget=4, h2o_recent_ratio=1.0)]:
        with pytest.raises(ValueError):
            PolicyConfig(**bad)


# -------------------------------------------------- hypothesis properties


priorities = st.lists(st.integers(0, 4), min_size=1, max_size=12).map(
    lambda v: torch.tensor(v, dtype=torch.float64)
)


@given(priorities, st.integers(0, 14), st.data())
def test_keep_top_properties(pri, keep, data):
    n = pri.numel()
    protected = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    p = masked_priority(pri, protected)
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


# ------------------------------------------- the reference's selection, by hand


def test_tova_gqa_averages_all_query_heads():
    layer = EvictionLayer(PolicyConfig("tova", budget=3))
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
    layer = EvictionLayer(PolicyConfig("tova", budget=3))
    prefill(layer, 3)
    step(layer, decode_probs([[0.4, 0.1, 0.1, 0.4]] * 3))
    assert kept(layer) == [0, 2, 3]


def test_tova_evicts_the_new_token_when_lowest():
    layer = EvictionLayer(PolicyConfig("tova", budget=3))
    prefill(layer, 3)
    keys_before = layer.keys.clone()
    step(layer, decode_probs([[0.3, 0.3, 0.3, 0.1]] * 3))
    assert kept(layer) == [0, 1, 2]
    torch.testing.assert_close(layer.keys, keys_before)
    assert layer.seen == 4  # the token was seen, just not kept


def test_tova_prefill_bulk_uses_last_query():
    layer = EvictionLayer(PolicyConfig("tova", budget=2))
    probs = uniform(HQ, 4, 4)
    probs[:, 0, :] = torch.tensor([1.0, 0, 0, 0])
    probs[:, -1, :] = torch.tensor([0.1, 0.5, 0.1, 0.3])
    step(layer, probs)
    assert kept(layer) == [1, 3]
    layer = EvictionLayer(PolicyConfig("tova", budget=3))
    probs[:, -1, :] = torch.tensor([0.2, 0.3, 0.2, 0.3])  # tie 0/2: slot 0 goes
    step(layer, probs)
    assert kept(layer) == [1, 2, 3]


def test_budget_at_least_length_never_evicts():
    for name in policies.POLICIES:
        layer = EvictionLayer(PolicyConfig(name, budget=7))
        prefill(layer, 4)
        for _ in range(3):
            step(layer, uniform(HQ, 1, layer.keys.shape[-2] + 1))
        assert layer.keys.shape[-2] == 7
        for h in range(HKV):
            assert kept(layer, head=h) == list(range(7))
        step(layer, uniform(HQ, 1, 8))
        assert layer.keys.shape[-2] == 7  # the 8th token makes it evict


def test_window_keeps_most_recent():
    layer = EvictionLayer(PolicyConfig("window", budget=4))
    prefill(layer, 6)  # bulk: 2..5
    assert kept(layer) == [2, 3, 4, 5]
    for _ in range(2):
        step(layer, decode_probs([[1.0, 0, 0, 0, 0]] * 3))  # attention is ignored
    assert kept(layer) == [4, 5, 6, 7]


def test_sink_protects_first_tokens():
    layer = EvictionLayer(PolicyConfig("sink", budget=4, num_sinks=2))
    prefill(layer, 3)
    for _ in range(5):
        step(layer, uniform(HQ, 1, layer.keys.shape[-2] + 1))
    assert kept(layer) == [0, 1, 6, 7]
    layer = EvictionLayer(PolicyConfig("sink", budget=5))  # default 4 sinks
    prefill(layer, 10)
    assert kept(layer) == [0, 1, 2, 3, 9]


def test_h2o_keeps_recent_and_per_head_heavy_hitters():
    # budget 4: 2 recent + 2 heavy hitters per KV head.
    layer = EvictionLayer(PolicyConfig("h2o", budget=4))
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


def test_padding_is_never_kept_nor_counted():
    # Row 0 has 2 pad tokens then 3 real; row 1 has 5 real. Budget 4.
    layer = EvictionLayer(PolicyConfig("tova", budget=4))
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


# ---------------------------------- an independent simulator (pure Python)


def simulate(cfg: PolicyConfig, prompt_len: int, probs_steps: list[torch.Tensor]) -> list[list[int]]:
    """The documented semantics written out with lists: returns, per KV head,
    the kept positions after the prompt and every decode step.

    ``probs_steps[0]`` is the prompt's ``[HQ, P, P]``, then ``[HQ, 1, n + 1]``
    per decode step; integer-valued so that float32 sums are exact."""
    k, group = cfg.budget, HQ // HKV
    slots = [[] for _ in range(HKV)]  # per KV head: list of [position, accumulated]
    seen = 0
    for s, probs in enumerate(probs_steps):
        q = probs.shape[1]
        for h in range(HKV):
            slots[h] += [[seen + i, 0.0] for i in range(q)]
        seen += q
        for h in range(HKV):
            n = len(slots[h])
            heads = range(h * group, (h + 1) * group) if cfg.head_wise else range(HQ)
            for j in range(n):
                slots[h][j][1] += sum(float(probs[hq, i, j]) for hq in heads for i in range(q)) / group
            if n <= k:
                continue
            newest = seen - 1
            pri = []
            for j, (pos, acc) in enumerate(slots[h]):
                if cfg.name == "tova":
                    v = sum(float(probs[hq, -1, j]) for hq in range(HQ)) / HQ
                elif cfg.name == "h2o":
                    v = INF if pos > newest - cfg.h2o_recent else acc
                elif cfg.name == "sink":
                    v = INF if pos < cfg.num_sinks else pos
                else:
                    v = pos
                pri.append((v, j))
            evict = {j for _, j in sorted(pri)[: n - k]}
            slots[h] = [sl for j, sl in enumerate(slots[h]) if j not in evict]
    return [[pos for pos, _ in slots[h]] for h in range(HKV)]


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(policies.POLICIES),
    budget=st.integers(2, 6),
    prompt_len=st.integers(1, 8),
    n_decode=st.integers(0, 6),
    seed=st.integers(0, 2**16),
)
def test_reference_matches_simulator(name, budget, prompt_len, n_decode, seed):
    cfg = PolicyConfig(name, budget, num_sinks=min(2, budget - 1))
    gen = torch.Generator().manual_seed(seed)
    # Small integers: many exact ties, so the tie rule is exercised. For h2o the
    # three query heads of a group share their row, so that the group means (and
    # so the accumulated scores) stay integers: exact in float32 and in Python.
    heads = HKV if cfg.head_wise else HQ

    def draw(q, n):
        p = torch.randint(0, 3, (heads, q, n), generator=gen).float()
        return p.repeat_interleave(HQ // heads, dim=0)

    steps = [draw(prompt_len, prompt_len).tril()]
    n = min(prompt_len, budget)
    for _ in range(n_decode):
        steps.append(draw(1, n + 1))
        n = min(n + 1, budget)
    layer = EvictionLayer(cfg)
    for probs in steps:
        step(layer, probs)
    expected = simulate(cfg, prompt_len, steps)
    for h in range(HKV):
        assert kept(layer, head=h) == expected[h]
    if not cfg.head_wise:
        assert all(e == expected[0] for e in expected)
