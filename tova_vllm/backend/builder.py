"""The metadata builder: the step's plan (`planning.plan_step`, on the host)
turned into device tensors, once per step for all layers.

Host work is plain NumPy over the batch. Every per-row integer the device
needs (rows, tokens, positions, held slots, budgets of every wave) goes in one
packed int64 buffer and reaches the device in one copy (pinned memory on
CUDA); everything else is derived there with a few operations per wave, not
per layer and not per row.
"""

from __future__ import annotations

import os
from typing import ClassVar

import numpy as np
import torch

from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionCGSupport, AttentionMetadataBuilder, CommonAttentionMetadata
from vllm.v1.kv_cache_interface import AttentionSpec

from tova_vllm.backend import planning
from tova_vllm.backend.metadata import DecodeWave, PolicyGroup, PromptSegment, TovaMetadata
from tova_vllm.backend.slots import SINK_SLOT, encode_side, row_slot_ids, slot_ids
from tova_vllm.config import KVSettings, PolicyConfigError, request_settings
from tova_vllm.policies import EvictionPolicy

logger = init_logger(f"vllm.{__name__}")

# TOVA_VLLM_CUDA_FAST_PATH=0 turns the fused CUDA decode path off (every
# policy then runs the portable PyTorch path).
CUDA_FAST_PATH_ENV = "TOVA_VLLM_CUDA_FAST_PATH"
_WAVE_FIELDS = 5  # rows, tokens, positions, held, budgets


def cuda_fast_path_enabled() -> bool:
    return os.environ.get(CUDA_FAST_PATH_ENV, "1") != "0"


