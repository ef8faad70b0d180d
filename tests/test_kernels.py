"""The kernels of the CUDA fast path, on the CPU through Triton's interpreter,
against the PyTorch reference (`tova_vllm.kernels.reference`), on the cache
exactly as the engine allocates it: ``torch.empty(nb, bs, Hkv, C).transpose(1,
2)``, ``C = 2D + S`` (16-byte side channel per slot and head).

Triton reads TRITON_INTERPRET when a kernel is defined (``@triton.jit`` at
import) and again when it runs: it is set while `tova_vllm.kernels` is
imported (reloaded if something imported it earlier without it) and during
this module's tests, and unset otherwise.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from hypothesis import HealthCheck, Phase, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import tova_vllm.kernels  # noqa: E402

_KERNEL_MODULES = ("_common", "layout", "attention", "scoring", "prefill", "decode_step", "reference")

if not triton.knobs.runtime.interpret:
    raise RuntimeError("TRITON_INTERPRET was not picked up by triton")
if type(tova_vllm.kernels.scoring._head_sum_kernel).__name__ != "InterpretedFunction":
    for name in _KERNEL_MODULES:
        importlib.reload(importlib.import_module(f"tova_vllm.kernels.{name}"))
    importlib.reload(tova_vllm.kernels)


def _restore_interpret():
    if _PREVIOUS_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET


# The kernels are defined; other test modules collected after this one (and
# the engines they spawn) must not inherit interpreted Triton. The interpreter
# also reads the variable when kernels run: set again for this module's tests.
_restore_interpret()


def _interpret_language():
    """Triton's own jit'd library functions (``tl.zeros``, ``tl.sum``, ...) are
    built once, at triton's first import: plain `JITFunction`s, which an
    interpreted kernel cannot call, when a module collected before this one
    (one that imports vLLM) imported triton without TRITON_INTERPRET. Swap
    interpreted twins in; returns what to put back."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    swapped = []
    for module in (tl, tl.standard, tl.random):
        for name, obj in list(vars(module).items()):
            if type(obj) is JITFunction:
                swapped.append((module, name, obj))
                setattr(module, name, InterpretedFunction(obj.fn))
    return swapped


@pytest.fixture(autouse=True, scope="module")
def _interpret():
    os.environ["TRITON_INTERPRET"] = "1"
    swapped = _interpret_language()
    yield
    for module, name, obj in swapped:
        setattr(module, name, obj)
    _restore_interpret()


from tova_vllm.kernels import attention, prefill, scoring  # noqa: E402
from tova_vllm.kernels import reference as ref  # noqa: E402
from tova_vllm.kernels.decode_step import tova_decode_step  # noqa: E402
from tova_vllm.kernels.layout import as_bits, make_kv_cache, side_channel_elems  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The interpreter is slow: few, small examples; derandomized so CI is stable.
# No shrinking either: a failure prints its example, shrinking would take minutes.
FEW = settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# -- the engine's cache ----------------------------------------------------------


def engine_cache(gen, num_blocks, bs, hkv, dim, dtype):
    """Exactly the engine's allocation; K/V random; side channel: an int32
    position, a float32 score and 8 random padding bytes per (slot, head)."""
    c = 2 * dim + 16 // torch.empty((), dtype=dtype).element_size()
    kv = torch.empty(num_blocks, bs, hkv, c, dtype=dtype).transpose(1, 2)
    kv[..., : 2 * dim] = torch.randn(num_blocks, hkv, bs, 2 * dim, generator=gen).to(dtype)
    side = as_bits(kv[..., 2 * dim :]).view(torch.int32)  # [nb, Hkv, bs, 4]
    side[..., 0] = torch.randint(0, 1 << 20, side.shape[:-1], generator=gen, dtype=torch.int32)
    side[..., 1] = torch.rand(side.shape[:-1], generator=gen).view(torch.int32)
    side[..., 2:] = torch.randint(-(2**31), 2**31 - 1, (*side.shape[:-1], 2), generator=gen, dtype=torch.int32)
    return kv


def tables(gen, rows, blocks_per_row, num_blocks):
    """Each row's blocks scattered over the cache, never block 0 (null block)."""
    assert num_blocks > rows * blocks_per_row
    perm = torch.randperm(num_blocks - 1, generator=gen)[: rows * blocks_per_row] + 1
    return perm.view(rows, blocks_per_row).to(torch.int32)


