"""The engine configuration a policy needs, checked once in the process that
starts the engine (before any engine or worker process exists)."""

from __future__ import annotations

from typing import Any

from vllm.logger import init_logger

from tova_vllm.config import PolicyConfigError, engine_settings_of

logger = init_logger(f"vllm.{__name__}")

TOVA_DEFAULT_BLOCK_SIZE = 16
SUPPORTED_ATTENTION = "plain causal decoder attention (Llama-style MHA/GQA/MQA)"


def _unsupported_model_reason(vllm_config: Any) -> str | None:
    model_config = vllm_config.model_config
    if model_config is None:
        return None
    checks = (
        ("is_encoder_decoder", "an encoder-decoder model"),
        ("use_mla", "multi-head latent attention (MLA)"),
        ("is_hybrid", "a hybrid attention/state-space model"),
        ("is_attention_free", "an attention-free model"),
    )
    for attr, what in checks:
        if bool(getattr(model_config, attr, False)):
            return what
    window = model_config.get_sliding_window()
    if window is not None:
        return f"sliding-window attention (sliding_window={window})"
    layer_types = getattr(model_config.hf_text_config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return f"mixed attention layer types ({sorted(set(layer_types))})"
    return None


def tensor_parallel_unsupported_reason(vllm_config: Any, policy_cls: type) -> str | None:
    """A policy that scores each KV head by its own query heads (H2O) needs a
    rank to hold every query head of its KV heads: with more ranks than KV
    heads vLLM replicates KV heads and splits their query groups, so ranks
    would score differently from one device."""
    if not policy_cls.needs_whole_query_groups():
        return None
    try:
        tp = vllm_config.parallel_config.tensor_parallel_size
        kv_heads = vllm_config.model_config.get_total_num_kv_heads()
    except AttributeError:
        return None
    if tp > kv_heads:
        return (
            f"kv_policy={policy_cls.name!r} needs tensor_parallel_size <= the model's KV heads "
            f"({kv_heads}); got tensor_parallel_size={tp} (policies that rank by the layer's mean "
            "attention, by position or by keys work)"
        )
    return None


def requested_cudagraph_mode(compilation_config: Any) -> str | None:
    """The cudagraph mode a user asked for (EngineArgs.compilation_config: a
    CompilationConfig, a dict or JSON), before a platform resolves it."""
    if isinstance(compilation_config, str):
        import json

        try:
            compilation_config = json.loads(compilation_config)
        except ValueError:
            return None
    mode = compilation_config.get("cudagraph_mode") if isinstance(compilation_config, dict) else getattr(
        compilation_config, "cudagraph_mode", None
    )
    return None if mode is None else str(getattr(mode, "name", mode)).upper()


def _refuse_full_cuda_graphs(vllm_config: Any, name: str, requested: str | None) -> None:
    """The metadata builder plans each step in Python (AttentionCGSupport.NEVER),
    so vLLM runs these layers eagerly between CUDA-graph pieces. A FULL graph
    would replay a captured step and silently skip the eviction."""
    resolved = getattr(getattr(vllm_config, "compilation_config", None), "cudagraph_mode", None)
    for mode in (requested, None if resolved is None else getattr(resolved, "name", str(resolved))):
        if mode in ("FULL", "FULL_DECODE_ONLY"):
            raise PolicyConfigError(
                f"kv_policy={name!r} does not support cudagraph_mode={mode}: the eviction "
            "runs in Python between graph pieces, so a full graph would skip it; use "
            "cudagraph_mode PIECEWISE (the default with a policy), FULL_AND_PIECEWISE or NONE"
        )


def _log_prefix_caching() -> None:
    from tova_vllm.policies import policy_classes

    exact = [c.name for c in policy_classes() if c.prefix_cacheable]
    other = [c.name for c in policy_classes() if not c.prefix_cacheable]
    logger.info(
        "tova-vllm: prefix caching is on for bulk prompts of kv_policy %s (the kept tokens of a "
        "cached prefix are those of a cold prompt); requests with kv_policy %s, or with chunked "
        "or streamed prompts, neither read nor write it (--no-enable-prefix-caching turns it off).",
        ", ".join(exact),
        ", ".join(other) or "-",
    )


def prepare_vllm_config(vllm_config: Any, requested_cudagraph: str | None = None) -> None:
    """Validate the model and adjust the config for the policy, in place
    (``requested_cudagraph``: the cudagraph mode the user asked for)."""
    settings = engine_settings_of(vllm_config)
    if settings is None:
        return
    name = settings.name
    reason = _unsupported_model_reason(vllm_config)
    if reason is not None:
        raise PolicyConfigError(
            f"kv_policy={name!r} cannot be used with model "
            f"{vllm_config.model_config.model!r}: it uses {reason}; "
            f"kv_policy supports {SUPPORTED_ATTENTION}"
        )
    if reason := tensor_parallel_unsupported_reason(vllm_config, type(settings.policy)):
        raise PolicyConfigError(reason)
    if vllm_config.speculative_config is not None:
        raise PolicyConfigError(
            f"kv_policy={name!r} does not support speculative decoding; drop speculative_config or kv_policy"
        )
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        raise PolicyConfigError(
            f"kv_policy={name!r} does not support KV connectors (kv_transfer_config): a "
            "request's kept slots are not the prompt blocks a connector moves"
        )
    _refuse_full_cuda_graphs(vllm_config, name, requested_cudagraph)
    cache_config = vllm_config.cache_config
    if cache_config.enable_prefix_caching:
        _log_prefix_caching()
    if not getattr(cache_config, "user_specified_block_size", True):
        # A request keeps `budget` slots; small blocks waste less of the last
        # one (the TOVA backend takes any block size).
        cache_config.block_size = TOVA_DEFAULT_BLOCK_SIZE
    max_model_len = vllm_config.model_config.max_model_len
    if settings.budget >= max_model_len:
        logger.warning(
            "tova-vllm: kv_budget=%d >= max_model_len=%d: no sequence can exceed the "
            "budget, so nothing will ever be evicted.",
            settings.budget,
            max_model_len,
        )
    logger.info("tova-vllm: KV eviction policy %s.", settings.describe())
