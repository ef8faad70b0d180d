"""Decode speed on long contexts, KV memory ample: TOVA against stock vLLM and
against the ideal (stock on contexts as long as the budget), in one run.

    python -m benchmarks.throughput --preset long-context [--rounds 2]
        [--budgets 256,512] [--model PATH] [--out DIR]
    (the same as: python -m benchmarks.throughput.long_context ...)

A request that keeps ``k`` tokens should decode about as fast as a request
whose whole context is ``k`` tokens long: on a CPU decode is bound by the
memory it reads. Two workloads, every request submitted at once, EOS ignored:

- ``distinct``: ``--contexts`` (8) requests with distinct random prompts of
  ``--context-len`` (3,000) tokens, ``--output-len`` (64) tokens each;
- ``shared``: ``--shared-requests`` (16) requests sharing a
  ``--prefix-len`` (1,400)-token prefix, plus ``--suffix-len`` (32) tokens of
  their own, ``--output-len`` tokens each; prefix caching on (stock's
  default; requested explicitly for TOVA), the prefix cached by one request
  before the timed batch.

Configurations, one process each (`benchmarks.engine_proc`, in-process engine,
float32, ``enforce_eager``, the same ``max_num_seqs`` and batched tokens, KV
memory for every request's whole sequence so nothing is ever preempted):
``stock``; ``tova b=K`` for each budget; ``ideal b=K``: stock on
``--contexts`` distinct prompts of ``K`` tokens (distinct workload only).
What is timed: decode tokens per second over the decode steps only, from the
step after every request's prefill to the last token (`engine_proc.
decode_rate`); the configurations alternate round by round. Reported: the
median over ``--rounds`` of each figure, the ratios TOVA / stock and TOVA /
ideal. Targets (reported, never asserted): TOVA at least 0.9 of the ideal on
distinct contexts, at least 1.0x stock on the shared prefix at the smallest
budget. Outputs in ``--out``: long_context.json, long_context.md (printed),
long_context.png.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.engine_proc import EngineProcess, engine_env, machine_info, ratio, start_engines, write_report

TARGET_VS_IDEAL = 0.9
TARGET_SHARED_VS_STOCK = 1.0
STOCK_BLOCK, TOVA_BLOCK = 32, 16  # vLLM's CPU attention takes multiples of 32


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="256,512", help="comma-separated TOVA budgets")
    ap.add_argument("--contexts", type=int, default=8)
    ap.add_argument("--context-len", type=int, default=3000)
    ap.add_argument("--shared-requests", type=int, default=16)
    ap.add_argument("--prefix-len", type=int, default=1400)
    ap.add_argument("--suffix-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workloads", default="distinct,shared")
    ap.add_argument("--model", default=None, help="HF model folder (default: the embedded model)")
    ap.add_argument("--out", default="benchmarks/results/long_context")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if set(args.workloads) - {"distinct", "shared"} or not args.workloads:
        raise SystemExit("--workloads: distinct, shared or both")
    return args


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def _ids(rng: random.Random, n: int, first: int | None = None) -> list[int]:
    ids = [rng.randrange(100, 10_000) for _ in range(n)]
    if first is not None:
        ids[0] = first
    return ids


def workloads(args) -> dict[str, Any]:
    """The requests of every workload (the same for every configuration)."""
    rng = random.Random(args.seed)
    out = lambda rid, ids: {"id": rid, "prompt_token_ids": ids, "max_tokens": args.output_len}  # noqa: E731
    prefix = _ids(rng, args.prefix_len)
    return {
        "distinct": [out(f"c{i}", _ids(rng, args.context_len, 10_000 + i)) for i in range(args.contexts)],
        "shared_warm": [out("warm", prefix + _ids(rng, args.suffix_len, 20_000))],
        "shared": [out(f"s{i}", prefix + _ids(rng, args.suffix_len, 30_000 + i)) for i in range(args.shared_requests)],
        "ideal": {
            b: [out(f"i{i}", _ids(random.Random(args.seed * 31 + b), b, 40_000 + i)) for i in range(args.contexts)]
            for b in args.budgets
        },
    }


def engine_kwargs(config: str, args, model: str) -> dict[str, Any]:
    longest = max(args.context_len, args.prefix_len + args.suffix_len) + args.output_len
    requests = max(args.contexts, args.shared_requests + 1)
    block = STOCK_BLOCK if not config.startswith("tova") else TOVA_BLOCK
    max_len = _round_up(longest, STOCK_BLOCK)
    if config.startswith("ideal"):
        max_len = _round_up(int(config.split("=")[1]) + args.output_len, STOCK_BLOCK)
    kw: dict[str, Any] = dict(
        model=model, dtype="float32", max_model_len=max_len, block_size=block, seed=0, enforce_eager=True,
        # Every request's whole sequence fits (nothing preempted), plus a spare request.
        num_gpu_blocks_override=(requests + 1) * -(-max_len // block) + 1,
        max_num_seqs=requests, max_num_batched_tokens=2048, enable_chunked_prefill=True,
    )
    if config.startswith("tova"):
        kw.update(kv_policy="tova", kv_budget=int(config.split("=")[1]), enable_prefix_caching=True)
    return kw


def configs(args) -> list[str]:
    out = ["stock", *(f"tova b={b}" for b in args.budgets)]
    if "distinct" in args.workloads:
        out += [f"ideal b={b}" for b in args.budgets]
    return out


def run(args, model: str) -> dict[str, Any]:
    reqs = workloads(args)
    names = configs(args)
    engines: dict[str, EngineProcess] = {}
    raw: dict[str, dict[str, list[dict]]] = {c: {} for c in names}
    try:
        start_engines({c: engine_kwargs(c, args, model) for c in names}, engines)
        for c in names:  # warm-up: first calls pay one-off costs
            engines[c].decode_rate(reqs["ideal"][args.budgets[0]][:2] if c.startswith("ideal") else reqs["distinct"][:1])
        for rnd in range(args.rounds):
            for c in names:
                if c.startswith("ideal"):
                    todo = {"distinct": reqs["ideal"][int(c.split("=")[1])]}
                else:
                    todo = {}
                    if "distinct" in args.workloads:
                        todo["distinct"] = reqs["distinct"]
                    if "shared" in args.workloads:
                        if rnd == 0:
                            engines[c].decode_rate(reqs["shared_warm"])  # caches the prefix
                        todo["shared"] = reqs["shared"]
                for w, r in todo.items():
                    res = engines[c].decode_rate(r)
                    raw[c].setdefault(w, []).append(res)
                    print(f"[round {rnd + 1}] {c:>12} {w:>8}: {res['decode_tok_s']:8.1f} decode tok/s", flush=True)
        info = {c: e.info for c, e in engines.items()}
    finally:
        for e in engines.values():
            e.close()
    return {"raw": raw, "engines": info}


def summarize(args, raw: dict[str, Any]) -> dict[str, Any]:
    med = {
        c: {w: statistics.median(r["decode_tok_s"] for r in runs) for w, runs in per.items()}
        for c, per in raw["raw"].items()
    }
    rows = []
    for w in args.workloads:
        stock = med["stock"].get(w)
        rows.append({"workload": w, "config": "stock", "decode_tok_s": stock, "vs_stock": 1.0, "vs_ideal": None})
        for b in args.budgets:
            tova = med[f"tova b={b}"].get(w)
            ideal = med.get(f"ideal b={b}", {}).get("distinct") if w == "distinct" else None
            rows.append({"workload": w, "config": f"tova b={b}", "decode_tok_s": tova,
                         "vs_stock": ratio(tova, stock), "vs_ideal": ratio(tova, ideal)})
        if w == "distinct":
            for b in args.budgets:
                ideal = med[f"ideal b={b}"]["distinct"]
                rows.append({"workload": w, "config": f"ideal b={b}", "decode_tok_s": ideal,
                             "vs_stock": ratio(ideal, stock), "vs_ideal": 1.0})
    targets = []
    for r in rows:
        if r["config"].startswith("tova") and r["workload"] == "distinct" and r["vs_ideal"] is not None:
            targets.append({"what": f"distinct, {r['config']} / ideal", "target": TARGET_VS_IDEAL,
                            "value": r["vs_ideal"], "met": r["vs_ideal"] >= TARGET_VS_IDEAL})
    if "shared" in args.workloads:
        b = min(args.budgets)
        r = next(r for r in rows if r["workload"] == "shared" and r["config"] == f"tova b={b}")
        targets.append({"what": f"shared prefix, tova b={b} / stock", "target": TARGET_SHARED_VS_STOCK,
                        "value": r["vs_stock"], "met": (r["vs_stock"] or 0) >= TARGET_SHARED_VS_STOCK})
    return {"rows": rows, "targets": targets}


def markdown(result: dict[str, Any]) -> str:
    a = result["settings"]
    lines = [
        f"Decode tokens/s (median of {a['rounds']} rounds; decode steps only, every prefill done first; "
        f"KV memory ample): distinct = {a['contexts']} x {a['context_len']}-token contexts, shared = "
        f"{a['shared_requests']} x ({a['prefix_len']} shared + {a['suffix_len']}) tokens, prefix caching on; "
        f"{a['output_len']} tokens each; ideal = stock on {a['contexts']} budget-long contexts.",
        "",
        "| workload | config | decode tok/s | x stock | x ideal |",
        "|---|---|---:|---:|---:|",
    ]
    fmt = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    for r in result["summary"]["rows"]:
        lines.append(f"| {r['workload']} | {r['config']} | {fmt(r['decode_tok_s'], 1)} | {fmt(r['vs_stock'])} | "
                     f"{fmt(r['vs_ideal'])} |")
    lines.append("")
    for t in result["summary"]["targets"]:
        lines.append(f"- {t['what']}: {fmt(t['value'])} (target >= {t['target']}: {'met' if t['met'] else 'NOT met'})")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["summary"]["rows"]
    workloads_ = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(workloads_), figsize=(5.5 * len(workloads_), 3.8), squeeze=False)
    colors = {"stock": "#555555", "tova": "#1f77b4", "ideal": "#2ca02c"}
    for ax, w in zip(axes[0], workloads_):
        sel = [r for r in rows if r["workload"] == w]
        labels = [r["config"] for r in sel]
        values = [r["decode_tok_s"] or 0 for r in sel]
        bars = ax.bar(range(len(sel)), values, color=[colors[lbl.split()[0]] for lbl in labels])
        for bar, r in zip(bars, sel):
            note = f"{r['vs_stock']:.2f}x" if r["vs_stock"] is not None else ""
            if r["config"].startswith("tova") and r["vs_ideal"] is not None:
                note += f"\n{r['vs_ideal']:.2f} of ideal"
            ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=8)
        ax.set_xticks(range(len(sel)), labels, rotation=20)
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"{w} contexts" if w == "distinct" else "shared prefix")
        ax.set_ylim(0, max(values) * 1.3 if values else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    engine_env(kv_cache_space_gib=2)
    from tova_vllm.models import default_model

    model = args.model or default_model()
    t0 = time.perf_counter()
    raw = run(args, model)
    settings = {k: getattr(args, k) for k in ("budgets", "contexts", "context_len", "shared_requests", "prefix_len",
                                              "suffix_len", "output_len", "rounds", "workloads")}
    result = {"settings": settings, "model": model, "machine": machine_info(), "wall_s": time.perf_counter() - t0,
              **raw}
    result["summary"] = summarize(args, raw)
    return write_report(result, Path(args.out), "long_context", markdown, plot)


if __name__ == "__main__":
    main()
