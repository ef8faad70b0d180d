"""Read the engine's KV block state from the process that owns the LLM."""

from __future__ import annotations

from typing import Any

from tova_vllm.patch.engine_core import METHOD, kv_state


def engine_kv_state(llm: Any) -> dict[str, Any]:
    """Free/total blocks, blocks per running request and blocks each released
    request held at the end, for an ``LLM`` (in-process or multiprocess engine)."""
    client = llm.llm_engine.engine_core
    in_process = getattr(client, "engine_core", None)
    if in_process is not None and hasattr(in_process, "scheduler"):
        return kv_state(in_process)
    return client.call_utility(METHOD)


def blocks_at_release(llm: Any, request_id: str, peak: bool = False) -> int | None:
    """Blocks the request held when it finished, or (``peak``) the most it
    held at once (engine request ids may carry a suffix after the user's id)."""
    released = engine_kv_state(llm)["peak_blocks_at_release" if peak else "blocks_at_release"]
    if request_id in released:
        return released[request_id]
    for key, value in released.items():
        if key.startswith(f"{request_id}-"):
            return value
    return None


def kept_positions(llm: Any, request_id: str) -> dict[str, Any] | None:
    """What a running request keeps, read from the workers' KV caches:
    ``{"tokens": n, "layers": {layer name: [[positions of KV head 0], ...]}}``
    (positions sorted), where ``n`` is the number of tokens whose K/V the
    request has processed (its prompt and every generated token but the last);
    None while its prompt is still being processed. A debugging aid: the
    workers run a function sent from here, which vLLM allows with
    ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``. With tensor parallelism, rank 0's
    heads. vLLM answers between engine steps, so the state is consistent; with
    a multiprocess engine core the engine may have run further steps than the
    caller saw (``tokens`` says which state this is)."""
    return llm.collective_rpc(_kept_positions_on_worker, args=(request_id,))[0]


def _kept_positions_on_worker(worker: Any, request_id: str) -> dict[str, Any] | None:
    import torch

    from tova_vllm.backend.impl import TovaAttentionImpl
    from tova_vllm.backend.planning import MODE_CODES, prompt_region_blocks
    from tova_vllm.backend.slots import SlotView, row_slot_ids
    from tova_vllm.config import engine_settings_of, request_settings
    from tova_vllm.patch.model_runner import adapter_of

    runner = worker.model_runner
    requests = adapter_of(runner)
    live = requests.live_request_ids()
    if request_id not in live:  # engine ids may carry a suffix after the user's
        request_id = next((r for r in live if r.startswith(f"{request_id}-")), request_id)
    state = requests.request(request_id)
    if state is None:
        raise KeyError(f"request {request_id!r} is not running")
    if state.computed_tokens < state.prompt_len:
        return None
    tokens = state.computed_tokens
    settings = request_settings(engine_settings_of(runner.vllm_config), state.extra_args)
    held = min(tokens, settings.budget)
    caching = bool(runner.vllm_config.cache_config.enable_prefix_caching)
    layers = {}
    for name, module in runner.compilation_config.static_forward_context.items():
        impl = getattr(module, "impl", None)
        if not isinstance(impl, TovaAttentionImpl):
            continue
        cache = module.kv_cache[0] if isinstance(module.kv_cache, (list, tuple)) else module.kv_cache
        view = SlotView(cache, impl.head_size)
        first = view.block_size * prompt_region_blocks(
            state.prompt_len, view.block_size, MODE_CODES[settings.prompt_mode],
            settings.policy.prefix_cacheable, caching,
        )  # fmt: skip  (the kept region's first slot)
        slots = torch.arange(first, first + held, device=cache.device)
        ids = row_slot_ids(state.block_row.to(cache.device), slots, view.block_size)
        pos = view.positions[ids].T.cpu()  # [Hkv, held]
        layers[name] = [sorted(p.tolist()) for p in pos]
    return {"tokens": tokens, "layers": layers}


# Operators that only make a new view of a tensor (no kernel, no copy).
VIEW_OPS = frozenset(
    f"aten::{name}"
    for name in (
        "slice", "view", "transpose", "unsqueeze", "squeeze", "expand", "flatten", "alias", "select",
        "as_strided", "permute", "t", "narrow", "_reshape_alias", "detach", "lift_fresh", "unflatten",
        "split", "unbind", "chunk", "view_as", "expand_as", "diagonal",
    )
)  # fmt: skip
# Operators that copy only when they must (a view otherwise).
_MAYBE_VIEW = frozenset(("aten::reshape", "aten::to", "aten::contiguous", "aten::type_as", "aten::view_as"))


def is_device_op(event) -> bool:
    """Whether a torch profiler event ran a kernel or made a copy (views and
    no-op casts do not)."""
    if event.name in VIEW_OPS:
        return False
    if event.name in _MAYBE_VIEW:
        return any(is_device_op(child) for child in event.cpu_children)
    return event.name.startswith(("aten::", "_C::", "vllm::"))


def count_device_ops(events, parent: str | None = None) -> list[int]:
    """Device operations (`is_device_op`, counted at the top of each call
    tree) of a torch profiler's events: one count per event named ``parent``
    (e.g. ``"vllm::unified_attention_with_output"``, one per layer call), or
    one count of the top-level events when ``parent`` is None."""
    if parent is None:
        return [sum(1 for e in events if e.cpu_parent is None and is_device_op(e))]
    return [sum(1 for c in e.cpu_children if is_device_op(c)) for e in events if e.name == parent]
