"""Throughput of vLLM + TOVA vs stock vLLM, same workload, same KV memory, one run.

    python -m benchmarks.throughput [--preset cpu|long-prompt|gpu|tiny] [--mode offline|served|both]
        [--budgets 16,32,256] [--variants bulk,chunked:64] [--num-requests N] [--seq-len L]
        [--prompt-len P] [--stock-full-seqs S] [--max-num-seqs M] [--rounds R] [--model PATH]
        [--out DIR]

Prints a table per mode and writes DIR/throughput.json and DIR/throughput.png
(ratio to stock vs budget, and peak running sequences). ``--variants``: the
TOVA variants measured per budget beside the same stock runs, each
``mode[:chunk]`` with mode bulk, chunked or stream (the preset's by default).
Run from the repository root. ``--preset long-context`` measures decode speed on
long contexts with ample KV memory instead (`benchmarks.throughput.long_context`,
its own options).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from pathlib import Path

from benchmarks.throughput import report
from benchmarks.throughput.presets import LLAMA2_7B_SHAPE, PRESETS, Variant, llama2_7b_shaped_model

_OVERRIDES = ("num_requests", "seq_len", "prompt_len", "stock_full_seqs", "max_num_seqs",
              "rounds", "block_size", "stock_block_size", "dtype", "model", "served_num_requests")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--mode", choices=("offline", "served", "both"), default="offline")
    ap.add_argument("--budgets", help="comma-separated TOVA budgets (offline)")
    ap.add_argument("--served-budgets", help="comma-separated TOVA budgets (served)")
    ap.add_argument("--variants", help="comma-separated TOVA variants, mode[:chunk] each "
                    "(e.g. bulk,chunked:64; the first is the JSON's top-level one)")
    ap.add_argument("--target-efficiency", type=float, help="efficiency target reported (not asserted)")
    ap.add_argument("--out", default="benchmarks/throughput/results", help="output folder")
    for name in _OVERRIDES:
        kind = str if name in ("dtype", "model") else int
        ap.add_argument("--" + name.replace("_", "-"), type=kind)
    return ap.parse_args(argv)


def build_preset(args):
    p = PRESETS[args.preset]
    changes = {k: getattr(args, k) for k in _OVERRIDES if getattr(args, k) is not None}
    if args.budgets:
        changes["budgets"] = tuple(int(b) for b in args.budgets.split(","))
    if args.served_budgets:
        changes["served_budgets"] = tuple(int(b) for b in args.served_budgets.split(","))
    if args.variants:
        try:
            changes["variants"] = tuple(Variant.parse(v) for v in args.variants.split(",") if v.strip())
        except ValueError as e:
            raise SystemExit(f"--variants: {e}") from None
    if args.target_efficiency is not None:
        changes["target_efficiency"] = args.target_efficiency
    try:
        p = dataclasses.replace(p, **changes)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if not 0 < p.prompt_len < p.seq_len:
        raise SystemExit(f"--prompt-len must be in 1..seq_len-1 (got {p.prompt_len}, seq_len {p.seq_len})")
    return p


LONG_CONTEXT = "long-context"  # decode speed on long contexts: benchmarks.throughput.long_context


def main(argv=None) -> dict:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(argv):
        if a == f"--preset={LONG_CONTEXT}" or (a == "--preset" and argv[i + 1 : i + 2] == [LONG_CONTEXT]):
            from benchmarks.throughput import long_context

            rest = argv[:i] + argv[i + (1 if "=" in a else 2) :]
            return long_context.main(rest)
    args = parse_args(argv)
    p = build_preset(args)
    # vLLM on the CPU reserves most of the RAM for the KV cache unless told;
    # num_gpu_blocks_override then sets the blocks actually used.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if p.model == LLAMA2_7B_SHAPE:
        model = llama2_7b_shaped_model(out / "model-llama-2-7b-shape")
    else:
        from tova_vllm.models import resolve_model

        model = resolve_model(p.model)
    import torch
    import vllm

    result = {
        "preset": p.name,
        "settings": {**dataclasses.asdict(p), "output_len": p.output_len,
                     "kv_tokens": p.kv_tokens,
                     "num_gpu_blocks_override": {"stock": p.num_gpu_blocks(p.stock_block_size),
                                                 "tova": p.num_gpu_blocks(p.block_size)},
                     "model_path": model, "model_name": Path(model).name},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "vllm": vllm.__version__,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    t0 = time.perf_counter()
    if args.mode in ("offline", "both"):
        from benchmarks.throughput import offline

        result["offline"] = offline.run(p, model)
        result["offline_wall_s"] = round(time.perf_counter() - t0, 1)
    if args.mode in ("served", "both"):
        from benchmarks.throughput import served

        t1 = time.perf_counter()
        result["served"] = served.run(p, model, out)
        result["served_wall_s"] = round(time.perf_counter() - t1, 1)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    json_path, png_path = out / "throughput.json", out / "throughput.png"
    result["json"], result["png"] = str(json_path), str(png_path)
    report.write_json(result, json_path)
    report.plot(result, png_path)
    print(f"\nthroughput, preset '{p.name}': {p.num_requests} requests x {p.seq_len} tokens "
          f"({p.prompt_len} prompt + {p.output_len} output, EOS ignored), {p.dtype}, "
          f"KV cache {p.kv_tokens} tokens (= {p.stock_full_seqs} full sequences; blocks of "
          f"{p.stock_block_size} for stock, {p.block_size} for TOVA), max_num_seqs {p.max_num_seqs}; "
          f"TOVA variants: {', '.join(v.label for v in p.variants)} prompts")
    if "offline" in result:
        print("\noffline (vllm.LLM):\n" + report.offline_table(result["offline"], p.seq_len))
        print(report.targets(result["offline"], p.target_efficiency, p.target_nothing_evicted))
    if "served" in result:
        print("\nserved (vllm serve + vllm bench serve):\n" + report.served_table(result["served"]))
        print(report.targets(result["served"], p.target_efficiency, p.target_nothing_evicted))
    print("\nx stock: output tok/s over the stock runs next to it; effic.: TOVA / ideal "
          "(stock vLLM on sequences only `budget` tokens long at TOVA's peak concurrency, capped at what its KV memory holds at the budget)")
    walls = ", ".join(f"{m} {result[m + '_wall_s']:.0f} s" for m in ("offline", "served") if m in result)
    print(f"total {result['wall_s']:.0f} s ({walls}, engine starts included); JSON {json_path}; plot {png_path}")
    return result


if __name__ == "__main__":
    main()
