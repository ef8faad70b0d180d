"""Long prompts: time to first token and extra peak memory of one request, for
stock vLLM, TOVA with bulk prompts and TOVA with chunked prompts.

    python -m benchmarks.long_prompt [--sizes 2048,4096,8000] [--budget 512]
        [--chunk N] [--rounds R] [--configs stock,bulk,chunked] [--model PATH]
        [--max-num-batched-tokens 2048] [--out benchmarks/results/long_prompt]

One process per configuration (`benchmarks.engine_proc`), each loading its
engine once, in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the engine
core and the worker run in that process, so its RSS covers the model, the KV
cache and every activation). All engines get the same settings:
``max_num_batched_tokens`` (2,048 by default: an 8,000-token prompt is
prefilled in 4 scheduler steps), ``max_model_len`` just above the largest
prompt (the prompt plus its one output token, rounded up to 32), the same KV
memory in tokens (``num_gpu_blocks_override``: one sequence of
``max_model_len`` tokens plus the budget, as TOVA with prefix caching holds a
bulk prompt's region and its kept slots at the prompt's end; blocks of 32 for
stock, the smallest vLLM's CPU attention takes, and 16 for TOVA), float32,
``enforce_eager``, and vLLM's default prefix caching (on; what each engine
actually ran with is in the JSON and the table; ``--no-prefix-caching`` turns it
off everywhere). Every prompt is unique, so the cache never hits. The
configurations:

- ``stock``: stock vLLM;
- ``bulk``: ``kv_policy="tova", kv_budget=B`` (``kv_prompt_mode="bulk"``: full
  causal attention over the prompt, then the policy keeps B tokens);
- ``chunked``: the same with ``kv_prompt_mode="chunked"``,
  ``kv_prompt_chunk=C`` (C = B by default): the prompt in chunks of C tokens,
  the cache reduced to B after each.

Each engine first serves one warm-up request per size (not measured: first
calls at a shape pay one-off costs). Then the measured requests ALTERNATE
between the configurations: per round, per size, one request to each
(the configurations' order rotates from round to round), so load drifts on a
shared machine hit every configuration alike. A request is one prompt of N
tokens with ``max_tokens=1``:

- TTFT: wall time from its submission (``LLMEngine.add_request``) to the
  engine step that returned its first token;
- extra peak memory: the engine process's peak RSS during the request
  (VmHWM, reset just before it by writing "5" to /proc/self/clear_refs) less
  its RSS just before it (after ``gc.collect()`` and glibc's
  ``malloc_trim(0)``, so every request starts from a comparable baseline;
  the KV cache is allocated and zeroed at engine start, so it is in the
  baseline: what is extra is the prompt's activations and work buffers).

Prompts are random token ids (ids 100..9,999 of the tokenizer, seeded), with
a first token unique to the request, so no two requests share a prefix and
stock's prefix cache never hits; in a round the three configurations get the
same prompt of a size. Per configuration and size the report gives the median
over the rounds (every value is in the JSON), the ratios TOVA / stock of the
medians, and the targets: at the largest size (8,000 tokens by default) TOVA
bulk's TTFT at most 1.15x stock's, and TOVA's extra peak memory at most 1.2x
stock's (bulk, and chunked).

Outputs in ``--out``: long_prompt.json, long_prompt.png (TTFT and extra peak
memory vs prompt length, one line per configuration), long_prompt.md (the
table, also printed).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.engine_proc import EngineProcess, engine_env, machine_info, ratio, start_engines, write_report

CONFIGS = ("stock", "bulk", "chunked")
TARGET_TTFT = 1.15  # TOVA bulk / stock at the largest size
TARGET_MEMORY = 1.2  # TOVA / stock, extra peak memory at the largest size


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.long_prompt", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=_ints, default=(2048, 4096, 8000), help="prompt lengths (tokens)")
    ap.add_argument("--budget", type=int, default=512, help="TOVA's kv_budget")
    ap.add_argument("--chunk", type=int, default=None, help="kv_prompt_chunk of the chunked configuration "
                    "(default: the budget)")
    ap.add_argument("--rounds", type=int, default=2, help="measured requests per configuration and size")
    ap.add_argument("--configs", type=lambda s: tuple(x for x in s.split(",") if x), default=CONFIGS,
                    help=f"comma-separated, from {','.join(CONFIGS)} (stock is needed for the ratios)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=16, help="TOVA's KV block size")
    ap.add_argument("--stock-block-size", type=int, default=32,
                    help="stock's KV block size (vLLM's CPU attention takes multiples of 32)")
    ap.add_argument("--no-prefix-caching", action="store_true",
                    help="enable_prefix_caching=False in every engine (default: vLLM's default, on)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the warm-up request per size")
    ap.add_argument("--pause", type=float, default=0.5, help="seconds between two requests (lets the "
                    "previous process's OpenMP threads go idle)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--model", default=None, help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/long_prompt"))
    args = ap.parse_args(argv)
    bad = [c for c in args.configs if c not in CONFIGS]
    if bad or not args.configs:
        ap.error(f"--configs: unknown {bad}; allowed: {', '.join(CONFIGS)}")
    if not args.sizes or min(args.sizes) < 2:
        ap.error("--sizes: positive prompt lengths of at least 2 tokens")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    args.chunk = args.chunk or args.budget
    return args


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def settings(args) -> dict[str, Any]:
    import math

    max_model_len = _round_up(max(args.sizes) + 1, 32)
    unit = math.lcm(args.block_size, args.stock_block_size)
    # A bulk prompt with prefix caching holds its prompt region plus the kept
    # slots at its last token; the same pool (in tokens) for every engine.
    kv_tokens = _round_up(max_model_len + args.budget, unit)
    return {"sizes": list(args.sizes), "budget": args.budget, "chunk": args.chunk, "rounds": args.rounds,
            "configs": list(args.configs), "max_num_batched_tokens": args.max_num_batched_tokens,
            "max_model_len": max_model_len, "kv_tokens": kv_tokens, "block_size": args.block_size,
            "stock_block_size": args.stock_block_size, "dtype": args.dtype, "warmup": not args.no_warmup,
            "pause_s": args.pause, "seed": args.seed, "max_tokens": 1,
            "prefix_caching": "off" if args.no_prefix_caching else "vLLM default",
            "prompts": "random token ids in [100, 10000), a first token unique per request (no shared prefix)"}


def engine_kwargs(config: str, s: dict[str, Any], model: str) -> dict[str, Any]:
    block = s["stock_block_size"] if config == "stock" else s["block_size"]
    kw: dict[str, Any] = dict(
        model=model, dtype=s["dtype"], max_model_len=s["max_model_len"], block_size=block,
        num_gpu_blocks_override=s["kv_tokens"] // block + 1,  # +1: vLLM's null block
        max_num_batched_tokens=s["max_num_batched_tokens"], max_num_seqs=4,
        enable_chunked_prefill=True, enforce_eager=True, seed=0,
    )
    if s["prefix_caching"] == "off":
        kw["enable_prefix_caching"] = False
    if config != "stock":
        kw.update(kv_policy="tova", kv_budget=s["budget"], kv_prompt_mode=config)
        if config == "chunked":
            kw["kv_prompt_chunk"] = s["chunk"]
    return kw


def prompt(size: int, serial: int, seed: int) -> list[int]:
    """Random ids; the first token is unique per `serial` (no shared prefix)."""
    rng = random.Random(seed * 1_000_003 + serial)
    return [100 + serial % 9_900] + [rng.randrange(100, 10_000) for _ in range(size - 1)]


def _one(engine: EngineProcess, ids: list[int], rid: str) -> dict[str, Any]:
    out = engine.generate([{"id": rid, "prompt_token_ids": ids, "max_tokens": 1}], measure_memory=True)
    req = out["requests"][0]
    return {"ttft_s": req["ttft_s"], "e2e_s": req["e2e_s"], "peak_kv_blocks": req["peak_kv_blocks"],
            "num_cached_tokens": req["num_cached_tokens"], **out["memory"]}


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def summarize(s: dict[str, Any], raw: dict[str, dict[int, list[dict]]]) -> dict[str, Any]:
    per: dict[str, list[dict]] = {}
    for config, sizes in raw.items():
        rows = []
        for size in s["sizes"]:
            runs = sizes[size]
            rows.append({
                "size": size,
                "ttft_s": _median([r["ttft_s"] for r in runs]),
                "ttft_s_min": min(r["ttft_s"] for r in runs),
                "ttft_s_max": max(r["ttft_s"] for r in runs),
                "extra_peak_mib": _median([r["extra_peak_mib"] for r in runs]),
                "extra_peak_mib_max": max(r["extra_peak_mib"] for r in runs),
                "rss_before_mib": _median([r["rss_before_mib"] for r in runs]),
                "peak_kv_blocks": max((r["peak_kv_blocks"] or 0 for r in runs), default=0) or None,
                "runs": runs,
            })
        per[config] = rows
    ratios: dict[str, list[dict]] = {}
    if "stock" in per:
        for config in per:
            if config == "stock":
                continue
            ratios[config] = [{
                "size": t["size"],
                "ttft": ratio(t["ttft_s"], st["ttft_s"]),
                "extra_peak_memory": ratio(t["extra_peak_mib"], st["extra_peak_mib"]),
            } for t, st in zip(per[config], per["stock"])]
    largest = max(s["sizes"])
    targets = []

    def at_largest(config: str, key: str) -> float | None:
        for r in ratios.get(config, []):
            if r["size"] == largest:
                return r[key]
        return None

    checks = [("bulk", "ttft", TARGET_TTFT, "TTFT, TOVA bulk / stock"),
              ("bulk", "extra_peak_memory", TARGET_MEMORY, "extra peak memory, TOVA bulk / stock"),
              ("chunked", "extra_peak_memory", TARGET_MEMORY, "extra peak memory, TOVA chunked / stock")]
    for config, key, limit, what in checks:
        if config not in ratios:
            continue
        value = at_largest(config, key)
        targets.append({"what": f"{what} at {largest} tokens", "config": config, "metric": key,
                        "size": largest, "value": value, "limit": limit,
                        "met": None if value is None else value <= limit})
    return {"per_config": per, "ratios_vs_stock": ratios, "targets": targets}


LABELS = {"stock": "stock vLLM", "bulk": "TOVA bulk", "chunked": "TOVA chunked"}


def _label(config: str, s: dict[str, Any]) -> str:
    if config == "stock":
        return LABELS[config]
    extra = f", chunk {s['chunk']}" if config == "chunked" else ""
    return f"{LABELS[config]} (budget {s['budget']}{extra})"


def markdown(result: dict[str, Any]) -> str:
    s, summ = result["settings"], result["summary"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = [
        f"Long prompts: one request, max_tokens=1, {s['rounds']} round(s) (medians), "
        f"max_num_batched_tokens {s['max_num_batched_tokens']}, max_model_len {s['max_model_len']}, "
        f"{s['dtype']}, model {result['model_name']}; prefix caching as the engines ran: "
        + ", ".join(f"{c} {'on' if e.get('enable_prefix_caching') else 'off'}"
                    for c, e in result.get("engines", {}).items()) + ".",
        "",
        "| config | prompt | TTFT s | x stock | extra peak MiB | x stock | peak KV blocks |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = summ["ratios_vs_stock"]
    for config, rows in summ["per_config"].items():
        for i, row in enumerate(rows):
            r = ratios.get(config, [{}] * len(rows))[i] if config != "stock" else {"ttft": 1.0,
                                                                                      "extra_peak_memory": 1.0}
            lines.append(f"| {_label(config, s)} | {row['size']} | {fmt(row['ttft_s'], '.3f')} | "
                         f"{fmt(r.get('ttft'), '.2f')} | {fmt(row['extra_peak_mib'], '.1f')} | "
                         f"{fmt(r.get('extra_peak_memory'), '.2f')} | {fmt(row['peak_kv_blocks'], 'd')} |")
    if summ["targets"]:
        lines += ["", "| target | value | limit | met |", "|---|---:|---:|---|"]
        for t in summ["targets"]:
            met = "-" if t["met"] is None else ("met" if t["met"] else "not met")
            lines.append(f"| {t['what']} | {fmt(t['value'], '.2f')} | <= {t['limit']:.2f} | {met} |")
    lines += ["", "TTFT: submission to first token. Extra peak memory: the engine process's peak RSS "
              "during the request over its RSS just before it (VmHWM reset via /proc/self/clear_refs). "
              f"Peak KV blocks: the most the request held at once (TOVA, blocks of {s['block_size']} "
              f"tokens; stock, not shown, holds ceil(prompt / {s['stock_block_size']}))."]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, per = result["settings"], result["summary"]["per_config"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    markers = {"stock": "o", "bulk": "s", "chunked": "^"}
    for config, rows in per.items():
        x = [r["size"] for r in rows]
        a1.plot(x, [r["ttft_s"] for r in rows], marker=markers[config], label=_label(config, s))
        a2.plot(x, [r["extra_peak_mib"] for r in rows], marker=markers[config], label=_label(config, s))
    a1.set_ylabel("time to first token (s)")
    a2.set_ylabel("extra peak RSS over the loaded engine (MiB)")
    for ax in (a1, a2):
        ax.set_xlabel("prompt length (tokens)")
        ax.set_xticks(s["sizes"])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"tova-vllm long prompts, {result['model_name']}, max_num_batched_tokens "
                 f"{s['max_num_batched_tokens']}, medians of {s['rounds']} round(s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    s = settings(args)
    from tova_vllm.models import resolve_model

    model = resolve_model(args.model)
    kv_gib = -(-s["kv_tokens"] * 64 * 1024 // (1 << 30)) + 1  # generous: < 64 KiB per token here
    engine_env(kv_gib)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    engines: dict[str, EngineProcess] = {}
    serial = 0
    raw: dict[str, dict[int, list[dict]]] = {c: {n: [] for n in s["sizes"]} for c in args.configs}
    warmup: dict[str, list[dict]] = {c: [] for c in args.configs}
    try:
        # loaded at once; nothing is measured while they load
        start_engines({c: engine_kwargs(c, s, model) for c in args.configs}, engines)
        if not args.no_warmup:
            for size in s["sizes"]:
                serial += 1
                for config in args.configs:
                    r = _one(engines[config], prompt(size, serial, args.seed), f"warmup-{size}")
                    warmup[config].append({"size": size, **r})
                    print(f"[long_prompt] warm-up {config:8s} {size:6d} tokens: TTFT {r['ttft_s']:.3f} s, "
                          f"extra peak {r['extra_peak_mib']:.1f} MiB", flush=True)
        for rnd in range(args.rounds):
            order = list(args.configs[rnd % len(args.configs):]) + list(args.configs[:rnd % len(args.configs)])
            for size in s["sizes"]:
                serial += 1
                ids = prompt(size, serial, args.seed)
                for config in order:
                    time.sleep(args.pause)
                    r = _one(engines[config], ids, f"r{rnd}-{size}")
                    raw[config][size].append({"round": rnd, **r})
                    print(f"[long_prompt] round {rnd + 1}/{args.rounds} {config:8s} {size:6d} tokens: "
                          f"TTFT {r['ttft_s']:.3f} s, extra peak {r['extra_peak_mib']:.1f} MiB "
                          f"(RSS before {r['rss_before_mib']:.0f} MiB)", flush=True)
        infos = {c: e.call("info") | {"load_s": e.info["load_s"]} for c, e in engines.items()}
    finally:
        for e in engines.values():
            e.close()
    result = {
        "benchmark": "long_prompt",
        "settings": s,
        "model_path": model,
        "model_name": Path(model).name,
        "machine": machine_info(),
        "engines": infos,
        "engine_kwargs": {c: engine_kwargs(c, s, model) for c in args.configs},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "warmup": warmup,
        "summary": summarize(s, raw),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    return write_report(result, out, "long_prompt", markdown, plot)


if __name__ == "__main__":
    main()
