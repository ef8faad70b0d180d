"""Offline mode: `vllm.LLM` engines driven step by step, so that the running
sequences and the KV blocks in use can be sampled after every engine step.

Per budget, alternating (stock, TOVA, ideal; repeated ``rounds`` times):
- stock: stock vLLM, the workload's N sequences of seq_len tokens;
- TOVA: the same workload with ``kv_policy="tova", kv_budget=budget``, once
  per variant of the preset (``Preset.variants``: bulk prompts, chunked
  prompts, ...; each variant on its own engine);
- ideal: stock vLLM on sequences only ``budget`` tokens long (the workload
  scaled down: same prompt share, about the same output tokens in total), on
  an engine with ``max_num_seqs`` = the peak concurrency TOVA reached (capped at what its KV memory holds at the
  budget) and the
  blocks those sequences need (one per distinct peak concurrency of the
  variants; each variant's efficiency is against the ideal at its own peak). No scoring and no eviction: what a capped KV
  cache could give at best. (Its own engine: a driver that holds a stock
  engine at that concurrency loses a step each time a wave of requests ends,
  about 7% with 15-token requests.)
Stock and TOVA have the same KV memory (``num_gpu_blocks_override`` blocks
of an explicit block size: on the CPU stock's is 32, the smallest vLLM's CPU
attention takes, TOVA's 16) and the same ``max_num_seqs`` ceiling.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import random
import time
from typing import Any

from tqdm import tqdm

from benchmarks.throughput.presets import Preset


@dataclasses.dataclass
class Workload:
    num_requests: int
    prompt_len: int
    output_len: int

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.output_len


def ideal_workload(w: Workload, budget: int) -> Workload:
    """Sequences ``budget`` tokens long, the same prompt share, and about the
    same number of output tokens in total (so the run lasts about as long)."""
    prompt = max(1, round(w.prompt_len * budget / w.seq_len))
    output = budget - prompt
    n = max(1, round(w.num_requests * w.output_len / output))
    return Workload(n, prompt, output)


def prompts(w: Workload, seed: int = 0) -> list[list[int]]:
    """Random token ids, different from the first token on (no shared prefix)."""
    rng = random.Random(seed)
    return [[100 + i] + [rng.randrange(100, 10_000) for _ in range(w.prompt_len - 1)]
            for i in range(w.num_requests)]


def engine_kwargs(p: Preset, model: str, block_size: int) -> dict[str, Any]:
    return dict(
        model=model,
        dtype=p.dtype,
        max_model_len=p.seq_len,
        block_size=block_size,
        num_gpu_blocks_override=p.num_gpu_blocks(block_size),
        max_num_seqs=p.max_num_seqs,
        enforce_eager=p.enforce_eager,
        load_format=p.load_format,
        enable_prefix_caching=False,  # TOVA switches it off; distinct prompts anyway
        disable_log_stats=False,  # RequestOutput.metrics: preemptions per request
        seed=0,
    )


def ideal_engine_kwargs(p: Preset, base: dict, budget: int, concurrency: int) -> dict[str, Any]:
    """Stock, at most `concurrency` sequences of `budget` tokens, and room for them."""
    return {**base, "max_num_seqs": concurrency, "max_model_len": budget,
            "num_gpu_blocks_override": p.ideal_blocks(budget, concurrency) + 1}


def start_engine(label: str, **kwargs):
    from vllm import LLM

    print(f"[throughput] starting engine: {label}", flush=True)
    t = time.perf_counter()
    llm = LLM(**kwargs)
    print(f"[throughput] {label}: engine started in {time.perf_counter() - t:.0f} s", flush=True)
    return llm


def stop_engine(llm) -> None:
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def drive(llm, w: Workload, desc: str) -> dict[str, Any]:
    """All requests submitted at once (the engine's scheduler decides what
    runs); after each engine step, the running sequences and KV blocks in use
    are read from the scheduler (tova_vllm.inspect)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from tova_vllm.inspect import engine_kv_state

    engine = llm.llm_engine
    params = SamplingParams(
        max_tokens=w.output_len, ignore_eos=True, temperature=0.0,
        output_kind=RequestOutputKind.DELTA, detokenize=False,
    )
    ids = prompts(w)
    tag = f"{desc.replace(' ', '_')}-{time.monotonic_ns()}"
    start = time.perf_counter()
    for i, prompt in enumerate(ids):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": prompt}, params)
    tokens = steps = finished = preemptions = 0
    peak_running = peak_blocks = running_sum = 0
    num_blocks = None
    with tqdm(total=w.num_requests * w.output_len, desc=desc, unit="tok", mininterval=1.0) as bar:
        while engine.has_unfinished_requests():
            outputs = engine.step()
            state = engine_kv_state(llm)
            steps += 1
            running = sum(1 for b in state["blocks_per_running_request"].values() if b > 0)
            num_blocks = state["num_blocks"] - 1  # usable (less the null block)
            peak_running = max(peak_running, running)
            running_sum += running
            peak_blocks = max(peak_blocks, num_blocks - state["num_free_blocks"])
            new = 0
            for out in outputs:
                new += len(out.outputs[0].token_ids)
                if out.finished:
                    finished += 1
                    if out.metrics is not None:
                        preemptions += out.metrics.num_preemptions
            tokens += new
            bar.update(new)
    elapsed = time.perf_counter() - start
    if finished != w.num_requests or tokens != w.num_requests * w.output_len:
        raise RuntimeError(f"{desc}: {finished} requests finished and {tokens} tokens "
                           f"generated; expected {w.num_requests} and {w.num_requests * w.output_len}")
    return {
        "requests": w.num_requests,
        "prompt_len": w.prompt_len,
        "output_len": w.output_len,
        "output_tokens": tokens,
        "elapsed_s": round(elapsed, 3),
        "output_tok_per_s": round(tokens / elapsed, 2),
        "requests_per_s": round(w.num_requests / elapsed, 4),
        "peak_running": peak_running,
        "mean_running": round(running_sum / max(steps, 1), 2),
        "tokens_per_step": round(tokens / max(steps, 1), 2),
        "peak_kv_blocks": peak_blocks,
        "kv_blocks": num_blocks,
        "preemptions": preemptions,
        "engine_steps": steps,
    }


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Several rounds of one configuration: tokens and requests over total time."""
    if not runs:
        return None
    total = sum(r["elapsed_s"] for r in runs)
    return {
        "rounds": len(runs),
        "output_tok_per_s": round(sum(r["output_tokens"] for r in runs) / total, 2),
        "requests_per_s": round(sum(r["requests"] for r in runs) / total, 4),
        "peak_running": max(r["peak_running"] for r in runs),
        "mean_running": round(sum(r["mean_running"] for r in runs) / len(runs), 2),
        "peak_kv_blocks": max(r["peak_kv_blocks"] for r in runs),
        "kv_blocks": runs[0]["kv_blocks"],
        "preemptions": sum(r["preemptions"] for r in runs),
        "elapsed_s": round(total, 3),
        "runs": runs,
    }


def budget_result(p: Preset, w: Workload, budget: int, evicts: bool, runs: dict[str, list], ideal_runs: dict[int, list],
                  concurrency: dict[str, int], aggregate_runs, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One budget's result (offline and served alike): per TOVA variant its
    aggregate, ratio to stock and efficiency against the ideal at its
    concurrency; the first variant's figures also at the top level."""
    s = aggregate_runs(runs["stock"])
    ideal_aggs = {c: aggregate_runs(r) for c, r in ideal_runs.items()}
    best = ideal_aggs[max(ideal_aggs)] if ideal_aggs else None
    variants = []
    for v in p.variants:
        t = aggregate_runs(runs[v.name])
        c = concurrency.get(v.name)
        i = ideal_aggs.get(c) if evicts else None
        ref = i or s
        variants.append({
            "name": v.name, "label": v.label, "prompt_mode": v.prompt_mode, "prompt_chunk": v.prompt_chunk,
            "tova": t, "ideal": i, "ideal_concurrency": c,
            "ratio_vs_stock": _ratio(t, s),
            "ideal_ratio_vs_stock": _ratio(ref, s),
            "efficiency": _ratio(t, ref),
            # Against the ideal at the highest concurrency any variant reached
            # (with one variant, or all at the same concurrency: = efficiency).
            "efficiency_vs_best_ideal": _ratio(t, best or s),
        })
    first = variants[0]
    return {
        "budget": budget,
        "budget_fraction": round(budget / w.seq_len, 4),
        "evicts": evicts,
        **(extra or {}),
        "stock": s,
        # The first variant (bulk prompts by default), as before variants existed:
        "tova": first["tova"],
        "ideal": first["ideal"],
        "ideal_concurrency": first["ideal_concurrency"],
        "ratio_vs_stock": first["ratio_vs_stock"],
        "ideal_ratio_vs_stock": first["ideal_ratio_vs_stock"],
        "efficiency": first["efficiency"],
        "variants": variants,
        "ideals": {str(c): a for c, a in sorted(ideal_aggs.items())},
    }


