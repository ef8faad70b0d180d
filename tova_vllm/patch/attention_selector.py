"""Seam: the Attention layer picks the TOVA backend when a policy is set.

Replaces ``vllm.model_executor.layers.attention.attention.get_attn_backend``
(the name the Attention layer calls at construction; it is imported there from
``vllm.v1.attention.selector``). With a policy in the current VllmConfig, a
decoder attention layer gets `TovaAttentionBackend`; every other layer, and
every layer without a policy, gets vLLM's own choice, untouched.

Why not the backend registry alone: registering a backend does not select it;
the CPU platform always returns CPU_ATTN whatever is selected, and the selector
caches per configuration, not per policy.

Upstream change that would retire it: a platform-independent per-layer backend
override hook (see patches/).
"""

from __future__ import annotations

from tova_vllm.patch import _seam

SEAM = "attention_selector"


def apply() -> None:
    from vllm.model_executor.layers.attention import attention as attention_module

    if _seam.is_applied(attention_module, "get_attn_backend"):
        return
    original = _seam.expect_callable(
        attention_module,
        "get_attn_backend",
        ["head_size", "dtype", "kv_cache_dtype", "use_mla", "attn_type", "has_sliding_window"],
        SEAM,
    )

    def get_attn_backend(head_size, dtype, kv_cache_dtype, *args, **kwargs):
        from vllm.config import get_current_vllm_config_or_none

        from tova_vllm.backend import TovaAttentionBackend, set_active_policy
        from tova_vllm.config import PolicyConfigError, policy_from_vllm_config

        vllm_config = get_current_vllm_config_or_none()
        policy = policy_from_vllm_config(vllm_config) if vllm_config else None
        attn_type = kwargs.get("attn_type") or "decoder"
        if policy is None or attn_type != "decoder":
            return original(head_size, dtype, kv_cache_dtype, *args, **kwargs)
        for flag in ("use_mla", "has_sink", "use_sparse", "use_mm_prefix", "has_sliding_window"):
            if kwargs.get(flag):
                raise PolicyConfigError(
                    f"kv_policy={policy.name!r} cannot be used for this model's "
                    f"attention ({flag}=True); kv_policy supports plain causal "
                    "decoder attention (Llama-style MHA/GQA/MQA)"
                )
        if kv_cache_dtype not in (None, "auto", "float16", "bfloat16"):
            raise PolicyConfigError(
                f"kv_policy={policy.name!r} supports kv_cache_dtype 'auto', 'float16' "
                f"or 'bfloat16'; got {kv_cache_dtype!r}"
            )
        set_active_policy(policy)
        return TovaAttentionBackend

    _seam.replace(attention_module, "get_attn_backend", original, get_attn_backend)
