"""The metadata builder: the step's plan (`planning.plan_step`, on the host)
turned into device tensors, once per step for all layers.

Host work is plain NumPy over the batch. Every per-row integer the device
needs (rows, tokens, positions, held slots, budgets of every wave) goes in one
packed int64 buffer and reaches the device in one copy (pinned memory on
CUDA); everything else is derived there with a few operations per wave, not
per layer and not per row.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionCGSupport, AttentionMetadataBuilder, CommonAttentionMetadata
from vllm.v1.kv_cache_interface import AttentionSpec

from tova_vllm.backend import cpu_decode, planning
from tova_vllm.backend.metadata import DecodeWave, PolicyGroup, PromptSegment, TovaMetadata
from tova_vllm.backend.runner_adapter import RunnerAdapter
from tova_vllm.backend.slots import SINK_SLOT, encode_side, row_slot_ids, slot_ids
from tova_vllm.config import KVSettings, PolicyConfigError, request_settings
from tova_vllm.policies import EvictionPolicy

logger = init_logger(f"vllm.{__name__}")

# TOVA_VLLM_CUDA_FAST_PATH=0 turns the fused CUDA decode path off (every
# policy then runs the portable PyTorch path).
CUDA_FAST_PATH_ENV = "TOVA_VLLM_CUDA_FAST_PATH"
_WAVE_FIELDS = 6  # rows, tokens, positions, held, budgets, kept-region offsets


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
        self.prefix_caching = kv_cache_spec.kv_prefix_caching
        self.device = device
        parallel = getattr(vllm_config, "parallel_config", None)
        self.layout = WaveLayout(
            block_size=self.block_size,
            num_kv_heads=self.num_kv_heads,
            model_dtype=self.model_dtype,
            cache_dtype=self.cache_dtype,
            cuda_fast_path=device.type == "cuda" and cuda_fast_path_enabled(),
            cpu_kernel=device.type == "cpu"
            and cpu_decode.usable(self.model_dtype, self.cache_dtype, kv_cache_spec.head_size),
            tensor_parallel_size=getattr(parallel, "tensor_parallel_size", 1),
        )
        # Bound by the model-runner seam: which request each row is, its
        # prompt length and its settings (CommonAttentionMetadata lacks them),
        # from whichever model runner vLLM runs (`runner_adapter`).
        self.runner: RunnerAdapter | None = None
        self._requests: dict[str, tuple[object, KVSettings]] = {}
        self._group_ids: dict[EvictionPolicy, int] = {}
        self._group_policies: list[EvictionPolicy] = []
        self._pinned: torch.Tensor | None = None

    def bind_runner(self, runner: RunnerAdapter) -> None:
        self.runner = runner

    # -- per request ---------------------------------------------------------

    def _settings(self, req_id: str, extra: dict | None) -> KVSettings:
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
        requests = self.runner.batch(cm)
        if requests is None:  # a dummy run (profiling, warm-up, graph capture)
            return TovaMetadata.dummy(cm.num_actual_tokens)
        n = cm.num_reqs
        query_start = cm.query_start_loc_cpu[: n + 1].numpy().astype(np.int64)
        seq_lens = cm.seq_lens_cpu_upper_bound
        seq_lens = (seq_lens if seq_lens is not None else cm.seq_lens.cpu())[:n].numpy().astype(np.int64)
        num_computed = seq_lens - np.diff(query_start)
        req_ids = requests.req_ids
        settings = [self._settings(r, extra) for r, extra in zip(req_ids, requests.extra_args)]
        if len(self._requests) > 2 * max(n, 64):  # forget requests that left
            live = set(req_ids)
            self._requests = {k: v for k, v in self._requests.items() if k in live}
        num_prompt = requests.prompt_lens
        modes = np.fromiter((planning.MODE_CODES[s.prompt_mode] for s in settings), np.int64, n)
        regions = np.zeros(n, dtype=np.int64)
        if self.prefix_caching:
            for i, s in enumerate(settings):
                regions[i] = planning.prompt_region_blocks(
                    int(num_prompt[i]), self.block_size, int(modes[i]), s.policy.prefix_cacheable, True
                )
        plan = planning.plan_step(
            query_start,
            num_computed,
            num_prompt,
            np.fromiter((s.budget for s in settings), np.int64, n),
            modes,
            np.fromiter((s.chunk for s in settings), np.int64, n),
            np.fromiter((self._group(s.policy) for s in settings), np.int64, n),
            self.block_size,
            regions,
        )
        block_table = cm.block_table_tensor[:n]
        planned = self._by_path(plan.waves)
        packed = self._to_device([w for w, _ in planned])
        waves, offset = [], 0
        for w, on_cpu_kernel in planned:
            fields = packed[offset : offset + _WAVE_FIELDS * w.size].view(_WAVE_FIELDS, w.size)
            offset += _WAVE_FIELDS * w.size
            waves.append(build_wave(w, fields, block_table, self.layout, self._group_policies, on_cpu_kernel))
        segments = [
            build_segment(s, block_table, self.block_size, self._group_policies, self.cache_dtype)
            for s in plan.segments
        ]
        return TovaMetadata(num_actual_tokens=cm.num_actual_tokens, segments=segments, waves=waves)

    def _by_path(self, waves: list[planning.Wave]) -> list[tuple[planning.Wave, bool]]:
        """Each wave, and whether it runs the CPU decode operator: a wave
        whose policy groups it does not all implement is split, so that only
        those groups' rows take the portable path."""
        if not self.layout.cpu_kernel:
            return [(w, False) for w in waves]
        out = []
        for w in waves:
            take = {g for g, _, _ in w.groups if cpu_decode.implements(self._group_policies[g])}
            if len(take) == len(w.groups):
                out.append((w, True))
            elif not take:
                out.append((w, False))
            else:
                kernel, portable = planning.split_wave(w, take, self.block_size)
                out += [(kernel, True), (portable, False)]
        return out

    def _to_device(self, waves: list[planning.Wave]) -> torch.Tensor:
        """Every wave's per-row integers in one host buffer, one copy."""
        host = pack_waves(waves)
        total = host.size
        if total == 0:
            return torch.empty(0, dtype=torch.long, device=self.device)
        if self.device.type == "cpu":
            return torch.from_numpy(host)
        if self._pinned is None or self._pinned.numel() < total:
            self._pinned = torch.empty(max(total, 4096), dtype=torch.long, pin_memory=True)
        buf = self._pinned[:total]
        buf.numpy()[:] = host
        return buf.to(self.device, non_blocking=True)


