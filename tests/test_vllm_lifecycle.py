"""Nothing leaks: finished, aborted and preempted requests return their blocks;
a request's blocks are capped at ceil(budget / block_size) once its prompt is
processed (no scratch slot); a chunked prompt never holds more than budget +
one chunk; a preempted request yields the same tokens."""

from __future__ import annotations

import pytest
from conftest import vllm_engine
from model_runners import scaled
from vllm import SamplingParams

from tova_vllm.inspect import blocks_at_release, engine_kv_state

BUDGET = 100
BLOCK = 16  # tova-vllm's default block size with a policy
CAP_BLOCKS = -(-BUDGET // BLOCK)


def _ids(tokenizer, prompts):
    return [{"prompt_token_ids": tokenizer(p, add_special_tokens=False).input_ids} for p in prompts]


@pytest.fixture(scope="module")
def llm(model_path):
    with vllm_engine(model_path, kv_policy="tova", kv_budget=BUDGET, disable_log_stats=False) as llm:
        yield llm


def _idle(llm) -> dict:
    state = engine_kv_state(llm)
    assert state["num_requests"] == 0
    assert state["blocks_per_running_request"] == {}
    return state


@pytest.mark.runner_v2
def test_block_size_pool_and_concurrency(llm):
    state = _idle(llm)
    assert state["policy_groups"] == 1
    assert llm.llm_engine.vllm_config.cache_config.block_size == BLOCK
    # The startup check and the logged concurrency count a request as its cap,
    # not max_model_len: about max_model_len / budget times what the same
    # blocks give stock vLLM (which needs ceil(max_model_len / block) blocks).
    max_model_len = llm.llm_engine.vllm_config.model_config.max_model_len
    assert state["max_concurrency"] == pytest.approx(state["num_blocks"] / CAP_BLOCKS)
    stock_concurrency = state["num_blocks"] / -(-max_model_len // BLOCK)
    ratio = state["max_concurrency"] / stock_concurrency
    assert ratio >= 0.85 * max_model_len / BUDGET, ratio


def test_finished_requests_return_blocks_and_hold_the_cap(llm, chat_prompts):
    free0 = _idle(llm)["num_free_blocks"]
    tok = llm.get_tokenizer()
    prompts = _ids(tok, chat_prompts)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert _idle(llm)["num_free_blocks"] == free0
    long_prompt_seen = False
    for out in outs:
        n_prompt = len(out.prompt_token_ids)
        long_prompt_seen |= n_prompt > BUDGET
        slots = min(n_prompt + 30 - 1, BUDGET)
        assert blocks_at_release(llm, out.request_id) == -(-slots // BLOCK), out.request_id
    assert long_prompt_seen, "the prompts must include some longer than the budget"


@pytest.mark.runner_v2
def test_aborted_requests_return_blocks(llm, chat_prompts):
    free0 = _idle(llm)["num_free_blocks"]
    engine = llm.llm_engine
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    ids = [f"abort-{i}" for i in range(4)]
    for rid, prompt in zip(ids, _ids(tok, chat_prompts[-4:])):
        engine.add_request(rid, prompt, params)
    for _ in range(8):
        engine.step()
    running = engine_kv_state(llm)["blocks_per_running_request"]
    assert len(running) == 4 and all(0 < b for b in running.values())
    # Some requests have prompts longer than the budget: by now they are capped.
    assert max(running.values()) == CAP_BLOCKS
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    assert _idle(llm)["num_free_blocks"] == free0


@pytest.mark.runner_v2
def test_no_per_request_worker_state_remains(llm, chat_prompts):
    llm.generate(_ids(llm.get_tokenizer(), chat_prompts[:3]), SamplingParams(max_tokens=5), use_tqdm=False)

    def worker_state(worker):
        from tova_vllm.patch.model_runner import adapter_of

        return adapter_of(worker.model_runner).live_request_ids()

    assert llm.collective_rpc(worker_state) == [[]]


def _num_preemptions(llm) -> float:
    for metric in llm.get_metrics():
        if metric.name == "vllm:num_preemptions":
            return metric.value
    raise AssertionError("vllm:num_preemptions metric not found")


@pytest.mark.runner_v2
def test_preempted_requests_yield_the_same_tokens_and_return_blocks(model_path, chat_prompts, llm):
    """A pool too small for every request's cap forces preemption (recompute)."""
    tok = llm.get_tokenizer()
    # Six prompts of 33 to 83 tokens, growing past the budget; every
    # policy (per request) and the chunked prompt mode, so every policy's
    # recompute is checked.
    prompts = _ids(tok, chat_prompts[:6])
    params = [
        SamplingParams(temperature=0.0, max_tokens=scaled(70, 24), ignore_eos=True, extra_args=extra)
        for extra in (None, {"kv_policy": "h2o"}, {"kv_policy": "window"}, {"kv_policy": "sink"},
                      {"kv_policy": "keydiff", "kv_budget": 60},
                      {"kv_budget": 40, "kv_prompt_mode": "chunked", "kv_prompt_chunk": 16})
    ]
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    # A few requests fit at admission, then they grow towards their cap and
    # the scheduler must preempt (on V2, fewer tokens: a smaller pool, still
    # one request's cap).
    num_blocks = scaled(12, CAP_BLOCKS + 1)
    with vllm_engine(
        model_path, kv_policy="tova", kv_budget=BUDGET, num_gpu_blocks_override=num_blocks, disable_log_stats=False
    ) as small:
        free0 = _idle(small)["num_free_blocks"]
        got = [o.outputs[0].token_ids for o in small.generate(prompts, params, use_tqdm=False)]
        assert _num_preemptions(small) > 0, "the small pool did not force a preemption"
        assert _idle(small)["num_free_blocks"] == free0
        # A request that could never fit is refused (it would wait for ever),
        # naming the way out; the same prompt in chunks is served.
        from vllm.exceptions import VLLMValidationError

        longest = _ids(tok, chat_prompts[-1:])  # 214 tokens: 14 blocks + its kept region
        with pytest.raises(VLLMValidationError, match="kv_prompt_mode='chunked'") as info:
            small.generate(longest, SamplingParams(max_tokens=4), use_tqdm=False)
        assert info.value.parameter == "prompt"
        # (kv_budget + kv_prompt_chunk: 6 blocks, within the V2 pool's 7)
        chunked = SamplingParams(
            max_tokens=4, extra_args={"kv_prompt_mode": "chunked", "kv_prompt_chunk": 16, "kv_budget": 80}
        )
        assert len(small.generate(longest, chunked, use_tqdm=False)[0].outputs[0].token_ids) == 4
    assert got == expected


def test_per_request_policy_and_budget_cap_blocks_and_count(llm, chat_prompts):
    """A request's own (smaller) budget caps its blocks; the per-policy
    counters count finished requests, evicted tokens and blocks."""
    tok = llm.get_tokenizer()
    before = engine_kv_state(llm)["stats"]
    prompts = _ids(tok, chat_prompts[-3:])  # 83, 132 and 214 tokens
    budget = 40
    params = SamplingParams(
        temperature=0.0, max_tokens=12, ignore_eos=True, extra_args={"kv_policy": "window", "kv_budget": budget}
    )
    outs = llm.generate(prompts, params, use_tqdm=False)
    after = _idle(llm)["stats"]
    for out in outs:
        assert blocks_at_release(llm, out.request_id) == -(-budget // BLOCK)
    old = before.get("window", dict.fromkeys(("requests", "tokens_evicted", "blocks_held", "blocks_without_eviction"), 0))
    new = after["window"]
    computed = [len(o.prompt_token_ids) + 12 - 1 for o in outs]
    assert new["requests"] - old["requests"] == 3
    assert new["tokens_evicted"] - old["tokens_evicted"] == sum(n - budget for n in computed)
    assert new["blocks_held"] - old["blocks_held"] == 3 * -(-budget // BLOCK)
    assert new["blocks_without_eviction"] - old["blocks_without_eviction"] == sum(-(-n // BLOCK) for n in computed)


def test_streamed_prompt_never_holds_more_than_its_cap(llm, chat_prompts):
    """kv_prompt_mode=stream: every prompt token is evicted for as it comes,
    so even a long prompt's request never holds more than its cap."""
    engine = llm.llm_engine
    prompt = _ids(llm.get_tokenizer(), chat_prompts[-1:])[0]  # 214 tokens
    budget = 30
    params = SamplingParams(
        max_tokens=4, prompt_logprobs=0, extra_args={"kv_budget": budget, "kv_prompt_mode": "stream"}
    )
    engine.add_request("stream-0", prompt, params)
    peak = 0
    while engine.has_unfinished_requests():
        engine.step()
        peak = max(peak, *engine_kv_state(llm)["blocks_per_running_request"].values(), 0)
    assert 0 < peak <= -(-budget // BLOCK)
    _idle(llm)


def test_chunked_prompt_never_holds_more_than_budget_plus_a_chunk(llm, chat_prompts):
    """kv_prompt_mode=chunked: after each chunk of kv_prompt_chunk tokens the
    cache is reduced to the budget, so a long prompt's request never holds
    more than budget + chunk slots (a bulk prompt holds all of them), and it
    ends at its cap."""
    prompt = _ids(llm.get_tokenizer(), chat_prompts[-1:])[0]  # 214 tokens
    budget, chunk = 32, 24
    peaks = {}
    for mode in ("chunked", "bulk"):
        extra = {"kv_budget": budget, "kv_prompt_mode": mode}
        if mode == "chunked":
            extra["kv_prompt_chunk"] = chunk
        out = llm.generate([prompt], SamplingParams(max_tokens=6, extra_args=extra), use_tqdm=False)[0]
        peaks[mode] = blocks_at_release(llm, out.request_id, peak=True)
        assert blocks_at_release(llm, out.request_id) == -(-budget // BLOCK)
    assert peaks["chunked"] == -(-(budget + chunk) // BLOCK), peaks
    # A bulk prompt holds all its tokens; with prefix caching (on here, vLLM's
    # default) its prompt region and its kept region, for the prompt's last step.
    assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    region = -(-len(prompt["prompt_token_ids"]) // BLOCK)
    assert peaks["bulk"] == region + -(-budget // BLOCK), peaks
    _idle(llm)


@pytest.mark.parametrize(
    "extra,field",
    [
        ({"kv_budget": BUDGET + 1}, "vllm_xargs.kv_budget"),
        ({"kv_budget": 0}, "vllm_xargs.kv_budget"),
        ({"kv_policy": "lru"}, "vllm_xargs.kv_policy"),
        ({"kv_policy": "tova", "kv_num_sinks": 2}, "vllm_xargs.kv_num_sinks"),
        ({"kv_policy": "h2o", "kv_h2o_recent_ratio": 1.5}, "vllm_xargs.kv_h2o_recent_ratio"),
        ({"kv_prompt_mode": "lazy"}, "vllm_xargs.kv_prompt_mode"),
        ({"kv_budgett": 32}, "vllm_xargs.kv_budgett"),
        ({"kv_budget": True}, "vllm_xargs.kv_budget"),
        ({"kv_prompt_chunk": 8}, "vllm_xargs.kv_prompt_chunk"),
    ],
)
def test_bad_per_request_settings_are_refused_and_the_engine_keeps_serving(llm, extra, field):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=field.replace(".", r"\.")) as info:
        llm.generate(["Hello"], SamplingParams(max_tokens=2, extra_args=extra), use_tqdm=False)
    assert info.value.parameter == field
    out = llm.generate(["Hello"], SamplingParams(max_tokens=2), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2
    _idle(llm)
