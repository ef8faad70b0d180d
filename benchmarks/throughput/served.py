"""Served mode: the same comparison through real `vllm serve` processes, loaded
by vLLM's own `vllm bench serve` (random prompts of the workload's lengths,
EOS ignored, all requests at once). While a run goes, the server's /metrics is
polled for the running requests and KV usage; preemptions are the counter's
increase over the run. Same alternation as offline: per budget, a stock run,
a TOVA run per variant of the preset (prompt mode; each its own server), and an
ideal run (a stock server with ``--max-num-seqs`` = the peak concurrency (capped at what its memory holds) the
TOVA server reached, on sequences ``budget`` tokens long; one per distinct
peak concurrency of the variants).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.throughput.offline import Workload, budget_result, ideal_workload
from benchmarks.throughput.presets import Preset

VLLM_CLI = str(Path(sys.executable).with_name("vllm"))
STARTUP_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, label: str, model: str, p: Preset, log_dir: Path, max_num_seqs: int,
                 block_size: int, policy_args: list[str], num_blocks: int | None = None,
                 max_model_len: int | None = None):
        self.label, self.model = label, model
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"server-{label.replace(' ', '_').replace('=', '')}.log"
        cmd = [
            VLLM_CLI, "serve", model, "--dtype", p.dtype, "--max-model-len", str(max_model_len or p.seq_len),
            "--block-size", str(block_size), "--num-gpu-blocks-override", str(num_blocks or p.num_gpu_blocks(block_size)),
            "--max-num-seqs", str(max_num_seqs), "--no-enable-prefix-caching", "--seed", "0",
            "--load-format", p.load_format, "--host", "127.0.0.1", "--port", str(self.port),
            *(["--enforce-eager"] if p.enforce_eager else []), *policy_args,
        ]  # fmt: skip
        print(f"[throughput] starting server: {label}", flush=True)
        self.started = time.perf_counter()
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "VLLM_CPU_KVCACHE_SPACE":
                                              os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")})
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        print(f"[throughput] {label}: server up in {time.perf_counter() - self.started:.0f} s", flush=True)

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label}: server exited with {self.proc.returncode}; see {self.log}")
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.label}: no /health after {STARTUP_TIMEOUT_S} s; see {self.log}")
            time.sleep(2)

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=30) as r:
            text = r.read().decode()
        found = {}
        for line in text.splitlines():
            for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                         "vllm:num_preemptions_total", "vllm:cache_config_info"):
                if line.startswith(name + "{"):
                    found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # engine processes left in its session


class _Sampler(threading.Thread):
    """Polls the server's gauges while a run goes."""

    def __init__(self, server: Server):
        super().__init__(daemon=True)
        self.server, self.done = server, threading.Event()
        self.peak_running, self.peak_usage = 0.0, 0.0

    def run(self) -> None:
        while not self.done.wait(0.5):
            with contextlib.suppress(Exception):
                m = self.server.metrics()
                self.peak_running = max(self.peak_running, m.get("vllm:num_requests_running", 0))
                self.peak_usage = max(self.peak_usage, m.get("vllm:kv_cache_usage_perc", 0))


