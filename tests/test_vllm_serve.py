"""A real OpenAI-compatible vLLM server with --kv-policy tova --kv-budget 48,
queried with the `openai` client: completions and chat completions that
outgrow the budget, streaming, n > 1, stop strings, logprobs, concurrent
clients, determinism, per-request budgets and policies (``vllm_xargs``: good
ones run, bad ones get HTTP 400 naming the field while other requests carry
on), the tova_vllm:* metrics on /metrics; its help text and startup log; a
clean shutdown. One server for the module (an engine start costs 30-90 s here).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from model_runners import scaled, v2_requested
from serve_helpers import (
    VLLM_CLI,
    free_port,
    running_server,
    sample,
    sample_or_zero,
    samples,
    session_processes,
)

from tova_vllm.config import setting_help, settings_keys
from tova_vllm.policies import policy_names

ENGINE_POLICIES = policy_names()

BUDGET = 48
BLOCK_SIZE = 16  # the plugin's default with a policy
STARTUP_LINE = (
    f"tova-vllm: KV eviction policy 'tova' with a budget of {BUDGET} tokens per layer per sequence, bulk prompts."
)
MAX_TOKENS = 40

PROMPT = (
    "The history of the lighthouse begins in the ancient world. The Pharos of "
    "Alexandria, built in the third century BC, guided ships into the harbour for "
    "centuries. Later lighthouses"
)


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with running_server(model_path, log, "--kv-policy", "tova", "--kv-budget", str(BUDGET)) as srv:
        yield srv


# ---------------------------------------------------------------------------


def test_help_lists_the_policy_flags(model_path):
    """`--help=all` (vLLM's help is grouped; plain --help lists the groups)."""
    out = subprocess.run(
        [VLLM_CLI, "serve", "--help=all"],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "KV-cache eviction (tova-vllm)" in text
    squashed = "".join(text.split())  # argparse wraps lines (and may break at hyphens)
    for key in settings_keys():  # every setting of the registry, with its help
        assert "--" + key.replace("_", "-") in text, key
        assert "".join(setting_help(key).split()) in squashed, key


@pytest.mark.runner_v2
def test_startup_line_is_logged_once(server):
    log = server.log.read_text(errors="replace")
    lines = [line for line in log.splitlines() if STARTUP_LINE in line]
    assert len(lines) == 1, lines
    # The server runs the model runner this session asked for.
    assert ("Using V2 Model Runner" in log) == v2_requested()


def _total(usage) -> int:
    return usage.prompt_tokens + usage.completion_tokens


@pytest.mark.runner_v2
def test_completion_crosses_the_budget(server):
    resp = server.client().completions.create(
        model=server.model,
        prompt=PROMPT,
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    text = resp.choices[0].text
    assert text.strip(), resp
    assert resp.usage.completion_tokens == MAX_TOKENS
    assert resp.usage.prompt_tokens < BUDGET < _total(resp.usage)


@pytest.mark.runner_v2
def test_chat_completion_crosses_the_budget(server):
    resp = server.client().chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Tell me a short story about a lighthouse keeper and a storm."}],
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    content = resp.choices[0].message.content
    assert content and content.strip(), resp
    assert resp.usage.completion_tokens == MAX_TOKENS
    assert resp.usage.prompt_tokens < BUDGET < _total(resp.usage)


def test_streaming_equals_the_whole_response(server):
    client = server.client()
    whole = client.completions.create(
        model=server.model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0.0, extra_body={"ignore_eos": True}
    )
    pieces, usage = [], None
    stream = client.completions.create(
        model=server.model,
        prompt=PROMPT,
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
        if chunk.usage is not None:
            usage = chunk.usage
    assert len([p for p in pieces if p]) > 1, "the response came in one piece"
    assert "".join(pieces) == whole.choices[0].text
    assert usage is not None and usage.completion_tokens == MAX_TOKENS and _total(usage) > BUDGET


def test_chat_streaming(server):
    stream = server.client().chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "List five animals that live in the sea and describe each one."}],
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces).strip()


def _info_label(text: str, name: str, label: str) -> int:
    match = re.search(name + r"\{[^}]*\b" + label + r'="(\d+)"', text)
    assert match, (name, label)
    return int(match.group(1))


def test_a_growing_request_keeps_at_most_the_budget(server):
    """Black-box: while one request streams far past the budget, the server's
    own metrics show its KV cache holding fewer slots than its tokens, and no
    more blocks than budget slots need."""
    text = server.metrics()
    num_blocks = _info_label(text, "vllm:cache_config_info", "num_gpu_blocks")
    block_size = _info_label(text, "vllm:cache_config_info", "block_size")
    cap = -(-BUDGET // block_size)
    stream = server.client().completions.create(
        model=server.model,
        prompt=PROMPT,
        max_tokens=240,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks, samples, usage = 0, [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        chunks += 1  # a chunk carries at least one token
        if chunks in (60, 120):
            text = server.metrics()
            assert sample(text, "vllm:num_requests_running") == 1
            # vLLM's usage is the share of the pool (less its null block) in use.
            used = round(sample(text, "vllm:kv_cache_usage_perc") * (num_blocks - 1))
            samples.append((chunks, used))
    assert usage is not None and usage.completion_tokens == 240
    assert len(samples) == 2
    for tokens_streamed, used in samples:
        assert 0 < used <= cap, samples
        assert used * block_size < usage.prompt_tokens + tokens_streamed, samples


def test_identical_greedy_requests_give_identical_text(server):
    client = server.client()
    prompt = PROMPT + " were built of stone and lit with oil lamps, and"
    texts = [
        client.completions.create(
            model=server.model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0, extra_body={"ignore_eos": True}
        ).choices[0].text
        for _ in range(2)
    ]
    assert texts[0].strip()
    assert texts[0] == texts[1]


def _complete(server, prompt=PROMPT, max_tokens=MAX_TOKENS, **extra):
    return server.client().completions.create(
        model=server.model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=extra.pop("temperature", 0.0),
        extra_body={"ignore_eos": True, **extra.pop("extra_body", {})},
        **extra,
    )


def test_n_samples(server):
    resp = _complete(server, max_tokens=24, n=3, temperature=1.0, seed=7)
    assert sorted(c.index for c in resp.choices) == [0, 1, 2]
    assert all(c.text.strip() for c in resp.choices), resp
    assert resp.usage.completion_tokens == 3 * 24
    assert resp.usage.prompt_tokens + 24 > BUDGET
    assert len({c.text for c in resp.choices}) > 1, "three samples at temperature 1 came out identical"


def test_stop_string_cuts_the_greedy_text(server):
    whole = _complete(server).choices[0].text
    stop = next(w for w in re.findall(r"[A-Za-z]{4,}", whole) if whole.index(w) >= 20)
    resp = _complete(server, stop=[stop])
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].text == whole[: whole.index(stop)]


def test_logprobs(server):
    resp = _complete(server, max_tokens=24, logprobs=3)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 24
    assert resp.usage.prompt_tokens + 24 > BUDGET
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and len(top) >= 3
        assert chosen == pytest.approx(max(top.values()), abs=1e-4)  # greedy takes the top token
    chat = server.client().chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Describe a harbour at dawn in three sentences."}],
        max_tokens=24,
        temperature=0.0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 24
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_concurrent_clients_get_their_sequential_answers(server):
    prompts = [PROMPT, PROMPT + " were", "Once upon a time, in a small village by the sea,"]
    alone = [_complete(server, p).choices[0].text for p in prompts]
    jobs = [prompts[i % len(prompts)] for i in range(6)]
    with ThreadPoolExecutor(len(jobs)) as pool:  # one client (connection pool) per thread
        together = list(pool.map(lambda p: _complete(server, p).choices[0].text, jobs))
    assert together == [alone[i % len(prompts)] for i in range(6)]


def _policy_delta(before: str, after: str, policy: str) -> dict[str, float]:
    names = ("requests", "tokens_evicted", "kv_blocks_held", "kv_blocks_without_eviction")
    return {
        n: sample_or_zero(after, f"tova_vllm:{n}_total", policy=policy)
        - sample_or_zero(before, f"tova_vllm:{n}_total", policy=policy)
        for n in names
    }


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def test_request_budget_caps_its_blocks(server):
    """vllm_xargs.kv_budget=16: the request holds ceil(16 / 16) = 1 block at
    the end instead of the server budget's ceil(48 / 16) = 3."""
    for budget in (16, BUDGET):
        before = server.metrics()
        resp = _complete(server, extra_body={"vllm_xargs": {"kv_budget": budget}})
        after = server.metrics()
        tokens = resp.usage.prompt_tokens + resp.usage.completion_tokens
        d = _policy_delta(before, after, "tova")
        assert d["requests"] == 1, d
        assert d["kv_blocks_held"] == _cdiv(budget, BLOCK_SIZE), (budget, d)
        # The last sampled token's KV is never computed.
        assert d["kv_blocks_without_eviction"] in {_cdiv(tokens - 1, BLOCK_SIZE), _cdiv(tokens, BLOCK_SIZE)}, d
        assert tokens - 1 - budget <= d["tokens_evicted"] <= tokens - budget, (tokens, d)


@pytest.mark.runner_v2
def test_request_policy_and_prompt_mode(server):
    """A request may run another policy (counted under its own name), stream
    its prompt through the cache or process it in chunks."""
    before = server.metrics()
    window = _complete(server, extra_body={"vllm_xargs": {"kv_policy": "window", "kv_budget": 24}})
    streamed = _complete(server, extra_body={"vllm_xargs": {"kv_prompt_mode": "stream", "kv_budget": 16}})
    chunked = _complete(
        server, extra_body={"vllm_xargs": {"kv_prompt_mode": "chunked", "kv_prompt_chunk": 8, "kv_budget": 20}}
    )
    keydiff = _complete(server, extra_body={"vllm_xargs": {"kv_policy": "keydiff", "kv_budget": 32}})
    after = server.metrics()
    for resp in (window, streamed, chunked, keydiff):
        assert resp.choices[0].text.strip()
    w = _policy_delta(before, after, "window")
    assert w["requests"] == 1 and w["kv_blocks_held"] == _cdiv(24, BLOCK_SIZE), w
    t = _policy_delta(before, after, "tova")
    assert t["requests"] == 2 and t["kv_blocks_held"] == _cdiv(16, BLOCK_SIZE) + _cdiv(20, BLOCK_SIZE), t
    k = _policy_delta(before, after, "keydiff")
    assert k["requests"] == 1 and k["kv_blocks_held"] == _cdiv(32, BLOCK_SIZE), k


BAD_XARGS = [
    ({"kv_budget": BUDGET + 1}, "kv_budget", f"[1, {BUDGET}]"),
    ({"kv_budget": 0}, "kv_budget", f"[1, {BUDGET}]"),
    ({"kv_budget": "16"}, "kv_budget", f"[1, {BUDGET}]"),
    ({"kv_policy": "lru"}, "kv_policy", ", ".join(ENGINE_POLICIES)),
    ({"kv_prompt_mode": "eager"}, "kv_prompt_mode", "bulk, chunked, stream"),
    ({"kv_policy": "tova", "kv_num_sinks": 2}, "kv_num_sinks", "sink"),
    # A misspelt key and a boolean for an integer (answered 200 before).
    ({"kv_budgett": 32}, "kv_budgett", ", ".join(settings_keys())),
    ({"kv_budget": True}, "kv_budget", f"[1, {BUDGET}]"),
]


def test_bad_request_settings_get_400_and_others_carry_on(server):
    import openai

    alone = _complete(server, max_tokens=60).choices[0].text
    first_chunk = threading.Event()
    checked = threading.Event()

    def stream_it() -> str:
        # Far more tokens than the checks below can take, whatever the load:
        # the stream is still running when the bad requests are answered, and
        # it is closed (aborted on the server) once they are.
        pieces = []
        stream = server.client().completions.create(
            model=server.model,
            prompt=PROMPT,
            max_tokens=BUDGET * 8,
            temperature=0.0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].text)
                first_chunk.set()
            if len(pieces) >= 70 and checked.is_set():
                stream.close()
                break
        return "".join(pieces)

    with ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(stream_it)
        assert first_chunk.wait(120), "the stream did not start"
        client = server.client()
        for xargs, field, allowed in BAD_XARGS:
            with pytest.raises(openai.BadRequestError) as err:
                client.completions.create(
                    model=server.model, prompt="Hello", max_tokens=4, extra_body={"vllm_xargs": xargs}
                )
            message = str(err.value)
            assert err.value.status_code == 400
            assert f"vllm_xargs.{field}" in message and allowed in message, message
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model=server.model,
                messages=[{"role": "user", "content": "Hello"}],
                max_tokens=4,
                extra_body={"vllm_xargs": {"kv_budget": 1000}},
            )
        assert err.value.status_code == 400 and "vllm_xargs.kv_budget" in str(err.value)
        assert not streaming.done(), "the stream ended before the bad requests were answered"
        checked.set()
        assert streaming.result(timeout=300).startswith(alone)
    # The closed stream was aborted and returned its blocks; the server serves on.
    assert _complete(server, max_tokens=60).choices[0].text == alone
    assert server.get("/health")[0] == 200


@pytest.mark.runner_v2
def test_metrics_expose_the_policy_counters(server):
    text = server.metrics()
    labels = {"policy": "tova", "model_name": server.model, "engine": "0"}
    for name in ("requests", "tokens_evicted", "kv_blocks_held", "kv_blocks_without_eviction"):
        assert f"# TYPE tova_vllm:{name}_total counter" in text
        assert f"# HELP tova_vllm:{name}_total " in text
    requests = sample(text, "tova_vllm:requests_total", **labels)
    evicted = sample(text, "tova_vllm:tokens_evicted_total", **labels)
    held = sample(text, "tova_vllm:kv_blocks_held_total", **labels)
    without = sample(text, "tova_vllm:kv_blocks_without_eviction_total", **labels)
    # Every earlier test of this module (on V2, those marked runner_v2) sent
    # requests past the budget.
    assert requests >= scaled(10, 4) and evicted > 0 and 0 < held < without, (requests, evicted, held, without)
    gauges = {"model_name": server.model, "engine": "0"}
    free = sample(text, "tova_vllm:kv_cache_free_blocks", **gauges)
    total = sample(text, "tova_vllm:kv_cache_blocks", **gauges)
    assert free == total - 1 == _info_label(text, "vllm:cache_config_info", "num_gpu_blocks") - 1  # idle
    assert sample(text, "tova_vllm:kv_cache_requests", **gauges) == 0
    # One series per registered policy (0 for those no request used).
    assert {lab["policy"] for lab, _ in samples(text, "tova_vllm:requests_total")} == set(ENGINE_POLICIES)


def test_no_tova_metrics_without_a_policy():
    """vLLM's own /metrics wiring (the patched attach_router) with `vllm serve`'s
    parsed arguments: no policy, nothing added; a policy, the refresh hook."""
    from fastapi import FastAPI
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.entrypoints.serve.instrumentator import metrics as vllm_metrics
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from tova_vllm import metrics, plugin

    plugin.register()
    parser = make_arg_parser(FlexibleArgumentParser())
    for argv, expect in (([], False), (["--kv-policy", "tova", "--kv-budget", "16"], True)):
        app = FastAPI()
        app.state.args = parser.parse_args(argv)
        vllm_metrics.attach_router(app)
        added = any(m.cls is metrics.RefreshBeforeScrape for m in app.user_middleware)
        assert added == expect, argv


def test_server_stops_and_leaves_no_process(server):
    family = session_processes(server.proc.pid)
    assert len(family) >= 2, "expected the API server and its engine core"
    alive = server.stop()
    assert server.proc.returncode is not None
    assert alive == [], [p.cmdline() for p in alive]
    assert session_processes(server.proc.pid) == []


# ---------------------------------------------------------------------------
# Entry points exactly as a user types them, each in a fresh process.
# (The `vllm` CLI needs tova_vllm.patch.vllm_cpu_metadata on vllm-cpu, and
# EngineArgs(kv_policy=...) right after its import needs the early hook's
# end-of-import patch.)


def test_vllm_serve_rejects_an_unknown_policy(model_path):
    out = subprocess.run(
        [VLLM_CLI, "serve", model_path, "--kv-policy", "foo", "--kv-budget", "16", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    assert out.returncode != 0
    expected = f"PolicyConfigError: kv_policy must be one of {', '.join(ENGINE_POLICIES)}; got 'foo'"
    assert expected in out.stdout + out.stderr, (
        (out.stdout + out.stderr)[-3000:]
    )


def test_engine_args_take_the_policy_right_after_import(model_path):
    code = (
        "import json, sys\n"
        "from vllm.engine.arg_utils import EngineArgs\n"
        "try:\n"
        "    EngineArgs(model=sys.argv[1], kv_policy='foo', kv_budget=16)\n"
        "except Exception as e:\n"
        "    print(json.dumps([type(e).__name__, str(e)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, model_path], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    kind, msg = json.loads(out.stdout.strip().splitlines()[-1])
    assert kind == "PolicyConfigError", msg
    assert "kv_policy" in msg and f"one of {', '.join(ENGINE_POLICIES)}" in msg
