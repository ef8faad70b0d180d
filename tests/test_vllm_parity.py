"""The main acceptance test: vLLM with an eviction policy gives the same greedy
tokens as the transformers reference of the same policy and settings
(float32, embedded model), for eight prompts of different lengths submitted
together, including prompts longer than the budget and generations that cross
the budget many times: every registered built-in policy, two budgets, the
three prompt modes, prompts in one scheduler chunk and in chunks of 64 tokens
(chunked prefill) mixed with other requests' decode steps, all policies in one
batch (per-request settings).

A divergence is reported with its diagnosis (`parity_diagnosis`): the first
eviction where the engine and the reference keep different tokens, and how
close the reference's two candidates were there."""

from __future__ import annotations

import pytest
import torch
from conftest import vllm_engine
from model_runners import scaled
from parity_diagnosis import diagnose, engine_kept, first_divergence, reference_kept
from vllm import SamplingParams

from tova_vllm.config import engine_settings, request_settings
from tova_vllm.reference import generate_greedy

MAX_TOKENS = scaled(48, 16)
# The prompts of the matrix (indices into `chat_prompts`, 33 to 214 tokens):
# all of them, or on V2 one that crosses the smaller budget while decoding
# and one longer than both budgets.
MATRIX_PROMPTS = scaled(range(8), (0, 6))

# Per-request settings served by one engine (engine: tova, budget 80).
MATRIX = [
    {},
    {"kv_budget": 40},
    {"kv_policy": "window", "kv_budget": 40},
    {"kv_policy": "sink", "kv_budget": 40},
    {"kv_policy": "h2o", "kv_budget": 40},
    {"kv_policy": "h2o"},
    {"kv_policy": "keydiff", "kv_budget": 40},
    {"kv_budget": 40, "kv_prompt_mode": "chunked", "kv_prompt_chunk": 16},
    {"kv_policy": "h2o", "kv_budget": 40, "kv_prompt_mode": "chunked", "kv_prompt_chunk": 24},
    {"kv_budget": 40, "kv_prompt_mode": "stream"},
]
ENGINE = {"kv_policy": "tova", "kv_budget": 80}


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


@pytest.fixture(scope="module")
def reference_tokens(hf_model):
    """The reference's greedy tokens for a prompt and settings, each prompt alone."""
    cache = {}

    def get(settings, prompt: list[int]) -> list[int]:
        key = (settings, tuple(prompt))
        if key not in cache:
            with torch.no_grad():
                cache[key] = generate_greedy(hf_model, [prompt], settings, MAX_TOKENS)[0]
        return cache[key]

    return get


def _check(llm, hf_model, prompt_ids, got, settings_list, reference_tokens):
    report = {}
    for i, settings in enumerate(settings_list):
        for j, prompt in enumerate(prompt_ids):
            g, want = got[i * len(prompt_ids) + j], reference_tokens(settings, prompt)
            if g != want:
                where = f"{settings.describe()} / prompt of {len(prompt)} tokens"
                report[where] = diagnose(llm, hf_model, prompt, settings, g, want)
    assert not report, "engine and reference differ:\n" + "\n".join(f"- {k}: {v}" for k, v in report.items())


@pytest.fixture(scope="module")
def chunked_prefill_engine(model_path):
    """In-process engine core: its steps run when LLMEngine.step() is called,
    so a diagnosis reads the workers' state after every step."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        with vllm_engine(model_path, **ENGINE, max_num_batched_tokens=64) as llm:
            mp.undo()
            yield llm
    finally:
        mp.undo()


@pytest.mark.runner_v2
def test_greedy_tokens_match_the_reference(hf_model, prompt_ids, reference_tokens, chunked_prefill_engine):
    """Every setting of the matrix in one batch, prompts prefilled in 64-token
    steps beside other requests' decode steps."""
    _run_matrix(chunked_prefill_engine, MATRIX, hf_model, prompt_ids, reference_tokens)


def _run_matrix(llm, matrix, hf_model, prompt_ids, reference_tokens):
    prompt_ids = [prompt_ids[i] for i in MATRIX_PROMPTS]
    lengths = [len(p) for p in prompt_ids]
    assert any(n > 80 for n in lengths) and any(n + MAX_TOKENS > 40 >= n for n in lengths)
    engine = engine_settings(ENGINE)
    settings_list = [request_settings(engine, extra) for extra in matrix]
    prompts, params = [], []
    for extra in matrix:
        for p in prompt_ids:
            prompts.append({"prompt_token_ids": p})
            params.append(SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, extra_args=extra or None))
    outs = llm.generate(prompts, params, use_tqdm=False)
    got = [list(o.outputs[0].token_ids) for o in outs]
    _check(llm, hf_model, prompt_ids, got, settings_list, reference_tokens)
    # The settings really differ (else matching would prove little).
    longest = [tuple(got[i * len(prompt_ids) + len(prompt_ids) - 1]) for i in range(len(matrix))]
    assert len(set(longest)) > len(matrix) // 2, "most settings must give different tokens on the longest prompt"
    assert first_divergence(longest[0], longest[1]) is not None


@pytest.mark.runner_v2
@pytest.mark.parametrize(
    "extra",
    [{"kv_budget": 40}, {"kv_policy": "h2o", "kv_budget": 40}, {"kv_budget": 40, "kv_prompt_mode": "chunked", "kv_prompt_chunk": 16}],
    ids=["tova", "h2o", "tova-chunked"],
)
def test_kept_positions_equal_the_reference_at_every_step(extra, chunked_prefill_engine, hf_model, prompt_ids):
    """Not just the tokens: after the prompt and after every decode step, every
    layer (and KV head) keeps the same positions as the reference. This also
    checks what a parity failure's diagnosis reads (`tova_vllm.inspect`)."""
    settings = request_settings(engine_settings(ENGINE), extra)
    prompt = prompt_ids[6]  # 132 tokens: the prompt is reduced, then every step evicts
    steps = 12
    eng = engine_kept(chunked_prefill_engine, prompt, settings, steps)
    assert sorted(eng) == list(range(len(prompt), len(prompt) + steps))
    tokens = generate_greedy(hf_model, [prompt], settings, steps)[0]
    ref = reference_kept(hf_model, prompt, settings, tokens[: steps - 1])
    for n in sorted(eng):
        layers = ref[n][0]
        assert len(eng[n]) == len(layers) == hf_model.config.num_hidden_layers
        for li, (e, r) in enumerate(zip(eng[n], layers)):
            assert e == r, (n, li)
            assert all(len(h) == min(n, settings.budget) for h in e)
    # The diagnosis names the first token where two runs differ (here made up).
    fake = list(tokens)
    fake[5] += 1
    message = diagnose(chunked_prefill_engine, hf_model, prompt, settings, tokens, fake)
    assert message.startswith("first divergent token at index 5") and "every layer kept the same positions" in message


def test_one_scheduler_chunk_matches_the_reference(model_path, hf_model, prompt_ids, reference_tokens):
    """Prompts in one scheduler step each, in vLLM's default multiprocess
    engine. Last in this module: tearing a multiprocess engine down resets
    this process's distributed state, which the in-process engine uses."""
    with vllm_engine(model_path, **ENGINE) as llm:
        _run_matrix(llm, MATRIX[:2], hf_model, prompt_ids, reference_tokens)