def new_slots(gen, rows, hkv, dim, dtype, positions):
    c = 2 * dim + 16 // torch.empty((), dtype=dtype).element_size()
    s = torch.randn(rows, hkv, c, generator=gen).to(dtype)
    side = as_bits(s[..., 2 * dim :]).view(torch.int32)
    side[..., 0] = torch.as_tensor(positions, dtype=torch.int32).view(-1, 1)
    side[..., 1] = torch.rand(rows, hkv, generator=gen).view(torch.int32)
    return s


def decode_inputs(seed, heads, dim, bs, dtype, budgets, held, max_budget):
    group, hkv = heads
    g = torch.Generator().manual_seed(seed)
    rows = len(budgets)
    nb = triton.cdiv(max_budget, bs)
    kv = engine_cache(g, rows * nb + 3, bs, hkv, dim, dtype)
    table = tables(g, rows, nb, kv.shape[0])
    q = torch.randn(rows, hkv * group, dim, generator=g).to(dtype)
    new = new_slots(g, rows, hkv, dim, dtype, [h + 1000 for h in held])
    return kv, table, q, new, torch.tensor(held, dtype=torch.int32)


def expected_cache(before, new_slot, table, held, budget, victim):
    """``before`` with the new token's whole slot at ``victim`` where written."""
    exp = as_bits(before).clone()
    bs = before.shape[2]
    budgets = budget.tolist() if isinstance(budget, torch.Tensor) else [budget] * len(held)
    for r in range(len(held)):
        v, h = int(victim[r]), int(held[r])
        if v < h or h < budgets[r]:
            exp[int(table[r, v // bs]), :, v % bs, :] = as_bits(new_slot[r])
    return exp


def assert_cache(before, after, new_slot, table, held, budget, victim):
    """Untouched slots (side channel included) bit-identical; the written slot
    holds the caller's whole slot."""
    assert torch.equal(as_bits(after), expected_cache(before, new_slot, table, held, budget, victim))


def check_victims(victim, sums, held, budgets, rtol=1e-5):
    """Below budget: ``held``. At it: the reference's argmin unless the two
    lowest are within float noise; then one of the tied minima."""
    for r in range(len(held)):
        h, pick = int(held[r]), int(victim[r])
        if h < budgets[r]:
            assert pick == h, (r, pick, h)
            continue
        s = sums[r, : h + 1].double()
        low = s.min()
        assert 0 <= pick <= h
        if (s <= low * (1 + rtol) + 1e-12).sum() == 1:
            assert pick == int(torch.argmin(s)), (r, pick, int(torch.argmin(s)))
        else:
            assert s[pick] <= low * (1 + rtol) + 1e-12


# -- layout ------------------------------------------------------------------------


def test_engine_layout():
    for dtype, s in ((torch.float32, 4), (torch.float16, 8), (torch.bfloat16, 8)):
        assert side_channel_elems(dtype) == s
        mine = make_kv_cache(5, 2, 16, 64, dtype)
        engine = torch.empty(5, 16, 2, 128 + s, dtype=dtype).transpose(1, 2)
        assert mine.shape == engine.shape == (5, 2, 16, 128 + s)
        assert mine.stride() == engine.stride() == (16 * 2 * (128 + s), 128 + s, 2 * (128 + s), 1)
        # every head row is 16-byte aligned
        assert (mine.stride(1) * mine.element_size()) % 16 == 0


# -- the decode step -----------------------------------------------------------------

row_specs = st.lists(st.tuples(st.integers(1, 70), st.booleans(), st.floats(0.0, 1.0)), min_size=1, max_size=4)


@FEW
@given(
    st.integers(0, 2**16),
    st.sampled_from([(1, 2), (3, 1), (4, 2), (8, 1)]),  # (group, Hkv): GQA ratios 1/3/4/8
    st.sampled_from([16, 32]),
    st.sampled_from([64, 128]),
    st.sampled_from(list(DTYPES)),
    row_specs,
    st.integers(0, 20),
    st.booleans(),
)
# Always: rows below and at their budget, budgets a multiple of bs and not.
@example(1, (4, 2), 16, 64, "fp32", [(32, True, 0), (37, False, 0.3), (37, True, 0), (5, False, 0.9)], 3, True)
@example(2, (3, 1), 32, 128, "bf16", [(64, True, 0), (64, False, 0.5), (64, True, 0)], 0, False)
@example(3, (1, 2), 16, 64, "fp16", [(16, True, 0), (45, True, 0), (45, False, 0.0)], 7, True)
def test_decode_step_matches_reference(seed, heads, bs, dim, dt, spec, extra, per_row_budget):
    """Output, victims, scores and the cache after the step equal the
    reference's, with ragged held / budget rows (below and at the budget)."""
    dtype = DTYPES[dt]
    if per_row_budget:
        budgets = [b for b, _, _ in spec]
    else:
        budgets = [spec[0][0]] * len(spec)
    held = [b if at else max(1, min(b - 1, int(f * b))) if b > 1 else 1 for b, (_, at, f) in zip(budgets, spec)]
    max_budget = max(budgets) + extra
    kv, table, q, new, held_t = decode_inputs(seed, heads, dim, bs, dtype, budgets, held, max_budget)
    scale = dim**-0.5
    budget_arg = torch.tensor(budgets, dtype=torch.int32) if per_row_budget else budgets[0]
    mine, theirs = kv.clone(), kv.clone()
    assert mine.stride() == kv.stride()
    out, victim, scores = tova_decode_step(
        q, new, mine, table, held_t, budget_arg, scale, max_budget=max_budget, attn_impl="triton",
        return_scores=True,
    )
    rout, rvictim, rscores = ref.decode_step(
        q, new, theirs, table, held_t, budget_arg, scale, max_budget=max_budget, return_scores=True
    )
    assert out.dtype == dtype and out.shape == q.shape
    assert victim.dtype == torch.int64 and scores.shape == (len(held), max_budget + 1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), rout.float(), rtol=tol, atol=tol)
    assert torch.equal(torch.isinf(scores), torch.isinf(rscores))
    fin = torch.isfinite(rscores)
    torch.testing.assert_close(scores[fin], rscores[fin], rtol=1e-4, atol=1e-7)
    check_victims(victim, rscores, held, budgets)
    assert_cache(kv, mine, new, table, held_t, budget_arg, victim)
    if torch.equal(victim, rvictim):
        assert torch.equal(as_bits(mine), as_bits(theirs))


@FEW
@given(
    st.integers(0, 2**16),
    st.sampled_from([(1, 2), (3, 1), (4, 2), (8, 1)]),
    st.sampled_from([16, 32]),
    st.sampled_from([64, 128]),
    st.sampled_from(list(DTYPES)),
    st.lists(st.integers(1, 150), min_size=1, max_size=3),
    st.sampled_from([None, 3]),
    st.booleans(),
)
def test_attention_matches_reference(seed, heads, bs, dim, dt, held, splits, with_new):
    """The split-KV kernel over the cached slots, with and without the new
    token merged in its second stage."""
    dtype = DTYPES[dt]
    group, hkv = heads
    if group * hkv > 4:
        group, hkv = min(group, 4), 1  # keep the interpreter's work small
    kv, table, q, new, held_t = decode_inputs(seed, (group, hkv), dim, bs, dtype, held, held, max(held))
    scale = dim**-0.5
    out, lse = attention.triton_decode_attention(
        q, kv, table, held_t, scale, max(held), new_slot=new if with_new else None, num_splits=splits,
        block_n=32,
    )
    if with_new:
        probs = ref.decode_probs(q, new, kv, table, held_t, scale)
        eout = torch.stack([torch.einsum("hn,nhd->hd", p, v) for p, v in probs])
        elog = []
        for r in range(len(held)):  # the reference's LSE over held + 1 keys
            keys = torch.cat((ref.gather_slots(kv, table, r, held[r]), new[r : r + 1])).float()
            keys = keys.repeat_interleave(group, dim=1)[..., :dim]
            elog.append(torch.logsumexp(torch.einsum("hd,nhd->hn", q[r].float(), keys) * scale, -1))
        elog = torch.stack(elog)
    else:
        eout, elog = ref.cached_attention(q, kv, table, held_t, scale)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(lse, elog, rtol=1e-5, atol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), eout, rtol=tol, atol=tol)


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_merge_new_token_after_cached_attention(dt):
    """The FlashAttention / vLLM-Triton path: attention over the cached slots
    (here the reference's, LSE as FA's transposed [Hq, R] view), then the new
    token merged; also FA's +inf LSE of a row without cached keys."""
    dtype = DTYPES[dt]
    kv, table, q, new, held = decode_inputs(5, (4, 2), 64, 16, dtype, [40, 7, 1], [40, 7, 1], 40)
    scale = 0.125
    out_c, lse_c = ref.cached_attention(q, kv, table, held, scale)
    lse_fa = lse_c.t().contiguous().t()  # [R, Hq] view of an [Hq, R] tensor
    out, lse = attention.merge_new_token(q, out_c.to(dtype), lse_fa, new, scale)
    eout, _ = ref.decode_step(q, new, kv.clone(), table, held, 40, scale, max_budget=40)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), eout.float(), rtol=tol, atol=tol)
    # no cached key: FlashAttention reports lse = +inf and zeros
    lse_fa[2] = float("inf")
    out_c[2] = 0
    out, lse = attention.merge_new_token(q, out_c.to(dtype), lse_fa, new, scale)
    v_new = new[2, :, 64:128].float().repeat_interleave(4, dim=0)
    torch.testing.assert_close(out[2].float(), v_new, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "case,zero_slots,zero_new,expect",
    [
        ("cached_vs_cached_same_tile", [2, 5], False, 2),
        ("cached_vs_cached_across_tiles", [70, 100, 3], False, 3),
        ("cached_vs_new", [64], True, 64),
        ("new_token_dropped", [], True, 110),
    ],
)
@pytest.mark.parametrize("dt", ["fp32", "fp16"])
def test_exact_ties(case, zero_slots, zero_new, expect, dt):
    """Zero keys give bit-identical (lowest: all other dot products are
    positive) scores: the lowest column is evicted, a cached slot before the
    new token; a unique lowest new token is dropped and nothing is written."""
    dtype, held, dim, bs = DTYPES[dt], 110, 64, 16
    kv, table, q, new, held_t = decode_inputs(11, (3, 2), dim, bs, dtype, [held], [held], held)
    q = q.abs() + 0.1
    kv[..., :dim] = kv[..., :dim].abs() + 0.1
    new[..., :dim] = 0 if zero_new else new[..., :dim].abs() + 0.1
    for slot in zero_slots:
        kv[int(table[0, slot // bs]), :, slot % bs, :dim] = 0
    scale = dim**-0.5
    mine = kv.clone()
    _, victim, scores = tova_decode_step(
        q, new, mine, table, held_t, held, scale, max_budget=held, attn_impl="triton", return_scores=True
    )
    tied = zero_slots + ([held] if zero_new else [])
    assert len(set(scores[0, tied].tolist())) == 1
    assert int(victim[0]) == expect
    assert_cache(kv, mine, new, table, held_t, held, victim)
    if case == "new_token_dropped":
        assert torch.equal(as_bits(mine), as_bits(kv))
    # the same through smaller tiles (ties across head-sum and argmin tiles)
    _, lse = attention.triton_decode_attention(q, kv, table, held_t, scale, held, new_slot=new)
    sums = scoring.head_sum(q, kv, table, held_t, lse, scale, held + 1, new_slot=new, block_n=32)
    assert len(set(sums[0, tied].tolist())) == 1
    again = kv.clone()
    budget_t = held_t.clone()
    assert int(scoring.select_and_write(sums, held_t, budget_t, new, again, table, block=32)[0]) == expect
    assert int(scoring.masked_argmin(sums, held_t + 1, block=32)[0]) == expect
    rvictim = ref.decode_step(q, new, kv.clone(), table, held_t, held, scale, max_budget=held)[1]
    assert int(rvictim[0]) == expect


def test_tensor_parallel_all_reduce():
    """Two simulated ranks, one KV head each: rank 0's step, whose hook adds
    rank 1's head sums, evicts what one device with all heads evicts. The
    hook runs once, on [R, max_budget + 1] float32."""
    dim, bs, max_budget = 64, 16, 50
    budgets, held = [50, 37, 20], [50, 37, 11]
    kv, table, q, new, held_t = decode_inputs(21, (4, 2), dim, bs, torch.float32, budgets, held, max_budget)
    budget_t = torch.tensor(budgets, dtype=torch.int32)
    scale = dim**-0.5
    full = kv.clone()
    _, full_victim, full_scores = ref.decode_step(
        q, new, full, table, held_t, budget_t, scale, max_budget=max_budget, return_scores=True
    )
    rank1 = ref.decode_step(
        q[:, 4:], new[:, 1:], kv[:, 1:].clone(), table, held_t, budget_t, scale, max_budget=max_budget,
        num_heads_total=1, return_scores=True,
    )[2]
    calls = []

    def all_reduce(sums):
        calls.append((tuple(sums.shape), sums.dtype))
        return torch.where(torch.isinf(sums), sums, sums + rank1)

    mine = kv.clone()
    out, victim, scores = tova_decode_step(
        q[:, :4], new[:, :1], mine[:, :1], table, held_t, budget_t, scale, max_budget=max_budget,
        all_reduce=all_reduce, num_heads_total=8, attn_impl="triton", return_scores=True,
    )
    assert calls == [((3, max_budget + 1), torch.float32)]
    assert torch.equal(victim, full_victim)
    fin = torch.isfinite(full_scores)
    torch.testing.assert_close(scores[fin], full_scores[fin], rtol=1e-5, atol=1e-7)
    # rank 0 wrote its own KV head only
    assert torch.equal(as_bits(mine[:, :1]), as_bits(full[:, :1]))
    assert torch.equal(as_bits(mine[:, 1:]), as_bits(kv[:, 1:]))


def test_rejects_bad_inputs():
    kv, table, q, new, held = decode_inputs(0, (2, 2), 64, 16, torch.float32, [8], [8], 8)
    with pytest.raises(ValueError, match="max_budget"):
        tova_decode_step(q, new, kv, table, held, 9, 1.0, max_budget=8)
    with pytest.raises(ValueError, match="new_slot"):
        tova_decode_step(q, new[..., :-1], kv, table, held, 8, 1.0, max_budget=8)
    with pytest.raises(ValueError, match="kv_cache"):
        tova_decode_step(q, new, kv[..., :100], table, held, 8, 1.0, max_budget=8)


# -- attention selection (fixes: dtype rule, one probe) ---------------------------------


@pytest.fixture
def fresh_selection():
    attention.clear_selection_cache()
    yield
    attention.clear_selection_cache()


def test_flash_attention_only_for_same_half_dtypes(monkeypatch, fresh_selection):
    """An explicit kv_cache_dtype different from the model dtype must not go
    to FlashAttention ("query and key must have the same dtype")."""
    monkeypatch.setattr(attention, "_probe_flash_attn", lambda head_size, block_size: 3)
    monkeypatch.setattr(attention, "_probe_vllm_triton", lambda: True)
    cuda, f16, bf16, f32 = torch.device("cuda"), torch.float16, torch.bfloat16, torch.float32
    sel = attention.select_attention
    assert sel(cuda, 128, 16, f16, f16) == "flash_attn"
    assert sel(cuda, 128, 16, bf16, bf16) == "flash_attn"
    assert sel(cuda, 128, 16, bf16, f16) == "vllm_triton"
    assert sel(cuda, 128, 16, f16, bf16) == "vllm_triton"
    assert sel(cuda, 128, 16, bf16, f32) == "vllm_triton"
    assert sel(cuda, 128, 16, f32, f32) == "vllm_triton"
    assert sel(cuda, 128, 8, f16, f16) == "vllm_triton"  # block size not a multiple of 16
    assert sel(torch.device("cpu"), 128, 16, f16, f16) == "triton"
    attention.clear_selection_cache()
    monkeypatch.setattr(attention, "_probe_vllm_triton", lambda: False)
    assert sel(cuda, 128, 16, bf16, f16) == "triton"
    monkeypatch.setattr(attention, "_probe_flash_attn", lambda head_size, block_size: None)
    attention.clear_selection_cache()
    assert sel(cuda, 128, 16, f16, f16) == "triton"


def test_selection_probes_once(monkeypatch, fresh_selection):
    """vLLM's get_flash_attn_version logs at error level on GPUs without FA:
    the probe runs once per shape family, not per call or per step."""
    calls = []
    monkeypatch.setattr(attention, "_probe_flash_attn", lambda h, b: calls.append(("fa", h, b)))
    monkeypatch.setattr(attention, "_probe_vllm_triton", lambda: calls.append("vllm_triton") or False)
    for _ in range(50):
        assert attention.select_attention(torch.device("cuda"), 64, 16, torch.float16, torch.float16) == "triton"
        attention.select_attention("cuda", 64, 16, torch.bfloat16, torch.bfloat16)
    assert calls == [("fa", 64, 16), "vllm_triton"]
    # the decode step selects once and then reuses the cached choice
    kv, table, q, new, held = decode_inputs(0, (2, 1), 64, 16, torch.float32, [6], [6], 6)
    before = attention.select_attention.cache_info()
    for _ in range(4):
        tova_decode_step(q, new, kv, table, held, 6, 0.125, max_budget=6)
    after = attention.select_attention.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 3)


def _fake_flash_attn_module(calls):
    """A stand-in for ``vllm.vllm_flash_attn`` in plain PyTorch: paged varlen
    attention through ``block_table`` on the strided [blocks, bs, Hkv, D]
    views, bottom-right causal, LSE as [Hq, total_q]; FA's dtype rule."""

    def flash_attn_varlen_func(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, seqused_k=None,
                               softmax_scale=None, causal=False, block_table=None,
                               return_softmax_lse=False, out=None, fa_version=None, **kw):
        calls.append(fa_version)
        if q.dtype != k.dtype:
            raise RuntimeError("query and key must have the same dtype")
        assert k.stride(-1) == 1 and v.stride(-1) == 1 and k.shape[1] == v.shape[1]
        bs, hkv, dim = k.shape[1], k.shape[2], k.shape[3]
        group = q.shape[1] // hkv
        lse = torch.full((q.shape[1], q.shape[0]), float("inf"))
        for b in range(block_table.shape[0]):
            q0, q1, n = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]), int(seqused_k[b])
            slots = torch.arange(n)
            blocks = block_table[b, slots // bs].long()
            kk = k[blocks, slots % bs].float().repeat_interleave(group, 1)  # [n, Hq, D]
            vv = v[blocks, slots % bs].float().repeat_interleave(group, 1)
            s = torch.einsum("qhd,khd->hqk", q[q0:q1].float(), kk) * softmax_scale
            if causal:
                nq = q1 - q0
                allowed = torch.arange(n)[None, :] <= n - nq + torch.arange(nq)[:, None]
                s = s.masked_fill(~allowed[None], float("-inf"))
            lse[:, q0:q1] = torch.logsumexp(s, -1)
            out[q0:q1] = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vv).to(out.dtype)
        return out, lse

    return types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func)