def _ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b:
        return None
    return round(a["output_tok_per_s"] / b["output_tok_per_s"], 3)


def run(p: Preset, model: str, policy: str = "tova") -> dict[str, Any]:
    base = engine_kwargs(p, model, p.stock_block_size)
    w = Workload(p.num_requests, p.prompt_len, p.output_len)
    stock = start_engine("stock", **base)
    results = []
    try:
        for budget in p.budgets:
            results.append(_run_budget(p, base, w, stock, budget, policy))
    finally:
        stop_engine(stock)
    all_stock = [r for b in results for r in b["stock"]["runs"]]
    return {"stock": aggregate(all_stock), "budgets": results,
            "variants": [dataclasses.asdict(v) | {"name": v.name, "label": v.label} for v in p.variants]}


def _run_budget(p, base, w, stock, budget, policy) -> dict[str, Any]:
    """Per round: a stock run, a run of every TOVA variant (each on its own
    engine), then the ideal at each variant's peak concurrency (one engine
    per distinct concurrency, started after the first round)."""
    evicts = budget < w.seq_len
    tova_kwargs = {**base, **engine_kwargs(p, base["model"], p.block_size)}
    engines: dict[str, Any] = {}
    ideals: dict[int, Any] = {}
    runs: dict[str, list] = {"stock": [], **{v.name: [] for v in p.variants}}
    ideal_runs: dict[int, list] = {}
    concurrency: dict[str, int] = {}
    try:
        for v in p.variants:
            engines[v.name] = start_engine(f"{policy} {v.label} budget={budget}", **tova_kwargs,
                                           kv_policy=policy, kv_budget=budget, **v.engine_args())
        for rnd in range(1, p.rounds + 1):
            last = rnd == p.rounds
            runs["stock"].append(drive(stock, w, f"stock (b={budget} r{rnd})"))
            for v in p.variants:
                runs[v.name].append(drive(engines[v.name], w, f"{policy} {v.label} b={budget} r{rnd}"))
                if last:  # done with it: free its memory before the ideals start
                    stop_engine(engines.pop(v.name))
            if not evicts:
                continue  # nothing to evict: stock itself is the ideal
            for v in p.variants:
                concurrency.setdefault(v.name, p.ideal_concurrency(budget, runs[v.name][0]["peak_running"]))
            for c in sorted(set(concurrency.values())):
                if c not in ideals:
                    ideals[c] = start_engine(f"ideal budget={budget} max_num_seqs={c}",
                                             **ideal_engine_kwargs(p, base, budget, c))
                ideal_runs.setdefault(c, []).append(
                    drive(ideals[c], ideal_workload(w, budget), f"ideal b={budget} ({c} seqs) r{rnd}"))
                if last:
                    stop_engine(ideals.pop(c))
    finally:
        for llm in [*engines.values(), *ideals.values()]:
            stop_engine(llm)
    extra = {"ideal_workload": dataclasses.asdict(ideal_workload(w, budget)) if evicts else None}
    return budget_result(p, w, budget, evicts, runs, ideal_runs, concurrency, aggregate, extra)