class TovaMetadataBuilder(AttentionMetadataBuilder[TovaMetadata]):
    # The plan is Python per step: vLLM runs these layers eagerly between
    # CUDA-graph pieces (PIECEWISE); FULL graphs are refused at startup.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size
        self.num_kv_heads = kv_cache_spec.num_kv_heads
        self.cache_dtype = kv_cache_spec.dtype
        self.model_dtype = vllm_config.model_config.dtype
        self.engine: KVSettings = kv_cache_spec.engine_settings
        self.device = device
        self.cuda_fast_path = device.type == "cuda" and cuda_fast_path_enabled()
        # Bound by the model-runner seam: the runner's input batch holds each
        # request's prompt length, which CommonAttentionMetadata lacks, and its
        # requests' sampling params (per-request settings).
        self.runner = None
        self._requests: dict[str, tuple[object, KVSettings]] = {}
        self._group_ids: dict[EvictionPolicy, int] = {}
        self._group_policies: list[EvictionPolicy] = []
        self._pinned: torch.Tensor | None = None

    def bind_runner(self, runner) -> None:
        self.runner = runner

    # -- per request ---------------------------------------------------------

    def _settings(self, req_id: str) -> KVSettings:
        params = self.runner.requests[req_id].sampling_params
        extra = params.extra_args if params is not None else None
        cached = self._requests.get(req_id)
        if cached is not None and cached[0] is extra:
            return cached[1]
        try:
            settings = request_settings(self.engine, extra)
        except PolicyConfigError as e:  # rejected by the API layer; never here
            logger.error("tova-vllm: request %s: %s; using the engine's settings", req_id, e)
            settings = self.engine
        self._requests[req_id] = (extra, settings)
        return settings

    def _group(self, policy: EvictionPolicy) -> int:
        gid = self._group_ids.get(policy)
        if gid is None:
            gid = self._group_ids[policy] = len(self._group_policies)
            self._group_policies.append(policy)
        return gid

    # -- the step ------------------------------------------------------------

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> TovaMetadata:
        cm = common_attn_metadata
        if self.runner is None:
            raise RuntimeError(
                "tova-vllm: the TOVA metadata builder has no model runner bound; "
                "the model-runner seam (tova_vllm.patch.model_runner) did not run"
            )
        n = cm.num_reqs
        query_start = cm.query_start_loc_cpu[: n + 1].numpy().astype(np.int64)
        seq_lens = cm.seq_lens_cpu_upper_bound
        seq_lens = (seq_lens if seq_lens is not None else cm.seq_lens.cpu())[:n].numpy().astype(np.int64)
        num_computed = seq_lens - np.diff(query_start)
        req_ids = self.runner.input_batch.req_ids[:n]
        settings = [self._settings(r) for r in req_ids]
        if len(self._requests) > 2 * max(n, 64):  # forget requests that left
            live = set(req_ids)
            self._requests = {k: v for k, v in self._requests.items() if k in live}
        num_prompt = self.runner.input_batch.num_prompt_tokens_cpu_tensor[:n].numpy().astype(np.int64)
        plan = planning.plan_step(
            query_start,
            num_computed,
            num_prompt,
            np.fromiter((s.budget for s in settings), np.int64, n),
            np.fromiter((planning.MODE_CODES[s.prompt_mode] for s in settings), np.int64, n),
            np.fromiter((s.chunk for s in settings), np.int64, n),
            np.fromiter((self._group(s.policy) for s in settings), np.int64, n),
            self.block_size,
        )
        block_table = cm.block_table_tensor[:n]
        packed = self._to_device(plan.waves)
        waves, offset = [], 0
        for w in plan.waves:
            fields = packed[offset : offset + _WAVE_FIELDS * w.size].view(_WAVE_FIELDS, w.size)
            offset += _WAVE_FIELDS * w.size
            waves.append(self._wave(w, fields, block_table))
        segments = [self._segment(s, block_table) for s in plan.segments]
        return TovaMetadata(num_actual_tokens=cm.num_actual_tokens, segments=segments, waves=waves)

    def _to_device(self, waves: list[planning.Wave]) -> torch.Tensor:
        """Every wave's per-row integers in one host buffer, one copy."""
        total = sum(_WAVE_FIELDS * w.size for w in waves)
        if total == 0:
            return torch.empty(0, dtype=torch.long, device=self.device)
        host = np.concatenate(
            [np.concatenate((w.rows, w.tokens, w.positions, w.held, w.budgets)) for w in waves]
        )
        if self.device.type == "cpu":
            return torch.from_numpy(host)
        if self._pinned is None or self._pinned.numel() < total:
            self._pinned = torch.empty(max(total, 4096), dtype=torch.long, pin_memory=True)
        buf = self._pinned[:total]
        buf.numpy()[:] = host
        return buf.to(self.device, non_blocking=True)

    def _wave(self, w: planning.Wave, fields: torch.Tensor, block_table: torch.Tensor) -> DecodeWave:
        rows, tokens, positions, held, budgets = fields
        bs, nb = self.block_size, w.num_blocks
        n = nb * bs
        dev = fields.device
        # Each row's blocks up to its own count, then the null block (so that
        # a padding column never points into another request's blocks).
        own = torch.div(torch.minimum(held + 1, budgets) + bs - 1, bs, rounding_mode="floor")
        idx = torch.arange(nb, device=dev)
        blocks = torch.where(idx < own[:, None], block_table[rows, :nb].long(), 0)
        sink = torch.full((w.size, 1), SINK_SLOT, dtype=torch.long, device=dev)
        col_ids = torch.cat((slot_ids(blocks, bs), sink), dim=1)
        cols = torch.arange(n + 1, device=dev)
        real = (cols < held[:, None]) | (cols == n)
        empty = (cols == held[:, None]) & (held < budgets)[:, None]
        attn_bias = torch.zeros(real.shape, dtype=self.model_dtype, device=dev).masked_fill_(~real, float("-inf"))
        select_bias = (
            torch.zeros(real.shape, dtype=torch.float32, device=dev)
            .masked_fill_(~real, float("inf"))
            .masked_fill_(empty, float("-inf"))
        )
        groups = []
        for gid, a, b in w.groups:
            groups.append(PolicyGroup(self._group_policies[gid], slice(a, b), a == 0 and b == w.size))
        cuda = None
        if self.cuda_fast_path and all(g.policy.cuda_fast_path for g in groups):
            cuda = (
                block_table[rows].to(torch.int32),
                held.to(torch.int32),
                budgets.to(torch.int32),
                int(w.budgets.max()),
            )
        return DecodeWave(
            size=w.size,
            num_cols=n + 1,
            tokens=slice(int(w.tokens[0]), int(w.tokens[0]) + w.size) if w.tokens_contiguous else tokens,
            positions=positions,
            budgets=budgets,
            held=held,
            blocks=blocks,
            col_ids=col_ids,
            attn_bias=attn_bias.unsqueeze(0).expand(self.num_kv_heads, -1, -1).reshape(-1, 1, n + 1),
            select_bias=select_bias.unsqueeze(1),
            valid=real.unsqueeze(1),
            new_side=encode_side(positions, self.cache_dtype).unsqueeze(1),
            groups=groups,
            per_layer=all(not g.policy.per_kv_head for g in groups),
            cuda=cuda,
        )

    def _segment(self, s: planning.Segment, block_table: torch.Tensor) -> PromptSegment:
        dev = block_table.device
        row = block_table[s.row]
        ar = torch.arange(s.ctx + s.length, device=dev)
        ids = row_slot_ids(row, ar, self.block_size)
        return PromptSegment(
            plan=s,
            policy=self._group_policies[s.group],
            positions=torch.arange(s.pos_start, s.pos_start + s.length, device=dev),
            write_ids=ids[s.ctx :],
            ctx_ids=ids[: s.ctx],
            dest_ids=ids[: s.budget] if s.reduce else None,
            table_row=block_table[s.row : s.row + 1].to(torch.int32) if dev.type == "cuda" else None,
        )
