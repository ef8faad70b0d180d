"""The transformers reference (`tova_vllm.reference`): parity with plain eager
transformers when nothing is evicted, the cache's bookkeeping under eviction,
batching with left padding, and perplexity under eviction.

Uses a tiny random Llama with GQA (9 query heads / 3 KV heads, like the
embedded model) and the embedded SmolLM2-135M-Instruct (`default_model()`),
loaded once per module. CPU, float32 unless stated."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, LlamaConfig, LlamaForCausalLM

from tova_vllm.config import KVSettings
from tova_vllm.policies import H2O, policy_class
from tova_vllm.reference import (
    ATTN_IMPLEMENTATION,
    EvictionCache,
    enable_reference_attention,
    generate_greedy,
    perplexity,
    prompt_pieces,
    score_nll,
)

POLICIES = ("tova", "window", "sink", "h2o", "keydiff")


def make(name: str, budget: int, mode: str = "bulk", chunk: int | None = None, **options) -> KVSettings:
    return KVSettings(policy_class(name)(**options), budget, mode, chunk)

PROSE = (
    "The lighthouse stood at the end of a long spit of sand, and for most of the year the only "
    "people who walked out to it were the keeper and the boy who brought him bread from the village. "
    "The keeper was an old man who had once been a sailor. He said little, but he kept a notebook in "
    "which he wrote down every ship that passed: its name if he could read it, the colour of its hull, "
    "the hour, and the state of the sea. When the boy asked him why, he said that somebody ought to "
    "remember them. In winter the storms came in from the west, and the waves broke so high against "
    "the rocks that the spray reached the lamp room. On those nights the keeper did not sleep at all. "
    "He climbed the stairs every hour to trim the wick and polish the glass, because a lamp that is "
    "dim in a storm is no better than a lamp that is dark. The boy grew up, went away to the city, "
    "and became an engineer. Years later he came back to find that the lighthouse had been automated "
    "and the keeper had died. In the empty lamp room, on a shelf beside the stairs, he found the "
    "notebooks, forty of them, and in the last one, written in a shaky hand, the name of the ship "
    "that had carried him to the city."
)

PROMPTS = [
    "Write a short story about a fox who learns to read. Once upon a time, in a quiet forest at the "
    "edge of a small village, there lived a young fox named",
    "The history of the printing press begins in the fifteenth century, when a goldsmith from Mainz "
    "combined movable metal type with oil-based ink and a screw press. The result",
    "Photosynthesis is the process by which green plants use sunlight to make food from carbon "
    "dioxide and water. It takes place mainly in the leaves, inside small structures called",
]


# --------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module. The work is a batch-1 decode loop,
    bound by per-op latency; with the 2 cores shared with anything else (vLLM
    engine processes, a parallel job), 2 OpenMP threads were 20x slower here
    (2 s vs 0.09 s per token of the embedded model)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=144, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=512,
        attn_implementation="eager", pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny64(tiny):
    """The tiny model in float64: different but equivalent computations (a
    prompt in chunks or in one forward) give the same greedy tokens."""
    return copy.deepcopy(tiny).double()


@pytest.fixture(scope="module")
def smol():
    from tova_vllm.models import default_model

    path = default_model()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval(), tok


@contextlib.contextmanager
def attn(model, impl: str):
    prev = model.config._attn_implementation
    if impl == ATTN_IMPLEMENTATION:
        enable_reference_attention(model)
    else:
        model.set_attn_implementation(impl)
    try:
        yield model
    finally:
        if model.config._attn_implementation != prev:
            model.set_attn_implementation(prev)


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


@torch.no_grad()
def run_steps(model, ids, mask, continuation, cache) -> list[torch.Tensor]:
    """Prompt forward, then one forward per column of ``continuation`` (fixed
    tokens, so both runs see the same inputs), as `generate` does. Returns the
    logits of every forward (pad query rows zeroed)."""
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
    logits = [out.logits * mask[..., None]]
    for j in range(continuation.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=continuation[:, j:j + 1], attention_mask=mask, position_ids=pos,
                    past_key_values=cache, use_cache=True)
        logits.append(out.logits)
    return logits


def assert_parity(model, ids, mask, continuation, atol, rtol=0.0):
    with attn(model, "eager"):
        expected = run_steps(model, ids, mask, continuation, DynamicCache(config=model.config))
    with attn(model, ATTN_IMPLEMENTATION):
        n = ids.shape[1] + continuation.shape[1]
        for settings in (None, make("tova", n), make("h2o", n), make("sink", n + 5), make("keydiff", n),
                         make("window", n)):
            cache = EvictionCache(settings, config=model.config)
            got = run_steps(model, ids, mask, continuation, cache)
            for e, g in zip(expected, got):
                torch.testing.assert_close(g.float(), e.float(), atol=atol, rtol=rtol)
            assert cache.get_seq_length() == n
            assert cache.layers[0].keys.shape[-2] == n  # nothing evicted


# ---------------------------------------------------------- parity with eager


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parity_tiny_gqa(tiny, dtype):
    model = tiny if dtype == torch.float32 else copy.deepcopy(tiny).to(dtype)
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(1, 256, (n,), generator=gen).tolist() for n in (23, 9, 16)]
    ids, mask = left_pad(rows, pad=0)
    cont = torch.randint(1, 256, (3, 6), generator=gen)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_parity(model, ids, mask, cont, atol=tol, rtol=tol if dtype != torch.float32 else 0.0)
    # Also without padding (generate drops an all-ones mask).
    assert_parity(model, ids[:1], mask[:1], cont[:1], atol=tol, rtol=tol if dtype != torch.float32 else 0.0)


def test_parity_embedded_fp32(smol):
    model, tok = smol
    rows = [tok(p)["input_ids"][:n] for p, n in zip(PROMPTS[:2], (40, 28))]
    ids, mask = left_pad(rows, pad=tok.pad_token_id)
    cont = torch.tensor([tok(" and then the")["input_ids"]] * 2)
    assert_parity(model, ids, mask, cont, atol=1e-5)


def test_parity_embedded_bf16(smol):
    model, tok = smol
    bf = copy.deepcopy(model).to(torch.bfloat16)
    ids = torch.tensor([tok(PROMPTS[2])["input_ids"][:24]])
    cont = torch.tensor([tok(" the")["input_ids"]])
    assert_parity(bf, ids, torch.ones_like(ids), cont, atol=5e-2, rtol=5e-2)


def test_full_budget_generation_equals_full_cache(smol):
    model, tok = smol
    ids = tok(PROMPTS[0])["input_ids"]
    full = generate_greedy(model, [ids], None, 8)
    assert generate_greedy(model, [ids], make("tova", len(ids) + 8), 8) == full
    with attn(model, "eager"):  # generate_greedy is `generate`'s greedy loop
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                             eos_token_id=None, pad_token_id=tok.pad_token_id)
    gen = out[0, len(ids):].tolist()
    assert gen == full[0][: len(gen)]


# ------------------------------------------------------- eviction bookkeeping


BUDGET, NEW = 24, 20


@pytest.mark.parametrize("name", POLICIES)
def test_generation_keeps_budget_true_positions(smol, name):
    model, tok = smol
    ids = tok(PROMPTS[1])["input_ids"]
    assert 35 <= len(ids) <= 80
    settings = make(name, BUDGET)
    cache = EvictionCache(settings, config=model.config)
    generate_greedy(model, [ids], settings, NEW, cache=cache)
    seen = len(ids) + NEW - 1  # the last generated token is never fed back
    newest = seen - 1
    assert cache.get_seq_length() == seen
    kept_sets = set()
    for layer in range(model.config.num_hidden_layers):
        pos = cache.kept_positions(layer)
        heads = pos[0] if settings.policy.per_kv_head else pos  # [heads, k]
        assert (cache.kept_counts(layer) == BUDGET).all()
        for p in heads.tolist():
            assert p == sorted(set(p)) and len(p) == BUDGET  # unique, chronological
            assert 0 <= p[0] and p[-1] <= newest
            kept_sets.add(tuple(p))
            if name == "window":
                assert p == list(range(seen - BUDGET, seen))
            elif name == "sink":
                assert p == [0, 1, 2, 3] + list(range(seen - BUDGET + 4, seen))
            elif name == "h2o":
                recent = int(H2O().recent(torch.tensor([BUDGET])))
                assert recent == BUDGET // 2
                assert p[-recent:] == list(range(seen - recent, seen))
    if name == "tova":
        # Each layer keeps its own set on real text.
        assert len(kept_sets) > model.config.num_hidden_layers // 2
    if name in ("h2o", "keydiff"):
        assert len(kept_sets) > 1  # heads and layers differ


def test_generate_api_matches_generate_greedy(smol):
    model, tok = smol
    enc = tok(PROMPTS[0], return_tensors="pt")
    settings = make("tova", 20)
    enable_reference_attention(model)
    cache = EvictionCache(settings, config=model.config)
    out = model.generate(**enc, past_key_values=cache, max_new_tokens=10, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    gen = out[0, enc.input_ids.shape[1]:].tolist()
    ref = generate_greedy(model, enc.input_ids, settings, 10)[0]
    assert gen == ref[: len(gen)] and len(gen) > 0
    assert cache.get_seq_length() == enc.input_ids.shape[1] + len(gen) - 1
    assert cache.kept_positions(0).shape == (1, 20)


@pytest.mark.parametrize("name", ["tova", "sink", "h2o"])
def test_generate_api_left_padded_batch(tiny, name):
    """`generate` (2D mask growing each step, positions from it) with left
    padding gives generate_greedy's tokens."""
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(1, 256, (n,), generator=gen).tolist() for n in (19, 7, 12)]
    ids, mask = left_pad(rows, pad=0)
    settings = make(name, 8)
    enable_reference_attention(tiny)
    cache = EvictionCache(settings, config=tiny.config)
    out = tiny.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=6,
                        do_sample=False, pad_token_id=0)
    assert out[:, ids.shape[1]:].tolist() == generate_greedy(tiny, rows, settings, 6)
    assert cache.get_seq_length() == ids.shape[1] + 5
    counts = cache.kept_counts(1)
    assert (counts == 8).all()  # every row has more than 8 real tokens by now


