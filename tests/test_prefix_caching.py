"""Prefix caching together with eviction, exactly.

With prefix caching on (vLLM's default), a bulk prompt whose policy is
prefix-cacheable is written positionally in a prompt region of shared, hashed
blocks, and its kept tokens are copied into a private kept region at the
prompt's end; a later request with the same prefix skips the prefill of the
cached blocks. The kept tokens depend only on the prompt's keys/values and its
last query, so a hit gives the same result as a cold prompt.

Checked here on the embedded model in float32 with chunked prefill (64-token
steps, so a request also hits blocks another one writes in the same step):
prompts sharing a multi-block prefix, exact duplicates and a prompt that is a
prefix of another, at two budgets, in one mixed batch and under preemption:
greedy tokens with caching on equal caching off and the transformers
reference; the kept positions of every layer, step by step, equal between a
warm and a cold engine; vLLM's hit counts; no kept block is ever hashed; the
pool returns to idle; requests that must not use the cache (h2o, chunked or
streamed prompts) neither read nor write it.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import vllm_engine
from model_runners import scaled
from parity_diagnosis import engine_kept, first_divergence
from vllm import SamplingParams

from tova_vllm.config import engine_settings, request_settings
from tova_vllm.inspect import engine_kv_state
from tova_vllm.reference import generate_greedy

BLOCK = 16
ENGINE = {"kv_policy": "tova", "kv_budget": 80}
MAX_TOKENS = scaled(32, 8)
SYSTEM = (
    "You are the librarian of a small harbour town. You answer questions about the town's "
    "history, its lighthouse, its fishing fleet and its annual regatta. You are precise, you "
    "cite the year when you know it, and you say so plainly when you do not know something. "
    "The lighthouse was built in 1821 and rebuilt after the storm of 1893; the regatta began in "
    "1904; the fish market moved to the north quay in 1962."
)
QUESTIONS = [
    "When was the lighthouse rebuilt, and why?",
    "Tell me about the regatta and how it started.",
    "Where is the fish market now?",
]


@pytest.fixture(scope="module")
def tok(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="module")
def prompts(tok) -> dict[str, list[int]]:
    def chat(q):
        text = tok.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
            tokenize=False,
            add_generation_prompt=True,
        )
        return tok(text, add_special_tokens=False).input_ids

    a, b, c = (chat(q) for q in QUESTIONS)
    return {
        "a": a,
        "b": b,  # shares the system prompt's blocks with a
        "c": c,
        "a_prefix": a[: len(a) - 9],  # a prompt that is a prefix of another
        "a_longer": a + tok(" Answer in one sentence, then give the year.", add_special_tokens=False).input_ids,
    }


@pytest.fixture(scope="module")
def hf_model(model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


@contextlib.contextmanager
def _in_process_engine(model_path, **kwargs):
    """Steps run when LLMEngine.step() is called: kept positions and the
    scheduler can be read between steps."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        with vllm_engine(model_path, **ENGINE, max_num_batched_tokens=64, disable_log_stats=False, **kwargs) as llm:
            mp.undo()
            yield llm
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def warm(model_path):
    with _in_process_engine(model_path) as llm:
        assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
        yield llm


@pytest.fixture(scope="module")
def cold(model_path):
    with _in_process_engine(model_path, enable_prefix_caching=False) as llm:
        assert not llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
        yield llm


def _params(extra, max_tokens=MAX_TOKENS):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra or None)


def _hits(llm) -> float:
    for metric in llm.get_metrics():
        if metric.name == "vllm:prefix_cache_hits":
            return metric.value
    raise AssertionError("vllm:prefix_cache_hits not found")


def _scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def _expected_hit(prompt: list[int], cached: int) -> int:
    """Tokens of ``prompt`` a hit covers when its first ``cached`` tokens are
    in cached blocks: whole blocks, and never the prompt's last token."""
    return min(cached, len(prompt) - 1) // BLOCK * BLOCK