def test_flash_attn_wiring(monkeypatch, fresh_selection):
    """The FlashAttention paths (decode: cached slots then the merge; prompt:
    varlen causal), through a PyTorch stand-in for vLLM's FA on the strided
    views: same results as the reference, the FA version probed once."""
    calls, probes = [], []
    monkeypatch.setitem(sys.modules, "vllm.vllm_flash_attn", _fake_flash_attn_module(calls))
    monkeypatch.setattr(attention, "_probe_flash_attn", lambda h, b: probes.append(1) or 3)
    dtype = torch.bfloat16
    kv, table, q, new, held = decode_inputs(3, (4, 2), 64, 16, dtype, [40, 17, 40], [40, 9, 40], 48)
    scale = 0.125
    for _ in range(3):
        mine, theirs = kv.clone(), kv.clone()
        out, victim = tova_decode_step(q, new, mine, table, held, 40, scale, max_budget=48, attn_impl="flash_attn")
        rout, rvictim = ref.decode_step(q, new, theirs, table, held, 40, scale, max_budget=48)
        torch.testing.assert_close(out.float(), rout.float(), rtol=2e-2, atol=2e-2)
        assert torch.equal(victim, rvictim) and torch.equal(as_bits(mine), as_bits(theirs))
    # the prompt path
    g = torch.Generator().manual_seed(4)
    lens = [(20, 20), (6, 33)]
    pkv = engine_cache(g, 8, 16, 2, 64, dtype)
    ptable = tables(g, 2, 3, pkv.shape[0])
    cu = torch.tensor([0, 20, 26], dtype=torch.int32)
    k_lens = torch.tensor([20, 33], dtype=torch.int32)
    pq = torch.randn(26, 8, 64, generator=g).to(dtype)
    out, lse = prefill.paged_prefill_attention(pq, pkv, ptable, cu, k_lens, scale, 20, 33, impl="flash_attn")
    rout, rlse = ref.prefill_attention(pq, pkv, ptable, cu, k_lens, scale)
    torch.testing.assert_close(out.float(), rout, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse, rlse, rtol=1e-5, atol=1e-5)
    assert calls == [3] * 4 and probes == [1]
    # kv_cache_dtype != model dtype: the selection keeps FA out of it
    monkeypatch.setattr(attention, "_probe_vllm_triton", lambda: False)
    assert attention.select_attention(torch.device("cuda"), 64, 16, torch.float16, dtype) != "flash_attn"


