"""Soak and fault test of a real `vllm serve --kv-policy tova` on loopback.

210 completion requests from 16 concurrent `openai.AsyncOpenAI` clients, each
request one of 16 (prompt, max_tokens) shapes drawn at random (seeded), half of
them streamed; 10% of the requests are clients that drop the connection after
the second streamed chunk. Bounded: the whole run is cancelled after
SOAK_TIMEOUT_S and every request has its own timeout. Afterwards the server
answers /health, holds no request (vLLM's running/waiting gauges), its KV
block pool is back to the idle free-block count and no request holds TOVA
blocks (tova_vllm:* gauges), the per-policy counters counted every request,
and every completed greedy response equals the same shape sent alone.

The worker keeps no per-request TOVA state by design (tova_vllm.backend: all
it uses is a function of positions, prompt lengths and the block table), and
vLLM's model runner drops its own per-request state when the scheduler, which
here holds none, reports the requests finished.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from serve_helpers import running_server, sample, sample_or_zero

BUDGET = 32
CLIENTS = 16
REQUESTS = 210
DROP_EVERY = 10  # every 10th request slot is a client that disconnects
DROP_MAX_TOKENS = 400  # long enough to still be running when the client drops
SOAK_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 120

_SENTENCES = [
    "The river bends past the old mill.",
    "Bread rises slowly in a cold kitchen, so bakers start before dawn.",
    "A lighthouse keeper writes the weather in a book every evening, noting the wind, "
    "the clouds and the ships that pass.",
    "Mountains shape the rain: the western slopes are green and wet, while the eastern "
    "valleys stay dry for most of the year, and farmers there dig long channels to bring "
    "water down from the snow.",
]
_MAX_TOKENS = [4, 8, 12, 16, 20, 24]


def _shapes() -> list[tuple[str, int]]:
    """16 distinct (prompt, max_tokens): prompts of about 8 to 45 tokens,
    outputs of 4 to 24 tokens, so some requests stay under the budget, some
    cross it while decoding and some start above it."""
    rng = random.Random(1)
    shapes: set[tuple[str, int]] = set()
    while len(shapes) < 16:
        k = rng.randint(1, 3)
        prompt = " ".join(rng.sample(_SENTENCES, k))
        shapes.add((prompt, rng.choice(_MAX_TOKENS)))
    return sorted(shapes)


SHAPES = _shapes()


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("soak") / "server.log"
    with running_server(
        model_path, log, "--kv-policy", "tova", "--kv-budget", str(BUDGET), "--max-num-seqs", "16"
    ) as srv:
        yield srv


async def _complete(client, model: str, shape: int, stream: bool, drop: bool) -> dict:
    prompt, max_tokens = SHAPES[shape]
    kwargs = dict(
        model=model,
        prompt=prompt,
        max_tokens=DROP_MAX_TOKENS if drop else max_tokens,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    if not stream:
        resp = await client.completions.create(**kwargs)
        return {"shape": shape, "text": resp.choices[0].text, "tokens": resp.usage.completion_tokens}
    s = await client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    pieces, tokens, chunks = [], None, 0
    async for chunk in s:
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            chunks += 1
            if drop and chunks == 2:
                await s.close()  # the client goes away mid-stream
                return {"shape": shape, "dropped": True}
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"shape": shape, "text": "".join(pieces), "tokens": tokens}


async def _soak(server) -> list[dict]:
    rng = random.Random(0)
    plan = [
        (rng.randrange(len(SHAPES)), rng.random() < 0.5, i % DROP_EVERY == DROP_EVERY - 1)
        for i in range(REQUESTS)
    ]
    queue: asyncio.Queue = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    results: list[dict] = []

    async def client_loop() -> None:
        async with server.async_client(timeout=REQUEST_TIMEOUT_S) as client:
            while not queue.empty():
                shape, stream, drop = queue.get_nowait()
                results.append(await _complete(client, server.model, shape, stream or drop, drop))

    await asyncio.wait_for(asyncio.gather(*(client_loop() for _ in range(CLIENTS))), SOAK_TIMEOUT_S)
    return results


def _idle_metrics(server, timeout: float = 60) -> str:
    """/metrics once the engine holds no request (aborts land asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        text = server.metrics()
        busy = sample(text, "vllm:num_requests_running") + sample(text, "vllm:num_requests_waiting")
        if busy == 0 and sample(text, "tova_vllm:kv_cache_requests") == 0:
            return text
        assert time.monotonic() < deadline, f"requests still held after {timeout} s"
        time.sleep(1)


def test_soak_with_disconnects(server):
    before = _idle_metrics(server)
    idle_free = sample(before, "tova_vllm:kv_cache_free_blocks")
    assert idle_free == sample(before, "tova_vllm:kv_cache_blocks") - 1  # all but vLLM's null block

    started = time.monotonic()
    results = asyncio.run(_soak(server))
    soak_s = time.monotonic() - started

    dropped = [r for r in results if r.get("dropped")]
    completed = [r for r in results if not r.get("dropped")]
    assert len(results) == REQUESTS
    assert len(dropped) == REQUESTS // DROP_EVERY

    # Healthy, and nothing left behind.
    assert server.get("/health")[0] == 200
    after = _idle_metrics(server)
    assert sample(after, "tova_vllm:kv_cache_free_blocks") == idle_free
    assert sample(after, "vllm:kv_cache_usage_perc") == 0
    assert sample(after, "tova_vllm:kv_cache_requests") == 0

    # The engine counted every request, dropped ones included (as aborted).
    def delta(name: str) -> float:
        return sample_or_zero(after, name, policy="tova") - sample_or_zero(before, name, policy="tova")

    assert delta("tova_vllm:requests_total") == REQUESTS
    assert delta("tova_vllm:tokens_evicted_total") > 0
    assert 0 < delta("tova_vllm:kv_blocks_held_total") < delta("tova_vllm:kv_blocks_without_eviction_total")
    # The dropped requests asked for DROP_MAX_TOKENS, far more than any client
    # waited for: none of them ran to its length, so the server aborted them all.
    finished = {
        reason: sample_or_zero(after, "vllm:request_success_total", finished_reason=reason)
        - sample_or_zero(before, "vllm:request_success_total", finished_reason=reason)
        for reason in ("length", "stop", "abort", "error")
    }
    assert finished["length"] == len(completed), finished
    assert finished["stop"] == finished["error"] == 0, finished

    # Every completed greedy response equals the same shape sent alone.
    client = server.client()
    solo = {}
    for shape in sorted({r["shape"] for r in completed}):
        prompt, max_tokens = SHAPES[shape]
        resp = client.completions.create(
            model=server.model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, extra_body={"ignore_eos": True}
        )
        solo[shape] = resp.choices[0].text
    mismatches = [(r["shape"], r["text"], solo[r["shape"]]) for r in completed if r["text"] != solo[r["shape"]]]
    short = [r for r in completed if r["tokens"] != SHAPES[r["shape"]][1]]
    print(
        f"\nsoak: {REQUESTS} requests ({len(dropped)} dropped mid-stream and aborted) from {CLIENTS} "
        f"clients in {soak_s:.1f} s; {len(solo)} shapes checked against solo runs"
    )
    assert not short, short[:3]
    assert not mismatches, mismatches[:3]
