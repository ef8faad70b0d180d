"""Seam: TOVA metadata builders learn each row's request from the model runner.

The builder needs, per batch row, the request's prompt length and its own KV
settings, which ``CommonAttentionMetadata`` does not carry
(`tova_vllm.backend.runner_adapter`). This seam gives each `TovaMetadataBuilder`
an adapter of the runner vLLM picked, whichever it is:

* Model Runner V1 (``vllm.v1.worker.gpu_model_runner.GPUModelRunner``, which the
  V1 CPU runner subclasses; vLLM 0.32-0.33): wraps
  ``initialize_metadata_builders``, after which the builders exist.
* Model Runner V2 (``vllm.v1.worker.gpu.model_runner.GPUModelRunner``, which
  the V2 CPU runner subclasses; and vLLM 0.34's standalone CPU runner, where
  it exists): wraps ``initialize_kv_cache`` (which creates the builders) to
  bind them, and ``execute_model`` to tell the adapter each step's new
  requests' settings and whether the step is a dummy run.

Either runner is checked when the seam is applied (plugin load, in every
worker) and again when builders are bound (engine start-up), never at the
first step. Nothing is replaced without a policy: the wrappers only act on
TOVA builders.

Upstream change that would retire it: the request's prompt length and
``SamplingParams.extra_args`` in ``CommonAttentionMetadata`` (see patches/).
"""

from __future__ import annotations

import importlib
import importlib.util

from tova_vllm.patch import _seam

SEAM = "model_runner"
ADAPTER_ATTR = "tova_runner_adapter"

_V2_RUNNER = ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner")
# vLLM 0.34's V2 runner for CPUs without Triton, which does not inherit
# GPUModelRunner's methods (imported on the CPU platform only).
_V2_STANDALONE_CPU_RUNNER = ("vllm.v1.worker.cpu.standalone_model_runner", "StandaloneCPUModelRunner")
_V1_RUNNER = ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner")  # gone in vLLM 0.34


def _tova_builders(attn_groups):
    from tova_vllm.backend.builder import TovaMetadataBuilder

    for groups in attn_groups:
        for group in groups:
            for builder in getattr(group, "metadata_builders", []):
                if isinstance(builder, TovaMetadataBuilder):
                    yield builder


def bind_tova_builders(runner, adapter) -> int:
    """Give every TOVA builder of ``runner`` the ``adapter``; how many."""
    bound = 0
    for builder in _tova_builders(getattr(runner, "attn_groups", [])):
        builder.bind_runner(adapter)
        bound += 1
    return bound


def adapter_of(runner):
    """The adapter the seam made for ``runner`` (None before its KV cache)."""
    return getattr(runner, ADAPTER_ATTR, None)


def _load(module: str, name: str):
    """``module.name``, or None where vLLM has no such module."""
    if importlib.util.find_spec(module) is None:
        return None
    return getattr(importlib.import_module(module), name)


def _shape_error(what: str) -> _seam.SeamError:
    return _seam.SeamError(f"tova-vllm seam '{SEAM}': {what}; this seam was written for {_seam.SUPPORTED_VLLM_TEXT}.")


def _apply_v1(cls) -> None:
    from tova_vllm.backend.runner_adapter import V1RunnerAdapter

    if _seam.is_applied(cls, "initialize_metadata_builders"):
        return
    original = _seam.expect_callable(
        cls, "initialize_metadata_builders", ["self", "kv_cache_config", "kernel_block_sizes"], SEAM
    )

    def initialize_metadata_builders(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if not any(True for _ in _tova_builders(getattr(self, "attn_groups", []))):
            return result
        batch = getattr(self, "input_batch", None)
        if not (hasattr(batch, "num_prompt_tokens_cpu_tensor") and hasattr(self, "requests")):
            raise _shape_error("Model Runner V1's input batch has no num_prompt_tokens_cpu_tensor")
        adapter = V1RunnerAdapter(self)
        setattr(self, ADAPTER_ATTR, adapter)
        bind_tova_builders(self, adapter)
        return result

    _seam.replace(cls, "initialize_metadata_builders", original, initialize_metadata_builders)


def _apply_v2(cls) -> None:
    from tova_vllm.backend.runner_adapter import V2RunnerAdapter

    if _seam.is_applied(cls, "initialize_kv_cache"):
        return
    init_kv = _seam.expect_callable(cls, "initialize_kv_cache", ["self", "kv_cache_config"], SEAM)
    execute = _seam.expect_callable(
        cls, "execute_model", ["self", "scheduler_output", "intermediate_tensors", "dummy_run"], SEAM
    )

    def initialize_kv_cache(self, *args, **kwargs):
        result = init_kv(self, *args, **kwargs)
        if not any(True for _ in _tova_builders(getattr(self, "attn_groups", []))):
            return result
        states = getattr(self, "req_states", None)
        if not (
            hasattr(states, "index_to_req_id")
            and hasattr(states, "req_id_to_index")
            and (hasattr(states, "prompt_len_np") or hasattr(getattr(states, "prompt_len", None), "np"))
        ):
            raise _shape_error("Model Runner V2's request states no longer hold index_to_req_id and prompt_len")
        # A subclass that overrides execute_model without calling this one
        # would leave the adapter blind: refuse it now, not at the first step.
        if not _seam.is_applied(type(self), "execute_model"):
            raise _shape_error(f"{type(self).__name__}.execute_model overrides the wrapped one")
        adapter = V2RunnerAdapter(self)
        setattr(self, ADAPTER_ATTR, adapter)
        bind_tova_builders(self, adapter)
        return result

    def execute_model(self, scheduler_output, intermediate_tensors=None, dummy_run=False, *args, **kwargs):
        adapter = getattr(self, ADAPTER_ATTR, None)
        if adapter is not None:
            preempted = getattr(scheduler_output, "preempted_req_ids", None) or ()
            adapter.begin_step(
                scheduler_output.scheduled_new_reqs,
                (*scheduler_output.finished_req_ids, *preempted),
                dummy=dummy_run,
            )
        return execute(self, scheduler_output, intermediate_tensors, dummy_run, *args, **kwargs)

    _seam.replace(cls, "initialize_kv_cache", init_kv, initialize_kv_cache)
    _seam.replace(cls, "execute_model", execute, execute_model)


def apply() -> None:
    v1 = _load(*_V1_RUNNER)
    if v1 is not None:
        _apply_v1(v1)
    v2 = _load(*_V2_RUNNER)
    if v2 is None:
        raise _shape_error("vLLM has no Model Runner V2 (vllm.v1.worker.gpu.model_runner)")
    _apply_v2(v2)
    from vllm.platforms import current_platform

    standalone = _load(*_V2_STANDALONE_CPU_RUNNER) if current_platform.is_cpu() else None
    if standalone is not None:
        _apply_v2(standalone)
