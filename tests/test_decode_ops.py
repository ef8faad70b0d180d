"""The decode path on its own (no engine): the same semantics as the CUDA
kernels' PyTorch reference (`tova_vllm.kernels.reference.decode_step`), a
stated, small number of device operations per layer call, and the builder's
wave tensors from a plan."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from tova_vllm.backend import decode, planning
from tova_vllm.backend.builder import WaveLayout, build_wave, pack_waves
from tova_vllm.backend.slots import SlotView, side_elements
from tova_vllm.kernels import reference
from tova_vllm.policies import TOVA

HQ, HKV, D, BS = 9, 3, 64, 16
# Device operations (kernels and copies, not views: `tova_vllm.inspect.
# is_device_op`) of one layer call for a wave of TOVA rows, counted with the
# torch profiler; the module docstring of tova_vllm.backend.decode lists them.
# Before the no-scratch rewrite a TOVA layer call ran 31 (measured in the
# engine: python -m benchmarks.throughput.profile, which prints the count).
TOVA_OPS_PER_LAYER = 13


def _layer():
    return types.SimpleNamespace(
        num_heads=HQ,
        num_kv_heads=HKV,
        num_queries_per_kv=HQ // HKV,
        head_size=D,
        scale=D**-0.5,
        tp_size=1,
        head_mean=lambda probs, dims: probs.mean(dim=dims),
    )


def _case(seed: int, held: list[int], budgets: list[int], num_blocks: int = 64):
    """A cache in the engine's layout, block tables, and a one-wave plan."""
    gen = torch.Generator().manual_seed(seed)
    rows = len(held)
    c = 2 * D + side_elements(torch.float32)
    cache = torch.randn(num_blocks, BS, HKV, c, generator=gen).transpose(1, 2)
    cache[..., 2 * D :] = 0  # side channel: position 0, score 0 (TOVA reads neither)
    width = max(-(-b // BS) for b in budgets)
    ids = torch.randperm(num_blocks - 1, generator=gen)[: rows * width] + 1  # never the null block
    table = ids.view(rows, width)
    pos = [h if h < b else b + 7 for h, b in zip(held, budgets)]  # held = min(pos, budget)
    plan = planning.plan_step(
        query_start=np.arange(rows + 1),
        num_computed=np.array(pos),
        num_prompt=np.array([1] * rows),
        budget=np.array(budgets),
        mode=np.zeros(rows, dtype=np.int64),
        chunk=np.array(budgets),
        group=np.zeros(rows, dtype=np.int64),
        block_size=BS,
    )
    layout = WaveLayout(BS, HKV, torch.float32, torch.float32)
    fields = torch.from_numpy(pack_waves(plan.waves))
    waves, offset = [], 0
    for w in plan.waves:
        waves.append(build_wave(w, fields[offset : offset + 6 * w.size].view(6, w.size), table, layout, [TOVA()]))
        offset += 6 * w.size
    q = torch.randn(rows, HQ, D, generator=gen)
    k = torch.randn(rows, HKV, D, generator=gen)
    v = torch.randn(rows, HKV, D, generator=gen)
    return cache, table, plan, waves, q, k, v


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decode_path_equals_the_kernel_reference(seed):
    held = [5, 16, 16, 40, 31, 17, 47, 1]
    budgets = [16, 16, 32, 40, 32, 17, 48, 8]
    cache, table, plan, waves, q, k, v = _case(seed, held, budgets)
    ref_cache = cache.clone()
    out = torch.zeros(len(held), HQ, D)
    view = SlotView(cache, D)
    for w in waves:
        decode.forward_wave(_layer(), w, q, k, v, view, out)
    pos = torch.tensor([h if h < b else b + 7 for h, b in zip(held, budgets)])
    from tova_vllm.backend.slots import encode_side

    new_slot = torch.cat((k, v, encode_side(pos, torch.float32).unsqueeze(1).expand(-1, HKV, -1)), dim=-1)
    ref_out, victim = reference.decode_step(
        q, new_slot, ref_cache, table.to(torch.int32), torch.tensor(held, dtype=torch.int32),
        torch.tensor(budgets, dtype=torch.int32), D**-0.5, max_budget=max(budgets),
    )  # fmt: skip
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    # Same victims, hence the same caches (the engine's null block 0 takes
    # the new tokens that were evicted at once; the reference writes nothing).
    assert torch.equal(cache[1:], ref_cache[1:])
    full = torch.tensor(held) == torch.tensor(budgets)
    assert (victim[full] < torch.tensor(held)[full]).any()  # cached slots were evicted ...
    assert (victim[~full] == torch.tensor(held)[~full]).all()  # ... and free slots filled


def _count_ops(fn) -> int:
    from tova_vllm.inspect import count_device_ops

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return count_device_ops(prof.events())[0]


def test_a_tova_layer_call_runs_a_small_stated_number_of_operations():
    held = [16] * 8  # every row full: every row evicts
    budgets = [16] * 8
    cache, table, plan, waves, q, k, v = _case(0, held, budgets)
    assert len(waves) == 1 and isinstance(waves[0].tokens, slice)
    out = torch.zeros(8, HQ, D)
    view = SlotView(cache, D)
    decode.forward_wave(_layer(), waves[0], q, k, v, view, out)  # warm-up
    ops = _count_ops(lambda: decode.forward_wave(_layer(), waves[0], q, k, v, view, out))
    assert ops <= TOVA_OPS_PER_LAYER, ops


def test_waves_are_bucketed_and_their_padding_points_at_the_null_block():
    held = [3, 16, 40, 100]
    budgets = [16, 16, 40, 128]
    _, table, plan, waves, *_ = _case(0, held, budgets, num_blocks=128)
    assert [w.size for w in waves] == [2, 1, 1]  # 1 block (x2), 3 blocks, 7 blocks
    big = waves[-1]
    assert big.blocks.shape == (1, 7) and (big.blocks[0] == table[3, :7]).all()
    small = waves[0]
    # Row 0 (3 held, budget 16) writes its token into its free slot 3.
    assert small.select_bias[0, 0, 3] == float("-inf") and small.select_bias[0, 0, 4] == float("inf")
    assert small.col_ids[0, -1] == 0  # the new token's column: the sink slot


def test_profile_and_dummy_runs_return_zeros():
    """vLLM's profile and dummy runs pass no attention metadata; the output
    must still be defined (zeros, as vLLM's FlashAttention backend gives), so
    nothing downstream (e.g. MoE routing) sees garbage."""
    from tova_vllm.backend.impl import TovaAttentionImpl

    impl = TovaAttentionImpl(HQ, D, D**-0.5, HKV, None, None, "auto")
    out = torch.full((5, HQ * D), float("nan"))
    cache = torch.zeros(4, BS, HKV, 2 * D + side_elements(torch.float32)).transpose(1, 2)
    q = torch.randn(5, HQ * D)
    kv = torch.randn(5, HKV * D)
    result = impl.forward(None, q, kv, kv, cache, None, out)
    assert result is out and torch.equal(out, torch.zeros_like(out))


def test_the_builder_plans_a_step_without_an_engine():
    """benchmarks/builder_timing.py builds the real builder with a stand-in
    runner; one build of a mixed-policy decode step."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.builder_timing import build_once_factory

    assert build_once_factory(8, 64, "cpu", mixed=True)() > 0