def _shared(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


CASES = [
    # (name, prompt, per-request settings)
    ("a again", "a", {}),
    ("b", "b", {"kv_budget": 40}),
    ("a_prefix", "a_prefix", {}),
    ("a_longer", "a_longer", {"kv_budget": 40}),
    ("a, window", "a", {"kv_policy": "window", "kv_budget": 40}),
    ("c, sink", "c", {"kv_policy": "sink", "kv_budget": 40}),
    ("b, keydiff", "b", {"kv_policy": "keydiff", "kv_budget": 40}),
]
NO_CACHE = [
    ("a, h2o", "a", {"kv_policy": "h2o", "kv_budget": 40}),
    ("a, chunked", "a", {"kv_budget": 40, "kv_prompt_mode": "chunked", "kv_prompt_chunk": 24}),
    ("a, stream", "a", {"kv_budget": 40, "kv_prompt_mode": "stream"}),
]


@pytest.fixture(scope="module")
def runs(warm, prompts, request):
    """The seed prompt alone, then every case in one mixed batch, on the warm
    and on the cold engine (started after the warm run: vLLM's metrics live in
    one registry per process, the latest engine's)."""
    results = {}
    for name in ("warm", "cold"):
        llm = warm if name == "warm" else request.getfixturevalue("cold")
        idle = engine_kv_state(llm)["num_free_blocks"]
        hits0 = _hits(llm)
        seed = llm.generate([{"prompt_token_ids": prompts["a"]}], _params({}), use_tqdm=False)[0]
        batch = CASES + NO_CACHE
        outs = llm.generate(
            [{"prompt_token_ids": prompts[p]} for _, p, _ in batch],
            [_params(e) for _, _, e in batch],
            use_tqdm=False,
        )
        results[name] = {
            "seed": seed,
            "outs": {case[0]: out for case, out in zip(batch, outs)},
            "hits": _hits(llm) - hits0,
            "idle": (idle, engine_kv_state(llm)["num_free_blocks"]),
        }
    return results


@pytest.mark.runner_v2
def test_hits_are_the_cached_whole_blocks(runs, prompts):
    """Each request hits the longest prefix the seed or an earlier request of
    the batch wrote (vLLM looks a waiting request up only after every earlier
    one has had all its prompt scheduled, and it hashes blocks as it
    schedules them: some of these hits are blocks written in the same step)."""
    warm = runs["warm"]
    assert warm["seed"].num_cached_tokens == 0
    expected, written = 0, [prompts["a"]]
    for name, p, _ in CASES:
        want = max(_expected_hit(prompts[p], _shared(prompts[p], q)) for q in written)
        assert want >= 2 * BLOCK, (name, want)  # multi-block prefixes
        assert warm["outs"][name].num_cached_tokens == want, name
        expected += want
        written.append(prompts[p])
    for name, *_ in NO_CACHE:
        assert warm["outs"][name].num_cached_tokens == 0, name  # they do not read it
    # vLLM's own counter (requests that skip the lookup are not counted).
    assert warm["hits"] == expected
    cold = runs["cold"]
    assert cold["hits"] == 0 and all(o.num_cached_tokens == 0 for o in cold["outs"].values())


@pytest.mark.runner_v2
def test_cached_runs_give_the_tokens_of_cold_runs_and_of_the_reference(runs, prompts, hf_model):
    engine = engine_settings(ENGINE)
    report = {}
    for name, p, extra in CASES + NO_CACHE:
        warm = list(runs["warm"]["outs"][name].outputs[0].token_ids)
        cold = list(runs["cold"]["outs"][name].outputs[0].token_ids)
        ref = generate_greedy(hf_model, [prompts[p]], request_settings(engine, extra), MAX_TOKENS)[0]
        if not warm == cold == ref:
            report[name] = {"warm vs cold": first_divergence(warm, cold), "warm vs reference": first_divergence(warm, ref)}
    assert not report, report


@pytest.mark.runner_v2
def test_the_pool_returns_to_idle(runs):
    for name in ("warm", "cold"):
        before, after = runs[name]["idle"]
        assert before == after, name


@pytest.mark.runner_v2
def test_kept_positions_of_a_warm_prompt_equal_a_cold_one_and_no_kept_block_is_hashed(warm, cold, prompts, runs):
    """Step by step, every layer keeps the same positions after a prefix hit
    as without one; meanwhile the prompt region's full blocks are hashed and
    no kept block ever is."""
    engine = engine_settings(ENGINE)
    settings = request_settings(engine, {"kv_budget": 40})
    prompt = prompts["b"]  # its system-prompt blocks are cached by now
    scheduler = _scheduler(warm)
    manager = next(m for m in scheduler.kv_cache_manager.coordinator.single_type_managers)
    region = -(-len(prompt) // BLOCK)
    seen_hashed = []

    original_step = warm.llm_engine.step

    def step():
        out = original_step()
        for rid, blocks in manager.req_to_blocks.items():
            kept = [b for b in blocks[region:] if not b.is_null]
            assert all(b.block_hash is None for b in kept), rid
            hashed = [b for b in blocks[:region] if not b.is_null and b.block_hash is not None]
            seen_hashed.append(len(hashed))
        return out

    warm.llm_engine.step = step
    try:
        warm_states = engine_kept(warm, prompt, settings, 10)
    finally:
        warm.llm_engine.step = original_step
    cold_states = engine_kept(cold, prompt, settings, 10)
    assert sorted(warm_states) == sorted(cold_states) == list(range(len(prompt), len(prompt) + 10))
    for n in warm_states:
        assert warm_states[n] == cold_states[n], n
    # The prompt's full blocks were hashed while it ran (then returned, cached).
    assert max(seen_hashed) == len(prompt) // BLOCK


def test_preempted_requests_with_cached_prefixes_give_the_same_tokens(model_path, prompts, tok, cold):
    """A pool too small for every request's blocks forces preemption (short
    prompts sharing a prefix: kept regions grow while decoding, past the
    budget); resumed requests look the cache up again (capped before their
    prompt's last block) and give the tokens of the cold engine."""
    short = [
        prompts["a"][:20] + tok(f" Question {i}: what happened in 18{20 + 7 * i}?", add_special_tokens=False).input_ids
        for i in range(8)
    ]
    params = [_params({} if i % 2 else {"kv_budget": 64}, 48) for i in range(len(short))]
    # The cold engine first: a multiprocess engine's teardown resets this
    # process's distributed state, which in-process engines use.
    want = cold.generate([{"prompt_token_ids": p} for p in short], params, use_tqdm=False)
    with vllm_engine(
        model_path, **ENGINE, max_num_batched_tokens=64, num_gpu_blocks_override=22, disable_log_stats=False
    ) as small:
        small.generate([{"prompt_token_ids": short[0]}], _params({}, 2), use_tqdm=False)
        outs = small.generate([{"prompt_token_ids": p} for p in short], params, use_tqdm=False)
        preemptions = next(m.value for m in small.get_metrics() if m.name == "vllm:num_preemptions")
        assert engine_kv_state(small)["num_requests"] == 0
    assert preemptions > 0, "the small pool did not force a preemption"
    assert all(o.num_cached_tokens >= BLOCK for o in outs)
    for i, (o, w) in enumerate(zip(outs, want)):
        got, ref = list(o.outputs[0].token_ids), list(w.outputs[0].token_ids)
        assert got == ref, (i, first_divergence(got, ref))
