"""Seam: the Attention layer picks the TOVA backend when a policy is set.

Replaces ``vllm.model_executor.layers.attention.attention.get_attn_backend``
(the name the Attention layer calls at construction; it is imported there from
``vllm.v1.attention.selector``). With a policy in the current VllmConfig, a
decoder attention layer gets `TovaAttentionBackend` bound to the engine's
settings, after the backend's own capability checks
(`AttentionBackend.validate_configuration`) accept the layer; every other
layer, and every layer without a policy, gets vLLM's own choice, untouched.

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

        from tova_vllm.backend import SUPPORTED_ATTENTION, TovaAttentionBackend
        from tova_vllm.config import PolicyConfigError, engine_settings_of

        vllm_config = get_current_vllm_config_or_none()
        settings = engine_settings_of(vllm_config) if vllm_config else None
        attn_type = kwargs.get("attn_type") or "decoder"
        if settings is None or attn_type != "decoder":
            return original(head_size, dtype, kv_cache_dtype, *args, **kwargs)
        cache_config = vllm_config.cache_config
        reasons = TovaAttentionBackend.validate_configuration(
            head_size=head_size,
            dtype=dtype,
            kv_cache_dtype=kv_cache_dtype,
            block_size=cache_config.block_size if cache_config is not None else None,
            use_mla=bool(kwargs.get("use_mla")),
            has_sink=bool(kwargs.get("has_sink")),
            use_sparse=bool(kwargs.get("use_sparse")),
            use_mm_prefix=bool(kwargs.get("use_mm_prefix")),
            use_per_head_quant_scales=bool(kwargs.get("use_per_head_quant_scales")),
            device_capability=None,
            attn_type=attn_type,
            has_sliding_window=bool(kwargs.get("has_sliding_window")),
            use_kv_connector=vllm_config.kv_transfer_config is not None,
        )
        if reasons:
            raise PolicyConfigError(
                f"kv_policy={settings.name!r} cannot be used for this model's attention "
                f"({'; '.join(reasons)}; kv_cache_dtype={kv_cache_dtype!r}); kv_policy supports "
                f"{SUPPORTED_ATTENTION} with kv_cache_dtype one of "
                f"{', '.join(TovaAttentionBackend.supported_kv_cache_dtypes)}"
            )
        caching = bool(cache_config is not None and cache_config.enable_prefix_caching)
        return TovaAttentionBackend.for_settings(settings, caching)

    _seam.replace(attention_module, "get_attn_backend", original, get_attn_backend)