# -- Triton recompilation (fix: split count from max_budget only) ---------------------


def _specialization_recorder(kernels):
    """Triton's own launch specialization (what its compile cache is keyed
    by: constexprs, argument types, int ``== 1`` / ``% 16`` and pointer
    alignment) of every launch, computed by Triton's binder."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    seen = {k: set() for k in kernels}
    hooks = []
    for name, kernel in kernels.items():
        opts = {k: v for k, v in kernel.kwargs.items() if k.startswith("do_not_specialize")}
        jf = JITFunction(kernel.fn, **opts)
        binder = create_function_from_signature(jf.signature, jf.params, BaseBackend)

        def hook(*args, _binder=binder, _name=name, **kwargs):
            _, spec, _ = _binder(*args, **kwargs)
            seen[_name].add(repr(spec))

        kernel.add_pre_run_hook(hook)
        hooks.append((kernel, hook))
    return seen, hooks


@pytest.mark.parametrize("impl", ["triton", "merge"])
def test_no_recompile_across_batch_sizes(impl):
    """One compiled variant per kernel for R = 1, 3, 17, 64 rows."""
    from tova_vllm.kernels import _common  # noqa: F401

    kernels = {
        "split": attention._attn_split_kernel,
        "combine": attention._attn_combine_kernel,
        "head_sum": scoring._head_sum_kernel,
        "select_write": scoring._select_write_kernel,
    }
    if impl == "merge":
        del kernels["split"]
    seen, hooks = _specialization_recorder(kernels)
    try:
        # Large enough that a split count following the rows (the old
        # ``min(tiles, cdiv(2048, R * Hq), 64)``) would differ across R.
        max_budget, dim = 1000, 64
        for rows in (1, 3, 17, 64):
            g = torch.Generator().manual_seed(rows)
            budgets = torch.randint(1, max_budget + 1, (rows,), generator=g)
            held = torch.minimum(budgets, torch.randint(1, 40, (rows,), generator=g))
            kv, table, q, new, held_t = decode_inputs(
                rows, (2, 2), dim, 16, torch.float16, budgets.tolist(), held.tolist(), max_budget
            )
            budget_t = budgets.to(torch.int32)
            if impl == "triton":
                tova_decode_step(q, new, kv, table, held_t, budget_t, 0.125, max_budget=max_budget,
                                 attn_impl="triton")
            else:  # FlashAttention-like: out + a transposed [Hq, R] LSE, then the merge
                out_c, lse_c = ref.cached_attention(q, kv, table, held_t, 0.125)
                out, lse = attention.merge_new_token(q, out_c.half(), lse_c.t().contiguous().t(), new, 0.125)
                sums = scoring.head_sum(q, kv, table, held_t, lse, 0.125, max_budget + 1, new_slot=new)
                scoring.select_and_write(sums, held_t, budget_t, new, kv, table)
    finally:
        for kernel, hook in hooks:
            kernel.pre_run_hooks.remove(hook)
    assert {k: len(v) for k, v in seen.items()} == {k: 1 for k in kernels}, seen


def test_split_count_ignores_rows():
    assert attention.num_splits_for(256) == 1
    assert attention.num_splits_for(2048) == 8
    assert attention.num_splits_for(1 << 20) == 16


# -- the prompt path --------------------------------------------------------------------


@FEW
@given(
    st.integers(0, 2**16),
    st.sampled_from([(1, 2), (4, 2), (3, 1)]),
    st.sampled_from([16, 32]),
    st.sampled_from(list(DTYPES)),
    st.lists(st.tuples(st.integers(1, 45), st.integers(0, 40)), min_size=1, max_size=3),
    st.sampled_from([8, 128]),
)
@example(1, (4, 2), 16, "fp32", [(45, 0), (9, 30), (1, 20)], 8)
def test_prefill_matches_reference(seed, heads, bs, dt, rows, tile):
    """Bottom-right causal paged attention (full prompts: q_len == k_len;
    chunks: keys before the chunk) and the last query's head sums."""
    dtype = DTYPES[dt]
    group, hkv = heads
    dim = 64
    g = torch.Generator().manual_seed(seed)
    lens = [(n_q, n_q + before) for n_q, before in rows]
    nb = triton.cdiv(max(k for _, k in lens), bs)
    kv = engine_cache(g, len(lens) * nb + 2, bs, hkv, dim, dtype)
    table = tables(g, len(lens), nb, kv.shape[0])
    cu = torch.tensor([0] + [n for n, _ in lens]).cumsum(0).to(torch.int32)
    k_lens = torch.tensor([k for _, k in lens], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), group * hkv, dim, generator=g).to(dtype)
    scale = dim**-0.5
    max_q, max_k = max(n for n, _ in lens), max(k for _, k in lens)
    before = as_bits(kv).clone()
    out, lse = prefill.paged_prefill_attention(q, kv, table, cu, k_lens, scale, max_q, max_k, query_tile=tile)
    assert torch.equal(as_bits(kv), before)  # read only
    rout, rlse = ref.prefill_attention(q, kv, table, cu, k_lens, scale)
    assert out.dtype == dtype and lse.shape == (q.shape[0], q.shape[1]) and lse.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), rout, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, rlse, rtol=1e-5, atol=1e-5)
    cols = max_k + 3
    sums = prefill.last_query_head_sum(q, lse, kv, table, cu, k_lens, scale, cols, block_n=32)
    expect = ref.last_query_head_sum(q, rlse, kv, table, cu, k_lens, scale, cols)
    assert sums.shape == (len(lens), cols) and torch.equal(torch.isinf(sums), torch.isinf(expect))
    fin = torch.isfinite(expect)
    torch.testing.assert_close(sums[fin], expect[fin], rtol=1e-4, atol=1e-7)
    # = the last query's attention probabilities, summed over the heads
    for r, (n_q, n_k) in enumerate(lens):
        last = int(cu[r + 1]) - 1
        keys = ref.gather_slots(kv, table, r, n_k).float().repeat_interleave(group, 1)[..., :dim]
        p = torch.softmax(torch.einsum("hd,khd->hk", q[last].float(), keys) * scale, -1)
        torch.testing.assert_close(sums[r, :n_k], p.sum(0), rtol=1e-4, atol=1e-6)


