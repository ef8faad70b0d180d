"""Smoke test of the throughput benchmark: `python -m benchmarks.throughput
--preset tiny` as a user runs it (real engines: stock, TOVA with bulk prompts,
TOVA with chunked prompts, the ideal), then the JSON and PNG it promises.
Speed itself is never asserted (see the README)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.throughput.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
TINY = PRESETS["tiny"]
RUN_FIELDS = ("output_tok_per_s", "requests_per_s", "peak_running", "peak_kv_blocks",
              "kv_blocks", "preemptions", "elapsed_s", "runs")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, model_path):
    out = tmp_path_factory.mktemp("throughput")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.throughput", "--preset", "tiny", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out, proc.stdout, json.loads((out / "throughput.json").read_text())


def test_prints_the_table(tiny_run):
    _, stdout, result = tiny_run
    assert "x stock" in stdout and "effic." in stdout
    for budget in TINY.budgets:
        assert f"ideal b={budget}" in stdout
        for v in TINY.variants:
            assert f"tova b={budget} {v.label}" in stdout
            assert f"b={budget} {v.label}: efficiency" in stdout
    assert str(result["json"]) in stdout


def test_tiny_covers_bulk_and_chunked():
    assert [v.prompt_mode for v in TINY.variants] == ["bulk", "chunked"]
    assert TINY.prompt_len > TINY.budgets[0] > TINY.variants[1].prompt_chunk


def test_json_has_the_promised_fields(tiny_run):
    _, _, result = tiny_run
    assert result["preset"] == "tiny"
    s = result["settings"]
    assert s["kv_tokens"] >= TINY.stock_full_seqs * TINY.seq_len
    off = result["offline"]
    assert [b["budget"] for b in off["budgets"]] == list(TINY.budgets)
    for b in off["budgets"]:
        assert b["evicts"] and 0 < b["budget_fraction"] < 1
        for key in ("stock", "tova", "ideal"):
            for field in RUN_FIELDS:
                assert field in b[key], (key, field)
        for key in ("ratio_vs_stock", "ideal_ratio_vs_stock", "efficiency"):
            assert b[key] is not None and b[key] > 0, key
        assert [v["name"] for v in b["variants"]] == [v.name for v in TINY.variants]
        for v, want in zip(b["variants"], TINY.variants):
            assert (v["prompt_mode"], v["prompt_chunk"]) == (want.prompt_mode, want.prompt_chunk)
            for key in ("tova", "ideal"):
                for field in RUN_FIELDS:
                    assert field in v[key], (v["name"], key, field)
            for key in ("ratio_vs_stock", "ideal_ratio_vs_stock", "efficiency", "efficiency_vs_best_ideal"):
                assert v[key] is not None and v[key] > 0, (v["name"], key)
            assert str(v["ideal_concurrency"]) in b["ideals"]
        # The top-level fields are the first variant's (bulk).
        first = b["variants"][0]
        for key in ("tova", "ideal", "ideal_concurrency", "ratio_vs_stock", "efficiency"):
            assert b[key] == first[key], key


def test_values_are_sane(tiny_run):
    _, _, result = tiny_run
    for b in result["offline"]["budgets"]:
        stock = b["stock"]
        for run in stock["runs"]:
            assert run["output_tokens"] == TINY.num_requests * TINY.output_len
            assert 1 <= run["peak_running"] <= TINY.max_num_seqs
            assert 0 < run["peak_kv_blocks"] <= run["kv_blocks"]
        # No scratch slot: once its prompt is processed a request holds
        # ceil(budget / block_size) blocks; while it is processed, its prompt
        # (bulk) or at most budget + chunk slots (chunked). Tiny's are all one block.
        cap_blocks = -(-b["budget"] // TINY.block_size)
        for v, variant in zip(b["variants"], TINY.variants):
            tova, ideal = v["tova"], v["ideal"]
            prompt_slots = TINY.prompt_len if variant.prompt_mode == "bulk" else min(
                TINY.prompt_len, b["budget"] + (variant.prompt_chunk or b["budget"]))
            assert -(-prompt_slots // TINY.block_size) == cap_blocks == 1
            for run in tova["runs"]:
                assert run["output_tokens"] == TINY.num_requests * TINY.output_len
                assert 1 <= run["peak_running"] <= TINY.max_num_seqs
                assert 0 < run["peak_kv_blocks"] <= run["kv_blocks"]
            assert tova["kv_blocks"] == TINY.kv_tokens // TINY.block_size
            # Capped at `cap_blocks` per sequence, TOVA never runs out of blocks:
            # no preemption, and at most kv_blocks // cap_blocks sequences at once.
            assert tova["preemptions"] == 0
            assert tova["peak_running"] <= tova["kv_blocks"] // cap_blocks
            assert tova["peak_kv_blocks"] <= tova["peak_running"] * cap_blocks
            # The ideal runs at this variant's concurrency (its max_num_seqs),
            # on sequences `budget` long, with room for them.
            assert v["ideal_concurrency"] == TINY.ideal_concurrency(b["budget"], tova["runs"][0]["peak_running"])
            assert ideal["peak_running"] <= v["ideal_concurrency"]
            assert ideal["kv_blocks"] == v["ideal_concurrency"] * -(-b["budget"] // TINY.stock_block_size)
            assert ideal["preemptions"] == 0
            assert v["ratio_vs_stock"] == pytest.approx(
                tova["output_tok_per_s"] / stock["output_tok_per_s"], rel=1e-2)
            assert v["efficiency"] == pytest.approx(
                tova["output_tok_per_s"] / ideal["output_tok_per_s"], rel=1e-2)
        w = b["ideal_workload"]
        assert w["prompt_len"] + w["output_len"] == b["budget"]


def test_writes_the_plot(tiny_run):
    out, _, result = tiny_run
    png = Path(result["png"])
    assert png.parent == out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_long_context_preset_runs_end_to_end(tmp_path):
    """`--preset long-context` with tiny sizes: every configuration (stock,
    TOVA, the ideal) on both workloads, the table with its ratios and
    targets, the JSON and the plot."""
    out = tmp_path / "long_context"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.throughput", "--preset", "long-context", "--budgets", "32",
         "--contexts", "2", "--context-len", "96", "--shared-requests", "2", "--prefix-len", "64",
         "--suffix-len", "16", "--output-len", "6", "--rounds", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((out / "long_context.json").read_text())
    rows = {(r["workload"], r["config"]): r for r in result["summary"]["rows"]}
    assert set(rows) == {("distinct", "stock"), ("distinct", "tova b=32"), ("distinct", "ideal b=32"),
                         ("shared", "stock"), ("shared", "tova b=32")}  # fmt: skip
    for r in rows.values():
        assert r["decode_tok_s"] > 0
    tova = rows[("distinct", "tova b=32")]
    assert tova["vs_ideal"] == pytest.approx(tova["decode_tok_s"] / rows[("distinct", "ideal b=32")]["decode_tok_s"],
                                             abs=1e-3)  # fmt: skip (ratios: 3 decimals)
    for runs in result["raw"].values():
        for per in runs.values():
            # Every request decoded its tokens after its prefill (one token each came with the prefill).
            assert all(x["decode_tokens"] > 0 and x["decode_steps"] > 0 for x in per)
    assert [t["what"] for t in result["summary"]["targets"]] == ["distinct, tova b=32 / ideal",
                                                                 "shared prefix, tova b=32 / stock"]  # fmt: skip
    assert "| distinct | tova b=32 |" in proc.stdout and "target >= 0.9" in proc.stdout
    assert (out / "long_context.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
