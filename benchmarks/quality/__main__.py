"""Quality vs KV budget for the full cache and every registered policy (tova,
window, sink, h2o, keydiff, ...) through vLLM; TOVA also with chunked prompts.

    python -m benchmarks.quality                 # CPU default (<= 20 min on 2 cores)
    python -m benchmarks.quality --model PATH    # any HF model
    python -m benchmarks.quality --preset smoke  # a minute or two, for CI

One engine serves every configuration at once: it runs with the largest budget,
and each request carries its own policy and budget (`extra_args`, the OpenAI
API's `vllm_xargs`). Perplexity requests stream their text (eviction after
every token, so each token is predicted from the compressed cache); the
transformers reference scores a prefix of the first text under the smallest
budget as a cross-check. Outputs land in --out: quality.json, quality.png,
quality.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from benchmarks.quality import data, evaluate, report

PRESETS = {
    # Sized for 2 CPU cores (float32 embedded model).
    "cpu": dict(context=2048, num_sequences=1, fractions=(32, 16, 8, 4, 2), retrieval_context=1024,
                retrieval_fractions=(16, 8, 4, 2), depths=(0.1, 0.5, 0.9), seeds=2, check_tokens=256),
    # For CI: proves the pipeline end to end in a couple of minutes.
    "smoke": dict(context=256, num_sequences=1, fractions=(8, 2), retrieval_context=160,
                  retrieval_fractions=(4,), depths=(0.5,), seeds=1, check_tokens=96),
    # For a GPU and a 7B model: the paper's shape (PG-19-like 4k contexts).
    "gpu": dict(context=4096, num_sequences=8, fractions=(32, 16, 8, 4, 2), retrieval_context=4096,
                retrieval_fractions=(16, 8, 4, 2), depths=(0.1, 0.3, 0.5, 0.7, 0.9), seeds=4, check_tokens=0),
}

def _policies() -> tuple[str, ...]:
    from tova_vllm.policies import policy_names

    return policy_names()


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="sizes (default: cpu)")
    ap.add_argument("--model", default=None, help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--context", type=int, help="tokens per perplexity text (overrides the preset)")
    ap.add_argument("--num-sequences", type=int, help="perplexity texts (overrides the preset)")
    ap.add_argument("--fractions", type=lambda s: tuple(int(x) for x in s.split(",")),
                    help="budgets as context/N, e.g. 32,16,8,4,2 (1/1 is the full cache)")
    ap.add_argument("--policies", type=lambda s: tuple(s.split(",")), default=_policies(),
                    help=f"comma-separated, from the registered policies ({','.join(_policies())})")
    ap.add_argument("--chunked-policies", type=lambda s: tuple(x for x in s.split(",") if x), default=("tova",),
                    help="policies also measured with kv_prompt_mode=chunked (chunks of the budget): "
                    "passkey prompts, and perplexity with each token predicted from the kept budget "
                    "plus its chunk so far (default: tova; '' for none)")
    ap.add_argument("--no-retrieval", action="store_true", help="skip the passkey task")
    ap.add_argument("--retrieval-prompt-mode", choices=("bulk", "stream"), default="bulk",
                    help="how passkey prompts are processed (bulk: the engine's default for requests)")
    ap.add_argument("--check-tokens", type=int, help="tokens the transformers reference scores (0: skip)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/quality"))
    args = ap.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for flag, given in (("--policies", args.policies), ("--chunked-policies", args.chunked_policies)):
        unknown = [p for p in given if p not in _policies()]
        if unknown:
            ap.error(f"{flag}: unknown {unknown}; allowed: {', '.join(_policies())}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer
    from vllm import LLM

    from tova_vllm.models import resolve_model

    t0 = time.time()
    model = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(model)
    budgets = [args.context // f for f in args.fractions]
    r_budgets = [args.retrieval_context // f for f in args.retrieval_fractions]
    sequences = data.token_sequences(tok, args.context, args.num_sequences)
    passkeys = [data.passkey_prompt(tok, args.retrieval_context, d, seed=1000 * s + i)
                for s in range(args.seeds) for i, d in enumerate(args.depths)]
    longest = max([args.context] + [len(ids) for ids, _ in passkeys])
    engine_budget = longest
    print(f"model {model}; {len(sequences)} texts of {args.context} tokens "
          f"({', '.join(n for n, _ in sequences)}); budgets {budgets}", flush=True)
    llm = LLM(
        model=model, dtype=args.dtype, max_model_len=longest + 16, enforce_eager=True, seed=0,
        kv_policy="tova", kv_budget=engine_budget, max_num_seqs=64,
        # Every request shares each step (their streamed tokens run as batched
        # waves); chunks of 128 tokens keep prompt-logprob logits small.
        max_num_batched_tokens=8192, long_prefill_token_threshold=128,
    )
    results: dict = {"settings": {
        "model": model, "dtype": args.dtype, "context": args.context, "num_sequences": len(sequences),
        "texts": [n for n, _ in sequences], "budgets": budgets, "policies": list(args.policies),
        "rows": [*args.policies, *(evaluate.row_name(p, evaluate.CHUNKED) for p in args.chunked_policies)],
        "retrieval_context": args.retrieval_context, "retrieval_budgets": r_budgets,
        "depths": list(args.depths), "retrieval_prompt_mode": args.retrieval_prompt_mode,
        "preset": args.preset,
    }}
    def configs_for(bs):
        return [evaluate.Config(evaluate.FULL, None)] + [
            evaluate.Config(p, b) for p in args.policies for b in bs] + [
            evaluate.Config(p, b, evaluate.CHUNKED) for p in args.chunked_policies for b in bs]

    configs = configs_for(budgets)
    t = time.time()
    nlls = evaluate.perplexity_nlls(llm, [ids for _, ids in sequences], configs, engine_budget)
    ppl = {"full": evaluate.perplexity(nlls[evaluate.FULL])}
    for c in configs[1:]:
        ppl.setdefault(c.row, {str(args.context): ppl["full"]})[str(c.budget)] = evaluate.perplexity(nlls[c.label])
    results["perplexity"] = ppl
    results["timing_s"] = {"perplexity": round(time.time() - t, 1)}
    if not args.no_retrieval:
        t = time.time()
        r_configs = configs_for(r_budgets)
        acc = evaluate.retrieval(llm, passkeys, r_configs, engine_budget, args.retrieval_prompt_mode)
        results["retrieval"] = {"full": acc[evaluate.FULL], "trials": len(passkeys)}
        for c in r_configs[1:]:
            results["retrieval"].setdefault(c.row, {})[str(c.budget)] = acc[c.label]
        results["timing_s"]["retrieval"] = round(time.time() - t, 1)
    llm.llm_engine.engine_core.shutdown()
    del llm
    if args.check_tokens:
        t = time.time()
        check = [evaluate.Config(p, min(budgets)) for p in args.policies]
        results["reference_check"] = evaluate.reference_check(
            model, sequences[0][1][: args.check_tokens], check, nlls)
        results["timing_s"]["reference_check"] = round(time.time() - t, 1)
    results["tova_vs_baselines"] = report.tova_vs_baselines(results)
    results["timing_s"]["total"] = round(time.time() - t0, 1)
    paths = report.write(results, args.out)
    print()
    print(report.markdown(results))
    if "reference_check" in results:
        print("Cross-check against the transformers reference (per-token NLL):")
        for label, c in results["reference_check"].items():
            print(f"  {label}: {c['tokens']} tokens, mean NLL vLLM {c['mean_nll_vllm']:.5f} vs reference "
                  f"{c['mean_nll_reference']:.5f}; max |diff| {c['max_abs_token_diff']:.2e}")
    print(f"TOVA <= sink and h2o at every budget: "
          f"{all(v['tova_best_of_sink_h2o'] for v in results['tova_vs_baselines'].values())}")
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {results['timing_s']['total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