@dataclass(frozen=True)
class WaveLayout:
    """What the device tensors of a wave depend on besides the plan."""

    block_size: int
    num_kv_heads: int
    model_dtype: torch.dtype
    cache_dtype: torch.dtype
    cuda_fast_path: bool = False
    cpu_kernel: bool = False  # the CPU decode operator is usable (`cpu_decode.usable`)
    tensor_parallel_size: int = 1


def build_wave(
    w: planning.Wave,
    fields: torch.Tensor,
    block_table: torch.Tensor,
    layout: WaveLayout,
    group_policies: list[EvictionPolicy],
    on_cpu_kernel: bool = False,
) -> DecodeWave:
    """A wave's device tensors from its plan and its per-row integers
    (``fields``: ``[6, R]`` rows, tokens, positions, held, budgets, kept-region
    offsets, on the device); a few operations per wave, shared by every
    layer."""
    rows, tokens, positions, held, budgets, offsets = fields
    bs, nb = layout.block_size, w.num_blocks
    n = nb * bs
    dev = fields.device
    # Each row's kept blocks up to its own count, then the null block (so
    # that a padding column never points into another request's blocks).
    own = torch.div(torch.minimum(held + 1, budgets) + bs - 1, bs, rounding_mode="floor")
    idx = torch.arange(nb, device=dev)
    if w.offsets.any():
        table = block_table[rows].gather(1, (offsets[:, None] + idx).clamp(max=block_table.shape[1] - 1))
    else:
        table = block_table[rows, :nb]
    blocks = torch.where(idx < own[:, None], table.long(), 0)
    sink = torch.full((w.size, 1), SINK_SLOT, dtype=torch.long, device=dev)
    col_ids = torch.cat((slot_ids(blocks, bs), sink), dim=1)
    cols = torch.arange(n + 1, device=dev)
    real = (cols < held[:, None]) | (cols == n)
    empty = (cols == held[:, None]) & (held < budgets)[:, None]
    attn_bias = None
    if not on_cpu_kernel:  # the CPU operator masks by each row's count itself
        attn_bias = torch.zeros(real.shape, dtype=layout.model_dtype, device=dev).masked_fill_(~real, float("-inf"))
    select_bias = (
        torch.zeros(real.shape, dtype=torch.float32, device=dev)
        .masked_fill_(~real, float("inf"))
        .masked_fill_(empty, float("-inf"))
    )
    groups = [PolicyGroup(group_policies[gid], slice(a, b), a == 0 and b == w.size) for gid, a, b in w.groups]
    filling = not (w.held >= w.budgets).any() and not any(g.policy.accumulates for g in groups)
    cuda = None
    if layout.cuda_fast_path and all(g.policy.cuda_fast_path for g in groups):
        cuda = (blocks.to(torch.int32), held.to(torch.int32), budgets.to(torch.int32), int(w.budgets.max()))
    return DecodeWave(
        size=w.size,
        num_cols=n + 1,
        tokens=slice(int(w.tokens[0]), int(w.tokens[0]) + w.size) if w.tokens_contiguous else tokens,
        positions=positions,
        budgets=budgets,
        held=held,
        blocks=blocks,
        col_ids=col_ids,
        attn_bias=None if attn_bias is None else attn_bias.unsqueeze(0).expand(layout.num_kv_heads, -1, -1).reshape(-1, 1, n + 1),
        select_bias=select_bias.unsqueeze(1),
        valid=real.unsqueeze(1),
        new_side=encode_side(positions, layout.cache_dtype).unsqueeze(1),
        groups=groups,
        per_layer=all(not g.policy.per_kv_head for g in groups),
        fill_ids=col_ids.gather(1, held[:, None]).squeeze(1) if filling else None,
        cuda=cuda,
        # TOVA's rule, every head in this process: the operator also selects and writes.
        cpu_select=(all(g.policy.cuda_fast_path for g in groups) and layout.tensor_parallel_size == 1)
        if on_cpu_kernel
        else None,
        token_ids=tokens if on_cpu_kernel else None,
    )


