"""The attention implementation: per layer call, the step's prompt segments
(`tova_vllm.backend.prompt`), then its decode waves (`tova_vllm.backend.decode`,
or `tova_vllm.backend.cuda_decode` on CUDA), in order."""

from __future__ import annotations

import torch

from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionImpl, AttentionLayer, AttentionType

from tova_vllm.backend import cpu_decode, decode, prompt
from tova_vllm.backend.backend import SUPPORTED_ATTENTION, TovaAttentionBackend
from tova_vllm.backend.metadata import TovaMetadata
from tova_vllm.backend.slots import SlotView

logger = init_logger(f"vllm.{__name__}")

_logged_cuda = False


class TovaAttentionImpl(AttentionImpl[TovaMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **kwargs,
    ) -> None:
        reasons = TovaAttentionBackend.layer_unsupported_reasons(
            alibi_slopes=alibi_slopes,
            sliding_window=sliding_window,
            logits_soft_cap=logits_soft_cap,
            kv_sharing_target_layer_name=kv_sharing_target_layer_name,
            attn_type=attn_type,
        )
        if reasons:
            raise ValueError(
                f"kv_policy does not support attention with {', '.join(reasons)}; supported: {SUPPORTED_ATTENTION}"
            )
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.num_queries_per_kv = num_heads // num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self._tp_size: int | None = None
        self._view: SlotView | None = None
        self._attention_impl: dict[tuple, str] = {}
        self._workspace = _engine_limits()
        self._profiled = False

    # -- what the compute paths ask of their layer ----------------------------

    @property
    def tp_size(self) -> int:
        if self._tp_size is None:
            from vllm.distributed import get_tensor_model_parallel_world_size

            self._tp_size = get_tensor_model_parallel_world_size()
        return self._tp_size

    @property
    def all_reduce(self):
        if self.tp_size == 1:
            return None
        from vllm.distributed import tensor_model_parallel_all_reduce

        return tensor_model_parallel_all_reduce

    def head_mean(self, probs: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        """The mean over ALL the layer's query heads (``dims`` of ``probs``
        hold this rank's), identical on every tensor-parallel rank: a sum
        all-reduced over the TP group before the argmin."""
        if self.tp_size == 1:
            return probs.mean(dim=dims)
        total = self.all_reduce(probs.sum(dim=dims).contiguous())
        return total / (self.num_heads * self.tp_size)

    def decode_attention_impl(self, q_dtype: torch.dtype, kv_dtype: torch.dtype) -> str:
        """The CUDA decode attention kernel, chosen once per layer and dtypes."""
        key = (q_dtype, kv_dtype)
        impl = self._attention_impl.get(key)
        if impl is None:
            from tova_vllm.kernels import select_attention

            impl = self._attention_impl[key] = select_attention(
                torch.device("cuda"), self.head_size, self._view.block_size, q_dtype, kv_dtype
            )
        return impl

    def prefill_attention_impl(self, q_dtype: torch.dtype, kv_dtype: torch.dtype) -> str:
        """The CUDA prompt attention: vLLM's FlashAttention where the decode
        selection picks it (same dtype rule), else the portable path."""
        return self.decode_attention_impl(q_dtype, kv_dtype)

    def _slot_view(self, kv_cache: torch.Tensor) -> SlotView:
        view = self._view
        if view is None or view.cache.data_ptr() != kv_cache.data_ptr() or view.cache.shape != kv_cache.shape:
            view = self._view = SlotView(kv_cache, self.head_size)
        return view

    # -- the layer call ---------------------------------------------------------

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: TovaMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("TOVA backend: fused output quantization")
        if attn_metadata is None or attn_metadata.is_dummy:
            # Profile and dummy runs (Model Runner V1 passes no metadata, V2 a
            # dummy one): a defined output (as vLLM's FlashAttention backend
            # does), so nothing downstream (MoE routing) sees garbage;
            # and, once, the backend's worst-case workspace, so that vLLM's
            # profiled peak (what it sizes the KV pool from) includes it.
            if not self._profiled and output.is_cuda and self._workspace is not None:
                self._profiled = True
                torch.empty(self._worst_case_bytes(query.dtype, kv_cache.dtype), dtype=torch.uint8, device=output.device)
            return output.zero_()
        view = self._slot_view(kv_cache)
        m = attn_metadata
        q = query.view(-1, self.num_heads, self.head_size)
        k = key.view(-1, self.num_kv_heads, self.head_size)
        v = value.view(-1, self.num_kv_heads, self.head_size)
        out = output.view(-1, self.num_heads, self.head_size)
        # Prompt segments first: a recomputing request's later tokens need its
        # prompt reduced. Segments in shared prompt regions are all written
        # before any row attends: a request may hit blocks another one writes
        # in this very step (vLLM hashes blocks when it schedules them).
        for seg in m.segments:
            if seg.plan.in_prompt_region:
                prompt.write_segment(self, seg, k, v, view)
        for seg in m.segments:
            prompt.forward_segment(self, seg, q, k, v, view, out, written=seg.plan.in_prompt_region)
        for wave in m.waves:
            if wave.cuda is not None:
                self._forward_wave_cuda(wave, q, k, v, view, out)
            elif wave.cpu_select is not None:
                cpu_decode.forward_wave(self, wave, q, k, v, view, out)
            else:
                decode.forward_wave(self, wave, q, k, v, view, out)
        return output

    def _worst_case_bytes(self, model_dtype: torch.dtype, cache_dtype: torch.dtype) -> int:
        from tova_vllm.backend import workspace

        shapes = workspace.Shapes(self.num_heads, self.num_kv_heads, self.head_size, cache_dtype, model_dtype)
        return workspace.worst_case_bytes(shapes, **self._workspace)

    def _forward_wave_cuda(self, wave, q, k, v, view, out) -> None:
        from tova_vllm.backend.cuda_decode import forward_wave_cuda

        global _logged_cuda
        if not _logged_cuda:
            logger.info("tova-vllm: CUDA fast path for TOVA decode rows (fused Triton scoring)")
            _logged_cuda = True
        forward_wave_cuda(self, wave, q, k, v, view, out)


def _engine_limits() -> dict | None:
    """The limits that bound the backend's workspace (`tova_vllm.backend.
    workspace`), from the config of the model being built."""
    from vllm.config import get_current_vllm_config_or_none

    from tova_vllm.config import engine_settings_of

    config = get_current_vllm_config_or_none()
    settings = engine_settings_of(config) if config is not None else None
    if settings is None:
        return None
    return dict(
        max_num_seqs=config.scheduler_config.max_num_seqs,
        budget=settings.budget,
        block_size=config.cache_config.block_size,
        max_model_len=config.model_config.max_model_len,
        max_num_batched_tokens=config.scheduler_config.max_num_batched_tokens,
    )