# -- vLLM's Triton decode attention on this layout ----------------------------------------


def _load_vllm_triton_decode():
    """vLLM's own Triton decode-attention source, run with the real triton
    module: on the CPU vLLM swaps Triton for a placeholder (no CPU backend),
    so its module cannot simply be imported here. vLLM itself is untouched."""
    import vllm.v1.attention.ops as ops_pkg

    path = Path(ops_pkg.__file__).parent / "triton_decode_attention.py"
    src = path.read_text()
    needle = "from vllm.triton_utils import tl, triton"
    assert needle in src, "vLLM's triton_decode_attention imports changed"
    src = src.replace(needle, "import triton\nimport triton.language as tl")
    mod = types.ModuleType("_vllm_triton_decode_attention_under_interpreter")
    mod.__file__ = str(path)
    exec(compile(src, str(path), "exec"), mod.__dict__)
    return mod.decode_attention_fwd


@pytest.mark.parametrize("group,hkv,bs,dt", [(1, 2, 16, "fp32"), (4, 2, 32, "fp16")])
def test_vllm_triton_decode_attention_on_engine_layout(group, hkv, bs, dt):
    """The `vllm_triton` path: vLLM's kernel reads the strided K/V views of
    the engine's cache (side channel skipped) and returns the LSE the merge
    and the scoring consume."""
    fn = _load_vllm_triton_decode()
    dtype = DTYPES[dt]
    kv, table, q, new, held = decode_inputs(7, (group, hkv), 64, bs, dtype, [9, 75], [9, 75], 75)
    scale = 0.125
    out_c, lse_c = attention.call_vllm_triton_decode(fn, q, kv, table, held, scale, 75)
    eout, else_ = ref.cached_attention(q, kv, table, held, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(lse_c, else_, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_c.float(), eout, rtol=tol, atol=tol)
    out, _ = attention.merge_new_token(q, out_c, lse_c, new, scale)
    rout, _ = ref.decode_step(q, new, kv.clone(), table, held, 75, scale, max_budget=75)
    torch.testing.assert_close(out.float(), rout.float(), rtol=tol, atol=tol)


# -- the GPU check script ------------------------------------------------------------------


def test_gpu_check_smoke():
    """The GPU check script does not rot: its --smoke run (tiny shapes,
    Triton interpreter) passes its own checks and prints one JSON object."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["ok"] and result["smoke"] and result["interpreter"]
    checks = {r["check"] for r in result["correctness"]}
    assert checks == {"decode_step", "exact_ties", "prefill"}
    assert all(r["ok"] for r in result["correctness"])
    decode = next(iter(result["decode"].values()))
    assert [r["budget"] for r in decode["tova"]] == [8, 16]
    assert all(r["throughput_ratio_eager"] > 0 for r in decode["tova"])
    assert all(v["ok"] for v in result["prefill"].values())
    assert "Correctness vs the PyTorch reference" in proc.stderr
