"""Where a decode step's time goes: stock vLLM vs vLLM + TOVA, same batch.

    python -m benchmarks.throughput.profile [--budget 16] [--batch 8] [--seq-len 128] [--steps 24]

Runs each engine in this process (so the profilers see the model and the
attention backend), prefills ``batch`` prompts, lets them grow past the
budget, then profiles ``steps`` engine steps of pure decoding: torch's
profiler (operators by self CPU time) and cProfile (Python functions by
cumulative time, the TOVA backend's included). Prints ms per step for both.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time


def _engine(model, args, **policy):
    from vllm import LLM

    return LLM(model=model, dtype="float32", max_model_len=args.seq_len, enforce_eager=True, seed=0,
               max_num_seqs=args.batch, block_size=32 if not policy else 16,
               enable_prefix_caching=False, **policy)


def _steps(llm, n):
    for _ in range(n):
        llm.llm_engine.step()


def profile(model, args, label, **policy) -> dict:
    import torch
    from vllm import SamplingParams

    llm = _engine(model, args, **policy)
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=args.seq_len - 8, ignore_eos=True, temperature=0.0, detokenize=False)
    for i in range(args.batch):
        engine.add_request(f"p{i}", {"prompt_token_ids": [100 + i] + [200 + j for j in range(7)]}, params)
    # Prefill, then decode past the budget (so TOVA evicts every step).
    _steps(llm, args.warmup)
    start = time.perf_counter()
    _steps(llm, args.steps)
    step_ms = 1000 * (time.perf_counter() - start) / args.steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _steps(llm, args.steps)
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
    # One attention layer call (the op vLLM wraps every layer's attention in):
    # its wall time in the profiler, the median over the profiled steps.
    calls = sorted(e.cpu_time_total for e in prof.events() if e.name == "vllm::unified_attention_with_output")
    layer_us = calls[len(calls) // 2] if calls else None
    try:  # device operations per attention layer call (kernels and copies, not views)
        from tova_vllm.inspect import count_device_ops

        counts = sorted(count_device_ops(prof.events(), "vllm::unified_attention_with_output"))
    except ImportError:  # an older tova-vllm
        counts = []
    cp = cProfile.Profile()
    cp.enable()
    _steps(llm, args.steps)
    cp.disable()
    out = io.StringIO()
    pstats.Stats(cp, stream=out).sort_stats("cumulative").print_stats(args.top * 2)
    llm.llm_engine.engine_core.shutdown()
    return {"label": label, "step_ms": step_ms, "ops": ops, "functions": out.getvalue(),
            "layer_ops": counts[len(counts) // 2] if counts else None, "layer_us": layer_us}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--budget", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=40, help="engine steps before measuring")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--only", choices=("stock", "tova"))
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process
    from tova_vllm.models import resolve_model

    model = resolve_model(args.model)
    results = []
    if args.only != "tova":
        results.append(profile(model, args, "stock"))
    if args.only != "stock":
        results.append(profile(model, args, f"tova budget={args.budget}", kv_policy="tova",
                               kv_budget=args.budget))
    for r in results:
        print(f"\n===== {r['label']}: operators by self CPU time =====\n{r['ops']}")
        print(f"\n===== {r['label']}: functions by cumulative time =====\n{r['functions']}")
    print(f"\nbatch {args.batch}, decode steps at context {args.warmup}..{args.warmup + 2 * args.steps}")
    for r in results:
        ops = "" if r["layer_ops"] is None else f", {r['layer_ops']} device operations per attention layer call (median)"
        call = "" if r["layer_us"] is None else f", one attention layer call {r['layer_us']:.0f} us (median)"
        print(f"{r['label']:24s} {r['step_ms']:8.1f} ms per decode step{call}{ops}")
    if len(results) == 2 and all(r["layer_us"] for r in results):
        print(f"attention layer call, TOVA / stock: {results[1]['layer_us'] / results[0]['layer_us']:.2f}")


if __name__ == "__main__":
    main()
