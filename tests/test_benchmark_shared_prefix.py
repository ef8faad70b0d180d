"""Smoke test of the shared-prefix benchmark: `python -m
benchmarks.shared_prefix` with a tiny workload, as a user runs it (three
engine processes: stock with prefix caching, TOVA with prefix caching
requested, TOVA without), then the JSON, table and plot it promises. The
TTFT target is reported by the benchmark, never asserted here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
N, PREFIX, SUFFIX, OUTPUT, BUDGET = 4, 128, 64, 8, 64


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, model_path):
    out = tmp_path_factory.mktemp("shared_prefix")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.shared_prefix", "--num-requests", str(N), "--prefix-len", str(PREFIX),
         "--suffix-len", str(SUFFIX), "--output-len", str(OUTPUT), "--budget", str(BUDGET), "--pause", "0",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out, proc.stdout, json.loads((out / "shared_prefix.json").read_text())


def test_engines_and_caching_state(smoke_run):
    _, _, r = smoke_run
    engines = r["engines"]
    assert set(engines) == {"stock", "tova_cache", "tova_nocache"}
    assert len({e["pid"] for e in engines.values()}) == 3  # one process per configuration
    assert r["engine_kwargs"]["tova_cache"]["enable_prefix_caching"] is True
    assert r["engine_kwargs"]["tova_nocache"]["enable_prefix_caching"] is False
    assert "enable_prefix_caching" not in r["engine_kwargs"]["stock"]  # vLLM's default
    per = r["summary"]["per_config"]
    assert per["stock"]["prefix_caching_on"] is True
    assert per["tova_nocache"]["prefix_caching_on"] is False
    # Whatever the plugin does with the request, the report says what the engine ran with.
    assert isinstance(per["tova_cache"]["prefix_caching_on"], bool)
    assert per["tova_cache"]["prefix_caching_on"] == engines["tova_cache"]["enable_prefix_caching"]
    for e in engines.values():
        assert e["max_num_seqs"] == N


def test_ttft_and_cache_hits(smoke_run):
    _, _, r = smoke_run
    per = r["summary"]["per_config"]
    full_prefix = PREFIX // 32 * 32
    for config, p in per.items():
        assert 0 < p["cold_ttft_s"] < 120
        assert not p["cold_cached_tokens"]  # nothing of the system prompt is cached yet
        hits = p["hit_ttft_s"]
        assert hits["n"] == N - 1
        assert 0 < hits["p50"] <= hits["p90"] < 120
    # stock's later requests find the system prompt in its prefix cache
    assert per["stock"]["hit_cached_tokens_min"] >= full_prefix
    assert per["stock"]["hits_with_prefix_cached"] == N - 1
    assert per["tova_nocache"]["hit_cached_tokens_mean"] == 0
    if not per["tova_cache"]["prefix_caching_on"]:
        assert per["tova_cache"]["hit_cached_tokens_mean"] == 0


def test_throughput_and_ratios(smoke_run):
    _, stdout, r = smoke_run
    per = r["summary"]["per_config"]
    for p in per.values():
        assert p["throughput_complete"] and p["throughput_output_tokens"] == N * OUTPUT
        assert p["throughput_output_tok_per_s"] > 0
        assert p["throughput_ttft_s"]["n"] == N
    ratios = r["summary"]["ratios_vs_stock"]
    assert set(ratios) == {"tova_cache", "tova_nocache"}
    for config, x in ratios.items():
        assert x["cold_ttft"] == pytest.approx(per[config]["cold_ttft_s"] / per["stock"]["cold_ttft_s"], rel=1e-2)
        assert x["hit_ttft_p50"] == pytest.approx(
            per[config]["hit_ttft_s"]["p50"] / per["stock"]["hit_ttft_s"]["p50"], rel=1e-2)
        assert x["throughput"] == pytest.approx(
            per[config]["throughput_output_tok_per_s"] / per["stock"]["throughput_output_tok_per_s"], rel=1e-2)
    (target,) = r["summary"]["targets"]
    assert target["config"] == "tova_cache" and target["limit"] == 1.2
    assert target["met"] == (target["value"] <= 1.2)
    assert target["prefix_caching_on"] == per["tova_cache"]["prefix_caching_on"]
    assert (target["note"] is None) == target["prefix_caching_on"]
    # a TOVA request never holds more than its prompt's blocks, nor less than the budget's
    assert per["tova_nocache"]["peak_kv_blocks_per_request"] >= -(-BUDGET // 16)


def test_writes_table_and_plot(smoke_run):
    out, stdout, r = smoke_run
    md = (out / "shared_prefix.md").read_text()
    assert md.strip() in stdout
    assert "| stock vLLM (prefix caching) | yes |" in md and "| target |" in md
    png = (out / "shared_prefix.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
