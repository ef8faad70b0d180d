"""The CPU decode operator (`tova_vllm.backend.cpu_decode`, compiled C++) against
the portable PyTorch path (`tova_vllm.backend.decode`), the reference it must
equal: the same attention outputs and the same victims (the whole cache after
the step), on caches in the engine's layout, for float32 and bfloat16, GQA and
MHA, head sizes 64 and 128, mixed budgets, rows below and at their budget, a
new token evicted at once; TOVA (chosen and written by the operator) and
window / sink (chosen from its probabilities and positions); and a wave whose
H2O or KeyDiff rows take the portable path on their own."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from tova_vllm.backend import cpu_decode, decode, planning
from tova_vllm.backend.builder import WaveLayout, build_wave, pack_waves
from tova_vllm.backend.slots import SlotView, encode_side, side_elements
from tova_vllm.policies import H2O, TOVA, KeyDiff, Sink, Window

BS = 16


def test_the_operator_builds_and_is_used_here():
    """This machine has a compiler: the operator must build and pass its check
    (else every CPU decode silently runs the slower portable path)."""
    assert cpu_decode.operator() is not None
    for dtype in (torch.float32, torch.bfloat16):
        for head in (64, 128):
            assert cpu_decode.usable(dtype, dtype, head), (dtype, head)


def test_a_build_lock_left_by_a_killed_process_does_not_hang_the_next():
    """PyTorch's build lock is a plain file: a process killed while it holds
    it (an engine stopped at start-up) leaves it, and every later load waited
    on it for ever. The next process must load the operator regardless."""
    import subprocess
    import sys

    assert cpu_decode.operator() is not None
    build = cpu_decode._build_dir()
    (build / "lock").touch()
    code = "from tova_vllm.backend import cpu_decode; assert cpu_decode.operator() is not None"
    subprocess.run([sys.executable, "-c", code], timeout=300, check=True)
    assert not (build / "lock").exists()


def _layer(hq, hkv, d):
    return types.SimpleNamespace(
        num_heads=hq,
        num_kv_heads=hkv,
        num_queries_per_kv=hq // hkv,
        head_size=d,
        scale=d**-0.5,
        tp_size=1,
        head_mean=lambda probs, dims: probs.mean(dim=dims),
    )


def _case(seed, hq, hkv, d, dtype, held, budgets, policies, groups, evict_new=()):
    """A cache in the engine's layout (positions in the side channel), block
    tables, the step's q/k/v (rows in ``evict_new`` get a new key the query
    ignores, so a full row evicts its new token at once) and the plan."""
    gen = torch.Generator().manual_seed(seed)
    rows, num_blocks = len(held), 96
    c = 2 * d + side_elements(dtype)
    cache = torch.zeros(num_blocks, BS, hkv, c, dtype=dtype).transpose(1, 2)
    view = SlotView(cache, d)
    view.slots[..., : 2 * d] = torch.randn(num_blocks * BS, hkv, 2 * d, generator=gen).to(dtype)
    slot_pos = torch.randperm(num_blocks * BS, generator=gen)[:, None].expand(-1, hkv)
    view.slots[..., 2 * d :] = encode_side(slot_pos, dtype)
    width = max(-(-b // BS) for b in budgets)
    table = (torch.randperm(num_blocks - 1, generator=gen)[: rows * width] + 1).view(rows, width)
    pos = [h if h < b else b + 7 for h, b in zip(held, budgets)]  # held = min(pos, budget)
    plan = planning.plan_step(
        query_start=np.arange(rows + 1),
        num_computed=np.array(pos),
        num_prompt=np.ones(rows, dtype=np.int64),
        budget=np.array(budgets),
        mode=np.zeros(rows, dtype=np.int64),
        chunk=np.array(budgets),
        group=np.array(groups),
        block_size=BS,
    )
    q = torch.randn(rows, hq, d, generator=gen).to(dtype)
    k = torch.randn(rows, hkv, d, generator=gen).to(dtype)
    v = torch.randn(rows, hkv, d, generator=gen).to(dtype)
    for r in evict_new:
        k[r] = (-4 * q[r].view(hkv, hq // hkv, d).mean(dim=1)).to(dtype)
    return cache, table, plan, q, k, v


def _run(case, policies, hq, hkv, d, dtype, on_kernel):
    cache, table, plan, q, k, v = case
    cache = cache.clone()
    layout = WaveLayout(BS, hkv, dtype, dtype, cpu_kernel=True)
    fields = torch.from_numpy(pack_waves(plan.waves))
    out = torch.full((q.shape[0], hq, d), float("nan"), dtype=dtype)
    view = SlotView(cache, d)
    layer = _layer(hq, hkv, d)
    offset = 0
    for w in plan.waves:
        wave = build_wave(w, fields[offset : offset + 6 * w.size].view(6, w.size), table, layout, policies, on_kernel)
        offset += 6 * w.size
        if on_kernel:
            cpu_decode.forward_wave(layer, wave, q, k, v, view, out)
        else:
            decode.forward_wave(layer, wave, q, k, v, view, out)
    return out, cache


HELD = [5, 16, 16, 40, 31, 17, 47, 1, 32, 9]
BUDGETS = [16, 16, 32, 40, 32, 17, 48, 8, 32, 9]


@pytest.mark.parametrize(
    "dtype,hq,hkv,d",
    [
        (torch.float32, 9, 3, 64),  # the embedded model's heads (GQA)
        (torch.float32, 4, 4, 128),  # MHA
        (torch.bfloat16, 8, 2, 128),
        (torch.bfloat16, 4, 4, 64),
    ],
)
@pytest.mark.parametrize("policy", [TOVA(), Window(), Sink(num_sinks=2)], ids=["tova", "window", "sink"])
def test_the_operator_equals_the_portable_path(dtype, hq, hkv, d, policy):
    case = _case(0, hq, hkv, d, dtype, HELD, BUDGETS, [policy], [0] * len(HELD), evict_new=(1, 3))
    out_ref, cache_ref = _run(case, [policy], hq, hkv, d, dtype, on_kernel=False)
    out, cache = _run(case, [policy], hq, hkv, d, dtype, on_kernel=True)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, out_ref, **tol)
    # Same victims, same writes: the whole cache, but for the null block (the
    # portable path writes a token evicted at once there, the operator nowhere).
    assert torch.equal(cache[1:], cache_ref[1:])
    # Every kind of row was there: cached slots evicted, free slots filled,
    # new tokens evicted at once (their slots unchanged).
    before = case[0]
    assert not torch.equal(cache[1:], before[1:])


def test_a_new_token_evicted_at_once_is_written_nowhere():
    hq, hkv, d = 9, 3, 64
    held, budgets = [16, 16], [16, 16]
    case = _case(1, hq, hkv, d, torch.float32, held, budgets, [TOVA()], [0, 0], evict_new=(0, 1))
    _, cache = _run(case, [TOVA()], hq, hkv, d, torch.float32, on_kernel=True)
    assert torch.equal(cache, case[0])  # both rows full, both new tokens ranked lowest


def test_a_mixed_wave_splits_by_path_and_equals_the_portable_path():
    """Rows of TOVA, H2O (accumulates), KeyDiff (reads keys) and window in one
    planned wave: the builder's split sends H2O's and KeyDiff's rows to the
    portable path only; the step equals the all-portable one."""
    hq, hkv, d, dtype = 9, 3, 64, torch.float32
    policies = [TOVA(), H2O(), KeyDiff(), Window()]
    groups = [i % 4 for i in range(len(HELD))]
    cache, table, plan, q, k, v = _case(2, hq, hkv, d, dtype, HELD, BUDGETS, policies, groups)
    out_ref, cache_ref = _run((cache, table, plan, q, k, v), policies, hq, hkv, d, dtype, on_kernel=False)

    take = {0, 3}
    split = []
    for w in plan.waves:
        kernel, portable = planning.split_wave(w, take, BS)
        parts = [(p, on) for p, on in ((kernel, True), (portable, False)) if p is not None]
        for p, on in parts:
            assert all((g in take) == on for g, *_ in p.groups)
            assert p.num_blocks <= w.num_blocks
        assert sorted(np.concatenate([p.rows for p, _ in parts]).tolist()) == sorted(w.rows.tolist())
        split += parts
    assert {g for w, on in split if on for g, *_ in w.groups} == take
    assert {g for w, on in split if not on for g, *_ in w.groups} == {1, 2}
    cache2 = cache.clone()
    out = torch.full_like(out_ref, float("nan"))
    layout = WaveLayout(BS, hkv, dtype, dtype, cpu_kernel=True)
    fields = torch.from_numpy(pack_waves([w for w, _ in split]))
    view, layer, offset = SlotView(cache2, d), _layer(hq, hkv, d), 0
    for w, on_kernel in split:
        wave = build_wave(w, fields[offset : offset + 6 * w.size].view(6, w.size), table, layout, policies, on_kernel)
        offset += 6 * w.size
        assert (wave.cpu_select is not None) == on_kernel
        (cpu_decode.forward_wave if on_kernel else decode.forward_wave)(layer, wave, q, k, v, view, out)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(cache2[1:], cache_ref[1:])


def test_a_tova_wave_is_one_operator_call():
    """No PyTorch operation besides the operator itself (views only): the
    portable path runs 13 per layer call (tests/test_decode_ops.py)."""
    from tova_vllm.inspect import count_device_ops

    hq, hkv, d, dtype = 9, 3, 64, torch.float32
    cache, table, plan, q, k, v = _case(3, hq, hkv, d, dtype, [16] * 8, [16] * 8, [TOVA()], [0] * 8)
    (w,) = plan.waves
    layout = WaveLayout(BS, hkv, dtype, dtype, cpu_kernel=True)
    wave = build_wave(w, torch.from_numpy(pack_waves([w])).view(6, w.size), table, layout, [TOVA()], True)
    assert wave.cpu_select is True
    out, view, layer = torch.zeros(8, hq, d), SlotView(cache, d), _layer(hq, hkv, d)
    cpu_decode.forward_wave(layer, wave, q, k, v, view, out)  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        cpu_decode.forward_wave(layer, wave, q, k, v, view, out)
    assert count_device_ops(prof.events()) == [0]
