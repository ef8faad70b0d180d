"""The main acceptance test: vLLM + TOVA gives the same greedy tokens as the
transformers reference of the same policy (float32, embedded model), for eight
prompts of different lengths submitted together, including prompts longer than
the budget and generations that cross the budget many times, at two budgets."""

from __future__ import annotations

import pytest
import torch
from conftest import vllm_engine
from vllm import SamplingParams

from tova_vllm.policies import PolicyConfig
from tova_vllm.reference import generate_greedy

MAX_TOKENS = 48
BUDGETS = (40, 80)


@pytest.fixture(scope="module")
def hf_model(model_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids(model_path, chat_prompts) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    return [tok(p, add_special_tokens=False).input_ids for p in chat_prompts]


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@pytest.fixture(scope="module")
def reference_tokens(hf_model, prompt_ids):
    """The transformers reference's greedy tokens per budget, each prompt alone."""
    cache: dict[tuple[str, int], list[list[int]]] = {}

    def get(budget: int, name: str = "tova") -> list[list[int]]:
        if (name, budget) not in cache:
            policy = PolicyConfig(name, budget)
            with torch.no_grad():
                cache[name, budget] = [generate_greedy(hf_model, [p], policy, MAX_TOKENS)[0] for p in prompt_ids]
        return cache[name, budget]

    return get


@pytest.mark.parametrize(
    "budget,engine_kwargs",
    [
        (BUDGETS[0], {}),
        (BUDGETS[1], {}),
        # Chunked prefill: 64 tokens per step, so long prompts are prefilled in
        # several chunks while other requests decode in the same steps.
        (BUDGETS[0], {"max_num_batched_tokens": 64}),
    ],
    ids=["budget40", "budget80", "budget40-chunked-prefill"],
)
def test_greedy_tokens_match_the_reference(budget, engine_kwargs, model_path, prompt_ids, reference_tokens):
    lengths = [len(p) for p in prompt_ids]
    assert any(n > budget for n in lengths) and any(n + MAX_TOKENS > budget >= n for n in lengths)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with vllm_engine(model_path, kv_policy="tova", kv_budget=budget, **engine_kwargs) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
    got = [list(o.outputs[0].token_ids) for o in outs]
    want = reference_tokens(budget)
    report = {
        n: _first_divergence(g, w) for n, g, w in zip(lengths, got, want) if g != w
    }
    assert not report, f"first divergent token per prompt length: {report}"


# The paper's baselines, each with its own transformers reference. One engine
# (engine policy h2o at budget 80, chunked prefill) serves them all at once:
# the other policies and the smaller budget come per request (extra_args, the
# vllm_xargs of the OpenAI API), so the batch mixes policies and budgets.
BASELINES = [("window", 40), ("sink", 40), ("h2o", 40), ("h2o", 80)]


def test_baselines_match_their_reference(model_path, prompt_ids, reference_tokens):
    lengths = [len(p) for p in prompt_ids]
    prompts, params = [], []
    for name, budget in BASELINES:
        extra = None if (name, budget) == ("h2o", 80) else {"kv_policy": name, "kv_budget": budget}
        for p in prompt_ids:
            prompts.append({"prompt_token_ids": p})
            params.append(
                SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, extra_args=extra)
            )
    with vllm_engine(model_path, kv_policy="h2o", kv_budget=80, max_num_batched_tokens=64) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
    got = [list(o.outputs[0].token_ids) for o in outs]
    report = {}
    for i, (name, budget) in enumerate(BASELINES):
        want = reference_tokens(budget, name)
        mine = got[i * len(prompt_ids) : (i + 1) * len(prompt_ids)]
        for n, g, w in zip(lengths, mine, want):
            if g != w:
                report[f"{name}{budget}/len{n}"] = _first_divergence(g, w)
    assert not report, f"first divergent token per policy/prompt length: {report}"
    # The policies really differ (else matching would prove little).
    firsts = {tuple(got[i * len(prompt_ids) + 7]) for i in range(len(BASELINES))}
    assert len(firsts) > 1
