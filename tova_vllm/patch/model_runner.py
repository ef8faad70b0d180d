"""Seam: TOVA metadata builders get the model runner's prompt lengths.

Wraps ``GPUModelRunner.initialize_metadata_builders`` (the CPU runner inherits
it): after vLLM creates the builders, each `TovaMetadataBuilder` is bound to
the runner, whose input batch holds every request's prompt length. The backend
needs it to know where a prompt ends (the bulk reduction happens there, also
when a preempted request recomputes prompt and output in one chunk), and
``CommonAttentionMetadata`` does not carry it.

Upstream change that would retire it: ``num_prompt_tokens`` in
``CommonAttentionMetadata`` (see patches/).
"""

from __future__ import annotations

from tova_vllm.patch import _seam

SEAM = "model_runner"


def bind_tova_builders(runner) -> int:
    from tova_vllm.backend.builder import TovaMetadataBuilder

    bound = 0
    for groups in getattr(runner, "attn_groups", []):
        for group in groups:
            for builder in getattr(group, "metadata_builders", []):
                if isinstance(builder, TovaMetadataBuilder):
                    builder.bind_runner(runner)
                    bound += 1
    return bound


def apply() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if _seam.is_applied(GPUModelRunner, "initialize_metadata_builders"):
        return
    original = _seam.expect_callable(
        GPUModelRunner,
        "initialize_metadata_builders",
        ["self", "kv_cache_config", "kernel_block_sizes"],
        SEAM,
    )

    def initialize_metadata_builders(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if not hasattr(self, "input_batch") or not hasattr(
            self.input_batch, "num_prompt_tokens_cpu_tensor"
        ):
            raise _seam.SeamError(
                "tova-vllm seam 'model_runner': the model runner's input batch has no "
                f"num_prompt_tokens_cpu_tensor; written for {_seam.SUPPORTED_VLLM_TEXT}."
            )
        bind_tova_builders(self)
        return result

    _seam.replace(GPUModelRunner, "initialize_metadata_builders", original, initialize_metadata_builders)
