"""Smoke test of the long-prompt benchmark: `python -m benchmarks.long_prompt`
with tiny sizes, as a user runs it (three engine processes: stock, TOVA bulk,
TOVA chunked), then the JSON, table and plot it promises. Speed and memory
targets are reported by the benchmark, never asserted here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIZES = (256, 512)
BUDGET = 64
CHUNK = 32


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, model_path):
    out = tmp_path_factory.mktemp("long_prompt")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.long_prompt", "--sizes", ",".join(map(str, SIZES)),
         "--budget", str(BUDGET), "--chunk", str(CHUNK), "--rounds", "1", "--pause", "0", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out, proc.stdout, json.loads((out / "long_prompt.json").read_text())


def test_settings_and_engines(smoke_run):
    _, _, r = smoke_run
    s = r["settings"]
    assert s["sizes"] == list(SIZES) and s["budget"] == BUDGET and s["chunk"] == CHUNK
    assert s["max_num_batched_tokens"] == 2048
    assert max(SIZES) < s["max_model_len"] <= max(SIZES) + 32
    assert s["kv_tokens"] >= s["max_model_len"] + BUDGET  # room for a prompt region + kept slots
    engines = r["engines"]
    assert set(engines) == {"stock", "bulk", "chunked"}
    assert len({e["pid"] for e in engines.values()}) == 3  # one process per configuration
    assert engines["stock"]["kv_settings"] == {}
    assert engines["bulk"]["kv_settings"]["kv_prompt_mode"] == "bulk"
    assert engines["chunked"]["kv_settings"]["kv_prompt_mode"] == "chunked"
    assert engines["chunked"]["kv_settings"]["kv_prompt_chunk"] == CHUNK
    for e in engines.values():
        assert e["max_num_batched_tokens"] == 2048 and e["max_model_len"] == s["max_model_len"]
        assert isinstance(e["enable_prefix_caching"], bool)
        # in-process engine: the model and the KV cache are in this process's RSS
        assert e["rss_mib"] > 300


def test_per_request_measurements(smoke_run):
    _, _, r = smoke_run
    per = r["summary"]["per_config"]
    assert set(per) == {"stock", "bulk", "chunked"}
    for config, rows in per.items():
        assert [row["size"] for row in rows] == list(SIZES)
        for row in rows:
            assert len(row["runs"]) == 1
            assert 0 < row["ttft_s"] < 120
            assert row["extra_peak_mib"] is not None and 0 <= row["extra_peak_mib"] < 4096
            assert row["rss_before_mib"] > 300
            for run in row["runs"]:
                assert run["hwm_reset"], "VmHWM was not reset before the request"
                assert run["peak_rss_mib"] >= run["rss_before_mib"]
                assert not run["num_cached_tokens"]  # unique prompts: no prefix-cache hit
    # KV blocks a TOVA request held at most: bulk its whole prompt (plus its
    # kept slots when a prefix-cached prompt region is copied out at the
    # prompt's end), chunked at most budget + chunk slots (blocks of 16).
    for row in per["bulk"]:
        blocks = -(-row["size"] // 16)
        assert blocks <= row["peak_kv_blocks"] <= blocks + -(-BUDGET // 16)
    for row in per["chunked"]:
        assert row["peak_kv_blocks"] <= -(-(BUDGET + CHUNK) // 16)
    # the warm-up requests ran too (one per size and configuration)
    assert all(len(w) == len(SIZES) for w in r["warmup"].values())


def test_ratios_and_targets(smoke_run):
    _, stdout, r = smoke_run
    ratios = r["summary"]["ratios_vs_stock"]
    assert set(ratios) == {"bulk", "chunked"}
    per = r["summary"]["per_config"]
    for config, rows in ratios.items():
        assert [x["size"] for x in rows] == list(SIZES)
        for x, t, st in zip(rows, per[config], per["stock"]):
            assert x["ttft"] == pytest.approx(t["ttft_s"] / st["ttft_s"], rel=1e-2)
            if st["extra_peak_mib"]:
                assert x["extra_peak_memory"] == pytest.approx(t["extra_peak_mib"] / st["extra_peak_mib"], rel=1e-2)
    targets = {(t["config"], t["metric"]): t for t in r["summary"]["targets"]}
    assert set(targets) == {("bulk", "ttft"), ("bulk", "extra_peak_memory"), ("chunked", "extra_peak_memory")}
    for t in targets.values():
        assert t["size"] == max(SIZES)
        assert t["met"] is None or t["met"] == (t["value"] <= t["limit"])
    assert targets[("bulk", "ttft")]["limit"] == 1.15
    assert targets[("bulk", "extra_peak_memory")]["limit"] == 1.2
    assert "| target |" in stdout and ("not met" in stdout or "| met |" in stdout)


def test_writes_table_and_plot(smoke_run):
    out, stdout, r = smoke_run
    md = (out / "long_prompt.md").read_text()
    assert md.strip() in stdout
    assert "| TOVA bulk (budget 64) | 512 |" in md and "| stock vLLM | 256 |" in md
    png = (out / "long_prompt.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert r["png"] == str(out / "long_prompt.png")
