"""A real OpenAI-compatible vLLM server with --kv-policy tova --kv-budget 48,
queried with the `openai` client: completions and chat completions that
outgrow the budget, streaming, determinism; its help text and startup log; a
clean shutdown. One server for the module (an engine start costs 30-90 s here).

The server runs through vLLM's API server entry point, which is what
`vllm serve` runs after parsing the same arguments. The `vllm` console script
itself cannot start in this environment (see the tests at the end).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from tova_vllm.config import POLICY_ARG_HELP

BUDGET = 48
# The `vllm` console script of this environment, as a user runs it.
VLLM_CLI = str(Path(sys.executable).with_name("vllm"))
STARTUP_TIMEOUT_S = 300
STARTUP_LINE = f"tova-vllm: KV eviction policy 'tova' with a budget of {BUDGET} tokens per layer per sequence."
MAX_TOKENS = 40

PROMPT = (
    "The history of the lighthouse begins in the ancient world. The Pharos of "
    "Alexandria, built in the third century BC, guided ships into the harbour for "
    "centuries. Later lighthouses"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
    return found


def _tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


@dataclasses.dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path
    model: str

    def client(self):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", timeout=180, max_retries=0)

    def stop(self, timeout: float = 90) -> list[psutil.Process]:
        """terminate, wait, kill; returns the processes of its session still alive."""
        family = _session_processes(self.proc.pid)
        with contextlib.suppress(psutil.Error):
            family += psutil.Process(self.proc.pid).children(recursive=True)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        _, alive = psutil.wait_procs(family, timeout=30)
        return [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [
        VLLM_CLI, "serve", model_path,
        "--kv-policy", "tova", "--kv-budget", str(BUDGET),
        "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
        "--port", str(port), "--host", "127.0.0.1",
    ]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
        )
    srv = Server(proc=proc, url=f"http://127.0.0.1:{port}", log=log, model=model_path)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode} while starting:\n{_tail(log)}")
            try:
                with urllib.request.urlopen(f"{srv.url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no /health after {STARTUP_TIMEOUT_S} s:\n{_tail(log)}")
            time.sleep(2)
        yield srv
    finally:
        srv.stop()


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
    for flag, key in (("--kv-policy", "kv_policy"), ("--kv-budget", "kv_budget")):
        assert flag in text
        assert "".join(POLICY_ARG_HELP[key].split()) in squashed, key


def test_startup_line_is_logged_once(server):
    lines = [line for line in server.log.read_text(errors="replace").splitlines() if STARTUP_LINE in line]
    assert len(lines) == 1, lines


def _total(usage) -> int:
    return usage.prompt_tokens + usage.completion_tokens


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


def _metrics(server) -> str:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as r:
        return r.read().decode()


def _sample(text: str, name: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")]
    assert len(values) == 1, (name, values)
    return values[0]


def _info_label(text: str, name: str, label: str) -> int:
    match = re.search(name + r"\{[^}]*\b" + label + r'="(\d+)"', text)
    assert match, (name, label)
    return int(match.group(1))


def test_a_growing_request_keeps_at_most_the_budget(server):
    """Black-box: while one request streams far past the budget, the server's
    own metrics show its KV cache holding fewer slots than its tokens, and no
    more blocks than budget + 1 slots need."""
    text = _metrics(server)
    num_blocks = _info_label(text, "vllm:cache_config_info", "num_gpu_blocks")
    block_size = _info_label(text, "vllm:cache_config_info", "block_size")
    cap = -(-(BUDGET + 1) // block_size)
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
            text = _metrics(server)
            assert _sample(text, "vllm:num_requests_running") == 1
            # vLLM's usage is the share of the pool (less its null block) in use.
            used = round(_sample(text, "vllm:kv_cache_usage_perc") * (num_blocks - 1))
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


def test_server_stops_and_leaves_no_process(server):
    family = _session_processes(server.proc.pid)
    assert len(family) >= 2, "expected the API server and its engine core"
    alive = server.stop()
    assert server.proc.returncode is not None
    assert alive == [], [p.cmdline() for p in alive]
    assert _session_processes(server.proc.pid) == []


# ---------------------------------------------------------------------------
# Entry points exactly as a user types them, each in a fresh process.
# (The `vllm` CLI needs tova_vllm.patch.vllm_cpu_metadata on vllm-cpu, and
# EngineArgs(kv_policy=...) right after its import needs the early hook's
# end-of-import patch.)


def test_vllm_serve_rejects_an_unknown_policy(model_path):
    out = subprocess.run(
        [VLLM_CLI, "serve", model_path, "--kv-policy", "foo", "--kv-budget", "16", "--port", str(_free_port())],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    assert out.returncode != 0
    assert "PolicyConfigError: kv_policy must be one of tova; got 'foo'" in out.stdout + out.stderr, (
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
    assert "kv_policy" in msg and "one of tova" in msg