def build_segment(
    s: planning.Segment,
    block_table: torch.Tensor,
    block_size: int,
    group_policies: list[EvictionPolicy],
    cache_dtype: torch.dtype,
) -> PromptSegment:
    """A prompt segment's slots, from its request's block-table row."""
    dev = block_table.device
    row = block_table[s.row]
    n = s.ctx + s.length
    ids = row_slot_ids(row, torch.arange(n, device=dev), block_size)
    dest = None
    if s.reduce:
        first = s.dest_block * block_size  # in place, or the kept region
        dest = row_slot_ids(row, torch.arange(first, first + min(n, s.budget), device=dev), block_size)
    positions = torch.arange(s.pos_start, s.pos_start + s.length, device=dev)
    writes = ids[s.ctx :]
    cpu = dev.type == "cpu"  # the ranges and spans read ids on the host (no device syncs on CUDA)
    return PromptSegment(
        plan=s,
        policy=group_policies[s.group],
        positions=positions,
        side=encode_side(positions, cache_dtype).unsqueeze(1),
        write_range=slot_range(writes) if cpu else None,
        all_ids=ids,
        write_ids=writes,
        ctx_ids=ids[: s.ctx],
        dest_ids=dest,
        dest_range=slot_range(dest) if cpu and dest is not None else None,
        budget=torch.tensor([s.budget], device=dev) if s.reduce else None,
        valid=torch.ones(1, 1, n, dtype=torch.bool, device=dev) if s.reduce else None,
        page_spans=page_spans(ids) if cpu else None,
        table_row=block_table[s.row : s.row + 1].to(torch.int32) if dev.type == "cuda" else None,
    )


def slot_range(ids: torch.Tensor) -> tuple[int, int] | None:
    """``(a, b)`` where ``ids`` are the slots ``a .. b - 1`` in order (one
    copy into a slice then does what an indexed copy would), else None."""
    n = ids.shape[0]
    if n == 0 or int(ids[-1] - ids[0]) != n - 1 or not bool((ids.diff() == 1).all()):
        return None
    return int(ids[0]), int(ids[0]) + n


# A CPU prompt segment's slots are packed for vLLM's CPU attention straight
# from the page, one kernel call per span of the page that holds them, where
# they fit in at most MAX_PAGE_SPANS spans (a gap of more than SPAN_GAP free
# slots starts a new one) covering at most SPAN_SLACK times their number of
# slots (the kernel skips the others, a few ns each); else the held slots are
# gathered first (one more copy).
MAX_PAGE_SPANS, SPAN_GAP, SPAN_SLACK = 8, 256, 2


def page_spans(ids: torch.Tensor) -> tuple[tuple[int, int, torch.Tensor], ...] | None:
    """``ids`` (flat slots, in token order) as spans ``(lo, hi, slots)`` of
    the page: ``slots[i]`` is the token in slot ``lo + i``, or -1 (see
    `PromptSegment.page_spans`). Any order of blocks works: vLLM hands out
    the blocks a request freed in reverse order, so a cached prompt's blocks
    often run downwards."""
    n = ids.shape[0]
    if n == 0:
        return ()
    values, tokens = torch.sort(ids)
    cuts = (torch.nonzero(values[1:] - values[:-1] > SPAN_GAP).flatten() + 1).tolist()
    if len(cuts) >= MAX_PAGE_SPANS:
        return None
    pieces = list(itertools.pairwise([0, *cuts, n]))  # [a, b) of the sorted slots
    edges = values[[i for a, b in pieces for i in (a, b - 1)]].tolist()
    los, his = edges[0::2], [e + 1 for e in edges[1::2]]
    if sum(his) - sum(los) > SPAN_SLACK * n:
        return None
    spans = []
    for (a, b), lo, hi in zip(pieces, los, his):
        slots = torch.full((hi - lo,), -1, dtype=torch.long)
        slots[values[a:b] - lo] = tokens[a:b]
        spans.append((lo, hi, slots))
    return tuple(spans)


def pack_waves(waves: list[planning.Wave]) -> np.ndarray:
    """Every wave's per-row integers, one host buffer (see `build_wave`)."""
    if not waves:
        return np.empty(0, dtype=np.int64)
    return np.concatenate(
        [np.concatenate((w.rows, w.tokens, w.positions, w.held, w.budgets, w.offsets)) for w in waves]
    )
