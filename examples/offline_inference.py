"""Offline batch inference with TOVA on the embedded model (or any HF model).

    python examples/offline_inference.py [--model PATH] [--policy tova] [--budget 64]

Prints each output and the number of KV blocks its request held at the end.
"""

from __future__ import annotations

import argparse
import os

PROMPTS = [
    "The capital of France is",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain, step by step, how a bill becomes a law in the United States.",
    "List five facts about the planet Mars and explain why each one matters for "
    "a future human mission, including the atmosphere, gravity, temperature, "
    "radiation and the availability of water.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF model path (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--policy", default="tova", help="kv_policy: tova, window, sink or h2o")
    parser.add_argument("--budget", type=int, default=64, help="kv_budget: tokens kept per layer per sequence")
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()

    # CPU: give the KV cache an explicit size; by default vLLM reserves most of RAM.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    from tova_vllm.inspect import blocks_at_release
    from tova_vllm.models import resolve_model

    llm = LLM(
        model=resolve_model(args.model),
        dtype="float32",
        max_model_len=2048,
        kv_policy=args.policy,
        kv_budget=args.budget,
    )
    tokenizer = llm.get_tokenizer()
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in PROMPTS
    ]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    for question, out in zip(PROMPTS, outputs):
        n_tokens = len(out.prompt_token_ids) + len(out.outputs[0].token_ids)
        blocks = blocks_at_release(llm, out.request_id)
        print("=" * 80)
        print(f"Q: {question}")
        print(f"A: {out.outputs[0].text.strip()}")
        print(f"[{n_tokens} tokens; KV blocks held at the end: {blocks} "
              f"(policy {args.policy}, budget {args.budget})]")


if __name__ == "__main__":
    main()
