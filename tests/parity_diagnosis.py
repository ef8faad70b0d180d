"""What a parity failure reports: where the engine and the transformers
reference first keep different tokens, and how close the reference's two
candidates were there (TOVA's argmin is sensitive: two float32
implementations can choose differently at near-ties).

The engine side replays the request step by step and reads the kept positions
of every layer from the workers' KV caches between steps
(`tova_vllm.inspect.kept_positions`); the reference side feeds the same tokens
through a tracing `EvictionCache`."""

from __future__ import annotations

import re
import uuid

import torch
from vllm import SamplingParams

from tova_vllm.inspect import kept_positions
from tova_vllm.reference import EvictionCache, enable_reference_attention, prompt_pieces


def first_divergence(a, b) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _layer_index(name: str) -> int:
    return int(re.search(r"layers\.(\d+)\.", name).group(1))


def engine_kept(llm, prompt: list[int], settings, steps: int) -> dict[int, list[list[list[int]]]]:
    """Kept positions per layer and KV head after ``len(prompt) + s`` tokens,
    for s in 0 .. steps - 1 (the request generates greedily)."""
    engine = llm.llm_engine
    rid = f"diagnosis-{uuid.uuid4().hex[:8]}"
    params = SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True, extra_args=settings.to_dict())
    engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    states = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id.startswith(rid) and not out.finished:
                kept = kept_positions(llm, out.request_id)
                if kept is not None:
                    layers = kept["layers"]
                    states[kept["tokens"]] = [layers[k] for k in sorted(layers, key=_layer_index)]
    return states


@torch.no_grad()
def reference_kept(hf_model, prompt: list[int], settings, tokens: list[int]):
    """Kept positions per layer/head and each layer's last selection, after
    the prompt and after each of ``tokens`` fed one at a time."""
    enable_reference_attention(hf_model)
    cache = EvictionCache(settings, config=hf_model.config, trace=True)
    ids = torch.tensor([prompt + tokens])
    states = {}

    def record(n):
        per_layer = []
        for li, layer in enumerate(cache.layers):
            pos = cache.kept_positions(li)[0]
            pos = pos if pos.dim() == 2 else pos.unsqueeze(0).expand(layer.keys.shape[1], -1)
            per_layer.append([sorted(p[p >= 0].tolist()) for p in pos])
        states[n] = (per_layer, [layer.last_selection for layer in cache.layers])

    for a, b in prompt_pieces(len(prompt), settings):
        hf_model(input_ids=ids[:, a:b], past_key_values=cache, use_cache=True)
    record(len(prompt))
    for j in range(len(tokens)):
        p = len(prompt) + j
        hf_model(input_ids=ids[:, p : p + 1], past_key_values=cache, use_cache=True)
        record(p + 1)
    return states


def diagnose(llm, hf_model, prompt, settings, got, want) -> str:
    i = first_divergence(got, want)
    msg = f"first divergent token at index {i} (engine {got[i] if i < len(got) else None}, reference {want[i] if i < len(want) else None})"
    if i is None or i == 0 and len(prompt) <= settings.budget:
        return msg
    eng = engine_kept(llm, prompt, settings, i)
    ref = reference_kept(hf_model, prompt, settings, list(got[: max(i - 1, 0)]))
    for n in sorted(set(eng) & set(ref)):
        ref_layers, selections = ref[n]
        for li, (e_heads, r_heads) in enumerate(zip(eng[n], ref_layers)):
            for h, (e, r) in enumerate(zip(e_heads, r_heads)):
                if e == r:
                    continue
                only_e, only_r = sorted(set(e) - set(r)), sorted(set(r) - set(e))
                detail = ""
                sel = selections[li]
                if sel is not None and only_e and only_r:
                    positions, priority = sel
                    g = 0 if priority.shape[1] == 1 else h
                    col = {int(p): c for c, p in enumerate(positions[0, h].tolist())}
                    pe, pr = float(priority[0, g, col[only_e[0]]]), float(priority[0, g, col[only_r[0]]])
                    gap = abs(pe - pr) / max(abs(pe), abs(pr), 1e-30)
                    detail = (
                        f"; the reference's keep priorities of the two: {pe:.9g} (evicted) vs {pr:.9g} "
                        f"(kept), relative gap {gap:.2e}"
                    )
                return (
                    f"{msg}; first differing kept set after {n} tokens, layer {li}, KV head {h}: the engine "
                    f"kept positions {only_e[:4]} where the reference kept {only_r[:4]}{detail}"
                )
    return f"{msg}; every layer kept the same positions at every step compared ({sorted(eng)[:1]}..): the difference is in the arithmetic, not in a selection"