def test_cache_without_reference_attention_fails_clearly(tiny):
    with attn(tiny, "eager"):
        cache = EvictionCache(make("tova", 4), config=tiny.config)
        ids = torch.randint(1, 256, (1, 6))
        with torch.no_grad(), pytest.raises(RuntimeError, match=ATTN_IMPLEMENTATION):
            tiny(ids, past_key_values=cache, use_cache=True)
            tiny(ids[:, :1], past_key_values=cache, use_cache=True)


# ------------------------------------------------------------- batching


@pytest.mark.parametrize("name", POLICIES)
def test_left_padded_batch_matches_each_prompt_alone(smol, name):
    model, tok = smol
    rows = [tok(p)["input_ids"][:n] for p, n in zip(PROMPTS, (34, 21, 28))]
    settings = make(name, 16)
    batch = generate_greedy(model, rows, settings, 6, tokenizer=tok)
    alone = [generate_greedy(model, [r], settings, 6)[0] for r in rows]
    assert batch == alone


def test_batch_cache_counts_only_real_tokens(tiny):
    enable_reference_attention(tiny)
    rows = [[5, 6, 7], list(range(1, 12))]
    cache = EvictionCache(make("sink", 6, num_sinks=2), config=tiny.config)
    generate_greedy(tiny, rows, cache.settings, 3, cache=cache)
    # Row 0: 3 + 2 tokens <= 6: all kept, one slot still holds padding (-1).
    assert cache.kept_positions(1).tolist() == [[-1, 0, 1, 2, 3, 4], [0, 1, 9, 10, 11, 12]]
    assert cache.kept_counts(1).tolist() == [5, 6]


