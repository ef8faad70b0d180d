"""The measurements: perplexity and passkey retrieval through one vLLM engine
(each request carries its own policy and budget, `vllm_xargs`-style extra
args), and the transformers reference on a subset as a cross-check."""

from __future__ import annotations

import math
from dataclasses import dataclass

FULL = "full"


CHUNKED = "chunked"


def row_name(policy: str, mode: str | None = None) -> str:
    """A table row: the policy, or e.g. "tova (chunked)" for its chunked prompts."""
    return policy if mode is None else f"{policy} ({mode})"


@dataclass(frozen=True)
class Config:
    """One line point: a policy at a budget (its prompts processed the task's
    way, or in ``mode``), or the full cache."""

    policy: str
    budget: int | None  # None: full cache
    mode: str | None = None  # None: the task's prompt mode; "chunked": chunks of the budget

    @property
    def row(self) -> str:
        return row_name(self.policy, self.mode)

    @property
    def label(self) -> str:
        return FULL if self.budget is None else f"{self.row}@{self.budget}"

    def extra_args(self, engine_budget: int, prompt_mode: str) -> dict:
        if self.budget is None:
            # The engine's budget covers the whole text: nothing is evicted, and a
            # bulk prompt is one causal pass -- the full model.
            return {"kv_budget": engine_budget, "kv_prompt_mode": "bulk"}
        return {"kv_policy": self.policy, "kv_budget": self.budget, "kv_prompt_mode": self.mode or prompt_mode}


def perplexity_nlls(llm, sequences: list[list[int]], configs: list[Config], engine_budget: int) -> dict:
    """Per config, per sequence, the NLL of every token after the first, each
    predicted from the cache as it was then (streamed prompt: eviction runs
    after every token, as in the paper's PG-19 setup)."""
    from vllm import SamplingParams

    prompts, params, keys = [], [], []
    for config in configs:
        for s, ids in enumerate(sequences):
            prompts.append({"prompt_token_ids": ids})
            params.append(
                SamplingParams(
                    max_tokens=1,
                    temperature=0.0,
                    prompt_logprobs=0,
                    extra_args=config.extra_args(engine_budget, "stream"),
                )
            )
            keys.append((config.label, s))
    outs = llm.generate(prompts, params, use_tqdm=True)
    nlls: dict[str, list[list[float]]] = {c.label: [None] * len(sequences) for c in configs}
    for (label, s), out, prompt in zip(keys, outs, prompts):
        ids = prompt["prompt_token_ids"]
        lps = out.prompt_logprobs
        nlls[label][s] = [-lps[i][ids[i]].logprob for i in range(1, len(ids))]
    return nlls


def perplexity(nll_lists: list[list[float]]) -> float:
    flat = [x for seq in nll_lists for x in seq]
    return math.exp(sum(flat) / len(flat))


def retrieval(llm, prompts: list[tuple[list[int], str]], configs: list[Config], engine_budget: int,
              prompt_mode: str, max_tokens: int = 8) -> dict[str, float]:
    """Accuracy per config: the share of prompts whose greedy answer contains the key."""
    from vllm import SamplingParams

    reqs, params, keys = [], [], []
    for config in configs:
        for ids, key in prompts:
            reqs.append({"prompt_token_ids": ids})
            params.append(
                SamplingParams(
                    max_tokens=max_tokens,
                    temperature=0.0,
                    extra_args=config.extra_args(engine_budget, prompt_mode),
                )
            )
            keys.append((config.label, key))
    outs = llm.generate(reqs, params, use_tqdm=True)
    hits: dict[str, list[bool]] = {}
    for (label, key), out in zip(keys, outs):
        hits.setdefault(label, []).append(key in out.outputs[0].text)
    return {label: sum(h) / len(h) for label, h in hits.items()}


def reference_check(model_path: str, ids: list[int], configs: list[Config], vllm_nlls: dict) -> dict:
    """The transformers reference (`tova_vllm.reference.score_nll`) scores the
    first ``len(ids)`` tokens of sequence 0 under each config; returns, per
    config, both mean NLLs and the largest per-token difference."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from tova_vllm.config import engine_settings
    from tova_vllm.reference import score_nll

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    out = {}
    for config in tqdm(configs, desc="reference check"):
        with torch.no_grad():
            settings = engine_settings({"kv_policy": config.policy, "kv_budget": config.budget})
            ref = score_nll(model, torch.tensor(ids), settings).tolist()
        mine = vllm_nlls[config.label][0][: len(ref)]
        diffs = [abs(a - b) for a, b in zip(mine, ref)]
        out[config.label] = {
            "tokens": len(ref),
            "mean_nll_vllm": sum(mine) / len(mine),
            "mean_nll_reference": sum(ref) / len(ref),
            "max_abs_token_diff": max(diffs),
            "mean_abs_token_diff": sum(diffs) / len(diffs),
        }
    return out
