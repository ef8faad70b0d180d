"""The TOVA attention backend: what it supports, and its KV cache spec.

vLLM's attention backends declare their capabilities as class methods
(`AttentionBackend.validate_configuration` reads them); this one supports plain
causal decoder attention (Llama-style MHA/GQA/MQA) in float16, bfloat16 and
float32, KV caches in the model dtype or float16/bfloat16, any block size, and
vLLM's LBNHC KV cache layout (`tova_vllm.backend.slots` relies on it).

The engine's KV settings are bound to the backend class that the attention
selector seam hands to the model's layers (`for_settings`, a subclass made
the way vLLM makes backend variants), so `customize_spec`, a classmethod vLLM
calls without a config, knows them without a module-level global.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import ClassVar

import torch

from vllm.v1.attention.backend import AttentionBackend, AttentionType, MultipleOf, subclass_attention_backend_with_overrides
from vllm.v1.kv_cache_interface import AttentionSpec
from vllm.v1.kv_cache_layout import KVCacheLayout

from tova_vllm.backend.slots import content_bytes
from tova_vllm.config import KVSettings
from tova_vllm.kv_spec import TovaAttentionSpec

BACKEND_NAME = "TOVA"
SUPPORTED_ATTENTION = "plain causal decoder attention (Llama-style MHA/GQA/MQA)"


class TovaAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16"]
    #: The engine's settings and whether it caches prompt prefixes (set on
    #: the subclass `for_settings` makes).
    engine_settings: ClassVar[KVSettings | None] = None
    prefix_caching: ClassVar[bool] = False

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls():
        from tova_vllm.backend.impl import TovaAttentionImpl

        return TovaAttentionImpl

    @staticmethod
    def get_builder_cls():
        from tova_vllm.backend.builder import TovaMetadataBuilder

        return TovaMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        return [MultipleOf(1)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBNHC,)

    @classmethod
    def supports_kv_connector(cls) -> bool:
        # Connectors move whole prompt blocks; a request's kept slots are not
        # a prefix of them.
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def layer_unsupported_reasons(
        cls,
        *,
        alibi_slopes=None,
        sliding_window=None,
        logits_soft_cap=None,
        kv_sharing_target_layer_name=None,
        attn_type: str = AttentionType.DECODER,
    ) -> list[str]:
        """What an attention layer asks for that this backend does not do
        (the parts of a layer `validate_configuration` does not see)."""
        reasons = [
            f"{name}={value!r}"
            for name, value in (
                ("alibi_slopes", alibi_slopes),
                ("sliding_window", sliding_window),
                ("logits_soft_cap", logits_soft_cap),
                ("kv_sharing_target_layer_name", kv_sharing_target_layer_name),
            )
            if value
        ]
        if not cls.supports_attn_type(attn_type):
            reasons.append(f"attention type {attn_type}")
        return reasons

    @classmethod
    @functools.cache
    def for_settings(cls, settings: KVSettings, prefix_caching: bool = False) -> type[TovaAttentionBackend]:
        """This backend bound to the engine's settings."""
        return subclass_attention_backend_with_overrides(
            f"{settings.name.capitalize()}{settings.budget}",
            cls,
            {"engine_settings": settings, "prefix_caching": bool(prefix_caching)},
        )

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        if isinstance(spec, TovaAttentionSpec):
            return spec
        settings = cls.engine_settings
        if settings is None:
            raise RuntimeError(
                "tova-vllm: the TOVA attention backend was used without engine settings "
                "(select it with TovaAttentionBackend.for_settings; internal error)"
            )
        base = {f: getattr(spec, f) for f in ("block_size", "num_kv_heads", "head_size", "head_size_v", "dtype")}
        tova = TovaAttentionSpec(
            **base,
            kv_quant_mode=spec.kv_quant_mode,
            dcp_sharded=spec.dcp_sharded,
            max_tp_shards=spec.max_tp_shards,
            kv_budget=settings.budget,
            kv_settings=settings.to_json(),
            kv_prefix_caching=cls.prefix_caching,
        )
        # K, V and the 16-byte side channel per (slot, KV head): vLLM's page
        # and its memory accounting include the side channel.
        return replace(tova, state_content_bytes=content_bytes(spec.head_size, spec.dtype))