# ------------------------------------------------------------- prompt modes


def record_forwards(cache: EvictionCache, layer_idx: int = 0) -> list[tuple[int, int, int]]:
    """Log ``(slots before, new tokens, slots after)`` of every forward
    through one layer of ``cache``."""
    layer = cache.layers[layer_idx]
    log: list[tuple[int, int, int]] = []
    finish = layer.finish_step

    def finish_step(probs, new_valid, new_positions):
        n_old, q = layer._open_step
        finish(probs, new_valid, new_positions)
        log.append((n_old, q, layer.keys.shape[-2]))

    layer.finish_step = finish_step
    return log


@torch.no_grad()
def manual_generate(model, ids: list[int], settings, pieces, max_new: int, cache=None) -> list[int]:
    """Greedy decoding with the prompt fed in the given ``pieces`` (written
    out here, not from `prompt_pieces`), then one token per forward."""
    enable_reference_attention(model)
    cache = EvictionCache(settings, config=model.config) if cache is None else cache
    x = torch.tensor([ids])
    for a, b in pieces:
        out = model(input_ids=x[:, a:b], position_ids=torch.arange(a, b)[None], past_key_values=cache,
                    use_cache=True)
    toks, pos = [], len(ids)
    for i in range(max_new):
        toks.append(int(out.logits[0, -1].argmax()))
        if i == max_new - 1:
            break
        out = model(input_ids=torch.tensor([[toks[-1]]]), position_ids=torch.tensor([[pos]]),
                    past_key_values=cache, use_cache=True)
        pos += 1
    return toks