def bench(server: Server, w: Workload, p: Preset, out_dir: Path, name: str) -> dict[str, Any]:
    result_file = f"bench-{name}.json"
    cmd = [
        VLLM_CLI, "bench", "serve", "--backend", "vllm", "--base-url", server.url,
        "--model", server.model, "--tokenizer", server.model, "--dataset-name", "random",
        "--random-input-len", str(w.prompt_len), "--random-output-len", str(w.output_len),
        "--random-range-ratio", "0", "--ignore-eos", "--num-prompts", str(w.num_requests),
        "--request-rate", "inf", "--temperature", "0", "--seed", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
        "--save-result", "--result-dir", str(out_dir), "--result-filename", result_file,
    ]  # fmt: skip
    before = server.metrics().get("vllm:num_preemptions_total", 0.0)
    sampler = _Sampler(server)
    sampler.start()
    print(f"[throughput] vllm bench serve: {name}", flush=True)
    try:
        proc = subprocess.run(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=3600)
    finally:
        sampler.done.set()
        sampler.join()
    (out_dir / f"bench-{name}.log").write_text(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    r = json.loads((out_dir / result_file).read_text())
    after = server.metrics().get("vllm:num_preemptions_total", 0.0)
    if r["completed"] != w.num_requests:
        raise RuntimeError(f"{name}: {r['completed']} of {w.num_requests} requests completed")
    def pct(metric: str) -> dict[str, float]:
        return {q: round(r[f"{q}_{metric}_ms"], 2) for q in ("p50", "p90", "p99")} | {
            "mean": round(r[f"mean_{metric}_ms"], 2)}

    return {
        "requests": w.num_requests, "prompt_len": w.prompt_len, "output_len": w.output_len,
        "output_tokens": r["total_output_tokens"], "elapsed_s": round(r["duration"], 3),
        "output_tok_per_s": round(r["output_throughput"], 2),
        "requests_per_s": round(r["request_throughput"], 4),
        "peak_running": int(sampler.peak_running),
        "peak_kv_usage": round(sampler.peak_usage, 4),
        "preemptions": int(after - before),
        "ttft_ms": pct("ttft"), "tpot_ms": pct("tpot"), "e2el_ms": pct("e2el"),
    }


def _aggregate(runs: list[dict]) -> dict | None:
    if not runs:
        return None
    if len(runs) == 1:
        return {**runs[0], "runs": runs}
    total = sum(r["elapsed_s"] for r in runs)
    last = runs[-1]
    return {**last, "output_tok_per_s": round(sum(r["output_tokens"] for r in runs) / total, 2),
            "requests_per_s": round(sum(r["requests"] for r in runs) / total, 4),
            "peak_running": max(r["peak_running"] for r in runs),
            "preemptions": sum(r["preemptions"] for r in runs), "runs": runs}


def run(p: Preset, model: str, out: Path, policy: str = "tova") -> dict[str, Any]:
    out_dir = out / "served"
    out_dir.mkdir(parents=True, exist_ok=True)
    w = Workload(p.served_num_requests or p.num_requests, p.prompt_len, p.output_len)
    stock = Server("stock", model, p, out_dir, p.max_num_seqs, p.stock_block_size, [])
    results = []
    try:
        for budget in p.served_budgets:
            results.append(_run_budget(p, model, out_dir, w, stock, budget, policy))
    finally:
        stock.stop()
    return {"budgets": results, "num_requests": w.num_requests,
            "variants": [{"name": v.name, "label": v.label, "prompt_mode": v.prompt_mode,
                          "prompt_chunk": v.prompt_chunk} for v in p.variants]}


def _run_budget(p, model, out_dir, w, stock, budget, policy) -> dict[str, Any]:
    """As offline: per round stock, each TOVA variant (its own server), then
    the ideal at each variant's peak concurrency (one server per distinct one)."""
    evicts = budget < w.seq_len
    runs: dict[str, list] = {"stock": [], **{v.name: [] for v in p.variants}}
    servers: dict[str, Server] = {}
    ideals: dict[int, Server] = {}
    ideal_runs: dict[int, list] = {}
    concurrency: dict[str, int] = {}
    try:
        for v in p.variants:
            servers[v.name] = Server(f"{policy} {v.name} b={budget}", model, p, out_dir, p.max_num_seqs,
                                     p.block_size, ["--kv-policy", policy, "--kv-budget", str(budget),
                                                    *v.cli_args()])
        for rnd in range(1, p.rounds + 1):
            last = rnd == p.rounds
            runs["stock"].append(bench(stock, w, p, out_dir, f"stock-b{budget}-r{rnd}"))
            for v in p.variants:
                runs[v.name].append(bench(servers[v.name], w, p, out_dir, f"{policy}-{v.name}-b{budget}-r{rnd}"))
                if last:
                    servers.pop(v.name).stop()
            if not evicts:
                continue
            for v in p.variants:
                concurrency.setdefault(v.name, p.ideal_concurrency(budget, runs[v.name][0]["peak_running"]))
            for c in sorted(set(concurrency.values())):
                if c not in ideals:
                    ideals[c] = Server(f"ideal b={budget} c={c}", model, p, out_dir, c, p.stock_block_size, [],
                                       max_model_len=budget, num_blocks=p.ideal_blocks(budget, c) + 1)
                ideal_runs.setdefault(c, []).append(
                    bench(ideals[c], ideal_workload(w, budget), p, out_dir, f"ideal-b{budget}-c{c}-r{rnd}"))
                if last:
                    ideals.pop(c).stop()
    finally:
        for server in [*servers.values(), *ideals.values()]:
            server.stop()
    return budget_result(p, w, budget, evicts, runs, ideal_runs, concurrency, _aggregate)
