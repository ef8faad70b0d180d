"""Nothing leaks: finished, aborted and preempted requests return their blocks;
a request's blocks are capped at ceil((budget + 1) / block_size) once its
prompt is processed; a preempted request yields the same tokens."""

from __future__ import annotations

import pytest
from conftest import vllm_engine
from vllm import SamplingParams

from tova_vllm.inspect import blocks_at_release, engine_kv_state

BUDGET = 100
BLOCK = 16  # tova-vllm's default block size with a policy
CAP_BLOCKS = -(-(BUDGET + 1) // BLOCK)


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
        slots = min(n_prompt + 30 - 1, BUDGET + 1)
        assert blocks_at_release(llm, out.request_id) == -(-slots // BLOCK), out.request_id
    assert long_prompt_seen, "the prompts must include some longer than the budget"


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


def test_no_per_request_worker_state_remains(llm, chat_prompts):
    llm.generate(_ids(llm.get_tokenizer(), chat_prompts[:3]), SamplingParams(max_tokens=5), use_tqdm=False)

    def worker_state(worker):
        runner = worker.model_runner
        return len(runner.requests), runner.input_batch.num_reqs

    assert llm.collective_rpc(worker_state) == [(0, 0)]


def _num_preemptions(llm) -> float:
    for metric in llm.get_metrics():
        if metric.name == "vllm:num_preemptions":
            return metric.value
    raise AssertionError("vllm:num_preemptions metric not found")


def test_preempted_requests_yield_the_same_tokens_and_return_blocks(model_path, chat_prompts, llm):
    """A pool too small for every request's cap forces preemption (recompute)."""
    tok = llm.get_tokenizer()
    # Five prompts of 33 to 48 tokens (3 blocks each), growing past the budget.
    prompts = _ids(tok, chat_prompts[:5])
    params = SamplingParams(temperature=0.0, max_tokens=70, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    # Three requests fit at admission, then they grow towards their cap and
    # the scheduler must preempt.
    num_blocks = 10
    with vllm_engine(
        model_path, kv_policy="tova", kv_budget=BUDGET, num_gpu_blocks_override=num_blocks, disable_log_stats=False
    ) as small:
        free0 = _idle(small)["num_free_blocks"]
        got = [o.outputs[0].token_ids for o in small.generate(prompts, params, use_tqdm=False)]
        assert _num_preemptions(small) > 0, "the small pool did not force a preemption"
        assert _idle(small)["num_free_blocks"] == free0
    assert got == expected