def test_prompt_pieces():
    s = lambda mode, chunk=None: make("tova", 4, mode, chunk)  # noqa: E731
    assert prompt_pieces(10, None) == [(0, 10)]
    assert prompt_pieces(10, s("bulk")) == [(0, 10)]
    assert prompt_pieces(10, s("chunked", 3)) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert prompt_pieces(10, s("chunked")) == [(0, 4), (4, 8), (8, 10)]  # default chunk: the budget
    assert prompt_pieces(3, s("chunked", 5)) == [(0, 3)]
    assert prompt_pieces(7, s("stream")) == [(0, 4), (4, 5), (5, 6), (6, 7)]
    assert prompt_pieces(3, s("stream")) == [(0, 3)]


P, K, C, NEW_TOKENS = 23, 8, 5, 4


def prompt_ids(seed: int = 3, n: int = P) -> list[int]:
    return torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name", ["tova", "h2o", "keydiff", "sink"])
def test_chunked_prompt_reduces_after_each_chunk(tiny64, name):
    ids = prompt_ids()
    settings = make(name, K, "chunked", C)
    cache = EvictionCache(settings, config=tiny64.config)
    log = record_forwards(cache)
    out = generate_greedy(tiny64, [ids], settings, NEW_TOKENS, cache=cache)[0]
    # Chunks of C tokens from position 0, each attending over the kept tokens
    # plus itself, then reduced to the budget (the first 5 fit: nothing to reduce).
    assert log[:5] == [(0, 5, 5), (5, 5, 8), (8, 5, 8), (8, 5, 8), (8, 3, 8)]
    assert log[5:] == [(8, 1, 8)] * (NEW_TOKENS - 1)
    assert cache.get_seq_length() == P + NEW_TOKENS - 1
    pieces = [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    assert out == manual_generate(tiny64, ids, settings, pieces, NEW_TOKENS)


def test_chunked_prompt_equivalences(tiny64):
    ids = prompt_ids()
    bulk_cache = EvictionCache(make("tova", K), config=tiny64.config)
    bulk = generate_greedy(tiny64, [ids], make("tova", K), NEW_TOKENS, cache=bulk_cache)
    # A chunk of at least the prompt: the bulk computation.
    whole = make("tova", K, "chunked", P)
    cache = EvictionCache(whole, config=tiny64.config)
    assert generate_greedy(tiny64, [ids], whole, NEW_TOKENS, cache=cache) == bulk
    assert torch.equal(cache.kept_positions(1), bulk_cache.kept_positions(1))
    # A prompt that fits the budget: chunks, nothing evicted: bulk's tokens.
    short = ids[:12]
    assert generate_greedy(tiny64, [short], make("tova", 16, "chunked", 5), NEW_TOKENS) == generate_greedy(
        tiny64, [short], make("tova", 16), NEW_TOKENS
    )
    # Position-based policies keep the same tokens whatever the chunking.
    for name in ("window", "sink"):
        caches = {}
        for mode, chunk in (("bulk", None), ("chunked", 4), ("chunked", 7)):
            s = make(name, K, mode, chunk, **({"num_sinks": 2} if name == "sink" else {}))
            caches[mode, chunk] = EvictionCache(s, config=tiny64.config)
            generate_greedy(tiny64, [ids], s, 1, cache=caches[mode, chunk])
        kept = {key: c.kept_positions(0).tolist() for key, c in caches.items()}
        expected = list(range(P - K, P)) if name == "window" else [0, 1, *range(P - K + 2, P)]
        assert all(v == [expected] for v in kept.values()), kept


@pytest.mark.parametrize("name", ["tova", "h2o", "keydiff", "window"])
def test_stream_prompt_one_token_per_forward_past_the_budget(tiny64, name):
    ids = prompt_ids()
    settings = make(name, K, "stream")
    cache = EvictionCache(settings, config=tiny64.config)
    log = record_forwards(cache)
    out = generate_greedy(tiny64, [ids], settings, NEW_TOKENS, cache=cache)[0]
    # The first K tokens in one forward (nothing can be evicted before), then
    # every prompt token alone, evicting as a decode step does.
    assert log[0] == (0, K, K)
    assert log[1:] == [(K, 1, K)] * (P - K + NEW_TOKENS - 1)
    pieces = [(0, K)] + [(p, p + 1) for p in range(K, P)]
    assert out == manual_generate(tiny64, ids, settings, pieces, NEW_TOKENS)
    if name == "window":
        seen = P + NEW_TOKENS - 1
        assert cache.kept_positions(1).tolist() == [list(range(seen - K, seen))]


def test_stream_prompt_equivalences(tiny64):
    ids = prompt_ids()
    # A prompt that fits the budget: one forward, the bulk computation.
    short = ids[:K]
    assert generate_greedy(tiny64, [short], make("tova", K, "stream"), NEW_TOKENS) == generate_greedy(
        tiny64, [short], make("tova", K), NEW_TOKENS
    )
    # A streamed prompt is fed as score_nll feeds a text (the first K tokens,
    # then one per forward): the generated tokens are the argmax of the same
    # forwards' predictions, and score_nll's NLLs are those forwards'.
    s = make("tova", K, "stream")
    out = generate_greedy(tiny64, [ids], s, 3)[0]
    nll = score_nll(tiny64, torch.tensor(ids + out), s, prompt_len=0)
    assert nll.shape == (P + 2,)
    full = torch.tensor(ids + out)
    with torch.no_grad():
        cache = EvictionCache(s, config=tiny64.config)
        logits = []
        o = tiny64(input_ids=full[None, :K], past_key_values=cache, use_cache=True)
        logits.append(o.logits[0])
        for i in range(K, len(full) - 1):
            o = tiny64(input_ids=full[None, i:i + 1], past_key_values=cache, use_cache=True)
            logits.append(o.logits[0])
        logits = torch.cat(logits)  # predictions of tokens 1 .. len - 1
    assert logits.argmax(-1)[P - 1:].tolist() == out
    ref = torch.nn.functional.cross_entropy(logits.float(), full[1:], reduction="none")
    torch.testing.assert_close(nll, ref[: P + 2], atol=1e-6, rtol=1e-6)


def test_prompt_modes_take_unpadded_prompts(tiny64):
    for mode in ("chunked", "stream"):
        with pytest.raises(ValueError, match="unpadded prompts"):
            generate_greedy(tiny64, [prompt_ids(n=20), prompt_ids(n=12)], make("tova", 4, mode, 3), 2)
    # One length, several prompts: fine.
    rows = [prompt_ids(seed=s, n=15) for s in (4, 5)]
    s = make("tova", 6, "chunked", 4)
    assert generate_greedy(tiny64, rows, s, 3) == [generate_greedy(tiny64, [r], s, 3)[0] for r in rows]


@pytest.mark.parametrize("name,mode", [("tova", "chunked"), ("window", "stream"), ("sink", "chunked")])
def test_prompt_modes_on_the_embedded_model(smol, name, mode):
    model, tok = smol
    ids = tok(PROMPTS[1])["input_ids"]
    settings = make(name, BUDGET, mode, 10 if mode == "chunked" else None)
    cache = EvictionCache(settings, config=model.config)
    log = record_forwards(cache, layer_idx=5)
    generate_greedy(model, [ids], settings, 4, cache=cache)
    seen = len(ids) + 3
    assert max(after for *_, after in log) == BUDGET
    assert max(n_old + q for n_old, q, _ in log) <= BUDGET + (10 if mode == "chunked" else 1)
    for layer in range(model.config.num_hidden_layers):
        pos = cache.kept_positions(layer)[0].tolist()
        assert pos == sorted(set(pos)) and len(pos) == BUDGET and pos[-1] <= seen - 1
        if name == "window":
            assert pos == list(range(seen - BUDGET, seen))
        elif name == "sink":
            assert pos == [0, 1, 2, 3] + list(range(seen - BUDGET + 4, seen))


# ------------------------------------------------------------- perplexity


def test_perplexity_improves_with_budget(smol):
    model, tok = smol
    ids = torch.tensor(tok(PROSE)["input_ids"])[:200]  # 200 of its ~270 tokens: CI time
    assert ids.numel() == 200
    # Token by token once the budget is full: each token predicted from the evicted cache.
    ppl = {b: perplexity(score_nll(model, ids, make("tova", b))) for b in (32, 128)}
    ppl["full"] = perplexity(score_nll(model, ids, None))
    # Seen here: 32 -> 21.2, 128 -> 20.0, full -> 19.9.
    assert ppl[32] > ppl[128] > ppl["full"], ppl
    assert ppl[32] > ppl["full"] * 1.03, ppl
