"""The metadata of one step, built once by `TovaMetadataBuilder` and read by
every layer: what each compute path needs, as device tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tova_vllm.backend.planning import Segment
from tova_vllm.policies import EvictionPolicy


@dataclass
class PromptSegment:
    """Prompt tokens of one request (`planning.Segment`) with their slots."""

    plan: Segment
    policy: EvictionPolicy
    positions: torch.Tensor  # [c] int64, the tokens' positions
    side: torch.Tensor  # [c, 1, SIDE] their side channel (cache dtype), written with their K/V
    write_range: tuple[int, int] | None  # write_ids as one range of slots [a, b), where they are
    all_ids: torch.Tensor  # [ctx + c] flat slots 0 .. ctx + c - 1
    write_ids: torch.Tensor  # [c] flat slots ctx .. ctx + c - 1 (a view of all_ids)
    ctx_ids: torch.Tensor  # [ctx] flat slots 0 .. ctx - 1, held before (a view of all_ids)
    dest_ids: torch.Tensor | None  # [budget] flat slots 0 .. budget - 1 (reduce)
    dest_range: tuple[int, int] | None  # dest_ids as one range of slots, where they are
    budget: torch.Tensor | None  # [1] int64 (reduce)
    valid: torch.Tensor | None  # [1, 1, ctx + c] bool, all true (reduce)
    # CPU: all_ids as a few compact spans of the page, ``(lo, hi, slots)``:
    # ``slots[i]`` is the token (0 .. ctx + c - 1) in page slot ``lo + i``, or
    # -1; None where they would span too much (`builder.page_spans`).
    page_spans: tuple[tuple[int, int, torch.Tensor], ...] | None = None
    table_row: torch.Tensor | None = None  # [1, W] int32 block-table row (CUDA: paged attention)


@dataclass
class PolicyGroup:
    """The rows of a wave that run one policy: a contiguous slice."""

    policy: EvictionPolicy
    rows: slice
    whole: bool  # the group is the whole wave


@dataclass
class DecodeWave:
    """One token of each of ``size`` rows, over ``num_cols = n + 1`` candidate
    columns per row: the row's gathered slots ``0 .. n-1`` then the new token."""

    size: int
    num_cols: int
    tokens: torch.Tensor | slice  # the rows' tokens in the step (a slice when contiguous)
    positions: torch.Tensor  # [R] int64, the new tokens' positions
    budgets: torch.Tensor  # [R] int64
    held: torch.Tensor  # [R] int64, kept slots before the token
    blocks: torch.Tensor  # [R, nb] the rows' blocks (null block past a row's last)
    col_ids: torch.Tensor  # [R, n + 1] flat slot of each column (new token: the sink slot)
    attn_bias: torch.Tensor | None  # [Hkv * R, 1, n + 1] 0 / -inf (model dtype): what attention sees (portable path)
    select_bias: torch.Tensor  # [R, 1, n + 1] float32: selection's masks (`selection.code_bias`)
    valid: torch.Tensor  # [R, 1, n + 1] bool, real slots (and the new token)
    new_side: torch.Tensor  # [R, 1, SIDE] side channel of the new tokens (cache dtype)
    groups: list[PolicyGroup]
    per_layer: bool  # every group keeps one token set per layer (slot-wide writes)
    # No row is full and no policy accumulates: nothing to select, every new
    # token goes to its row's free slot (these, [R]).
    fill_ids: torch.Tensor | None
    # The CUDA fast path (every row's policy has cuda_fast_path), else None:
    # (block-table rows int32 [R, W], held int32 [R], budgets int32 [R], max budget)
    cuda: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None
    # The CPU decode operator (`cpu_decode`) runs the wave: True when it also
    # selects and writes (TOVA's rule, no tensor parallelism), False when the
    # policies choose from its probabilities and positions; None: another path.
    cpu_select: bool | None = None
    token_ids: torch.Tensor | None = None  # [R] int64 the rows' tokens (CPU operator)


@dataclass
class TovaMetadata:
    """One step's batch, shared by every layer: the prompt segments first
    (one request after another), then the waves in order."""

    num_actual_tokens: int
    segments: list[PromptSegment]
    waves: list[DecodeWave]
    # A dummy run's (profiling, warm-up, CUDA-graph capture): its rows belong
    # to no request, so nothing is written to the cache.
    is_dummy: bool = False

    @classmethod
    def dummy(cls, num_actual_tokens: int) -> TovaMetadata:
        return cls(num_actual_tokens=num_actual_tokens, segments=[], waves=[], is_dummy=True)
