"""Per-decode-step time of vLLM + TOVA vs stock vLLM, same batch and context.

    python benchmarks/decode_step.py [--model PATH] [--batch 16] [--prompt 256]
        [--steps 64] [--budgets 64,1024] [--profile]

For each configuration (stock, then TOVA at each budget), runs the same batch of
prompts twice: with 1 output token (prefill only) and with 1 + steps tokens; the
difference divided by ``steps`` is the time of one decode step for the whole
batch. A budget >= prompt + steps evicts nothing; a smaller one evicts every
step. ``--profile`` runs the engine in-process and prints where a TOVA decode
step spends its time (cProfile, by function).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time


def _engine(model, policy_kwargs, args):
    from vllm import LLM

    return LLM(
        model=model,
        dtype="float32",
        max_model_len=args.prompt + args.steps + 16,
        enforce_eager=True,
        seed=0,
        max_num_seqs=max(args.batch, 1),
        max_num_batched_tokens=max(args.batch * args.prompt, 2048),
        **policy_kwargs,
    )


def _prompts(llm, args):
    tok = llm.get_tokenizer()
    text = ("The history of the printing press begins with movable type, ink and paper, "
            "and continues through many inventions across centuries. ") * 64
    ids = tok(text, add_special_tokens=False).input_ids
    return [{"prompt_token_ids": ids[i : i + args.prompt]} for i in range(args.batch)]


def _time(llm, prompts, max_tokens) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start


def measure(model, label, policy_kwargs, args) -> dict:
    llm = _engine(model, policy_kwargs, args)
    prompts = _prompts(llm, args)
    _time(llm, prompts, 2)  # warm-up
    prefill = min(_time(llm, prompts, 1) for _ in range(2))
    full = min(_time(llm, prompts, 1 + args.steps) for _ in range(2))
    step_ms = 1000 * (full - prefill) / args.steps
    result = {"config": label, "decode_step_ms": round(step_ms, 2),
              "output_tok_per_s": round(args.batch * 1000 / step_ms, 1)}
    if args.profile and policy_kwargs:
        result["profile"] = _profile(llm, prompts, args)
    llm.llm_engine.engine_core.shutdown()
    del llm
    return result


def _profile(llm, prompts, args) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    _time(llm, prompts, 1 + args.steps)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(14)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--budgets", default="64,1024", help="comma-separated TOVA budgets")
    parser.add_argument("--policy", default="tova")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    if args.profile:
        # The engine in this process, so cProfile sees the attention backend.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from tova_vllm.models import resolve_model

    model = resolve_model(args.model)
    results = [measure(model, "stock", {}, args)]
    for budget in [int(b) for b in args.budgets.split(",")]:
        evicts = budget < args.prompt + args.steps
        label = f"{args.policy} budget={budget} ({'evicting' if evicts else 'nothing evicted'})"
        results.append(measure(model, label, {"kv_policy": args.policy, "kv_budget": budget}, args))
    stock = results[0]["decode_step_ms"]
    print(f"\nbatch {args.batch}, prompt {args.prompt}, {args.steps} decode steps, float32")
    print(f"{'config':40s} {'step ms':>9s} {'tok/s':>8s} {'x stock time':>12s}")
    for r in results:
        print(f"{r['config']:40s} {r['decode_step_ms']:9.2f} {r['output_tok_per_s']:8.1f} "
              f"{r['decode_step_ms'] / stock:12.2f}")
    for r in results:
        if "profile" in r:
            print(f"\n--- profile: {r['config']} ---\n{r['profile']}")
    print(json.dumps([{k: v for k, v in r.items() if k != "profile"} for r in results]))


if __name__ == "__main__":
    main()
