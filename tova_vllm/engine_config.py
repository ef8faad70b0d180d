"""The engine configuration a policy needs, checked once in the process that
starts the engine (before any engine or worker process exists)."""

from __future__ import annotations

import os
from typing import Any

from vllm.logger import init_logger

from tova_vllm.config import PolicyConfigError, policy_from_vllm_config

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
    hf = model_config.hf_text_config
    for attr in ("layer_types", "sliding_window_pattern"):
        value = getattr(hf, attr, None)
        if attr == "layer_types" and value and any(t != "full_attention" for t in value):
            return f"mixed attention layer types ({sorted(set(value))})"
    return None


def h2o_unsupported_reason(vllm_config: Any) -> str | None:
    """H2O scores each KV head by the mean over its query heads. When tensor
    parallelism replicates KV heads (more ranks than KV heads), a rank holds
    only part of a head's query group, so the ranks would score differently
    from one device."""
    try:
        tp = vllm_config.parallel_config.tensor_parallel_size
        kv_heads = vllm_config.model_config.get_total_num_kv_heads()
    except AttributeError:
        return None
    if tp > kv_heads:
        return (
            f"kv_policy='h2o' needs tensor_parallel_size <= the model's KV heads "
            f"({kv_heads}); got tensor_parallel_size={tp} (tova, window and sink work)"
        )
    return None


def pin_v1_model_runner() -> None:
    """The TOVA builder learns prompt lengths from the V1 model runner
    (tova_vllm.patch.model_runner); CUDA defaults to Model Runner V2. Set
    before the VllmConfig is built (it reads this while it initialises);
    engine and worker processes inherit this process's environment."""
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") is None:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"


def prepare_vllm_config(vllm_config: Any) -> None:
    """Validate the model and adjust the config for the policy, in place."""
    policy = policy_from_vllm_config(vllm_config)
    if policy is None:
        return
    reason = _unsupported_model_reason(vllm_config)
    if reason is not None:
        raise PolicyConfigError(
            f"kv_policy={policy.name!r} cannot be used with model "
            f"{vllm_config.model_config.model!r}: it uses {reason}; "
            f"kv_policy supports {SUPPORTED_ATTENTION}"
        )
    if policy.name == "h2o" and (reason := h2o_unsupported_reason(vllm_config)):
        raise PolicyConfigError(reason)
    if vllm_config.speculative_config is not None:
        raise PolicyConfigError(
            f"kv_policy={policy.name!r} does not support speculative decoding; "
            "drop speculative_config or kv_policy"
        )
    cache_config = vllm_config.cache_config
    if cache_config.enable_prefix_caching:
        logger.warning(
            "tova-vllm: prefix caching is switched off with kv_policy=%r: the "
            "tokens a sequence keeps depend on its attention history, so cached "
            "prefix blocks cannot be shared.",
            policy.name,
        )
        cache_config.enable_prefix_caching = False
    pin_v1_model_runner()
    if not getattr(cache_config, "user_specified_block_size", True):
        # A request keeps budget + 1 slots; small blocks waste less of the last
        # one (the TOVA backend takes any block size).
        cache_config.block_size = TOVA_DEFAULT_BLOCK_SIZE
    max_model_len = vllm_config.model_config.max_model_len
    if policy.budget >= max_model_len:
        logger.warning(
            "tova-vllm: kv_budget=%d >= max_model_len=%d: no sequence can exceed the "
            "budget, so nothing will ever be evicted.",
            policy.budget,
            max_model_len,
        )
    logger.info(
        "tova-vllm: KV eviction policy %r with a budget of %d tokens per layer per "
        "sequence%s.",
        policy.name,
        policy.budget,
        {
            "sink": f" ({policy.num_sinks} sinks)",
            "h2o": f" ({policy.h2o_recent} recent, {policy.budget - policy.h2o_recent} heavy hitters)",
        }.get(policy.name, ""),
    )
