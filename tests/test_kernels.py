"""The Triton kernels of the CUDA fast path, on the CPU through Triton's
interpreter, against the PyTorch reference (`tova_vllm.kernels.reference`)
and the backend's own decode math (`TovaAttentionImpl._forward_decode`).

Triton reads TRITON_INTERPRET when a kernel is defined (``@triton.jit`` at
import) and again when it runs: it is set while `tova_vllm.kernels` is
imported (reloaded if something imported it earlier without it) and during
this module's tests, and unset otherwise.
"""

from __future__ import annotations

import importlib
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
from hypothesis import HealthCheck, Phase, assume, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import tova_vllm.kernels  # noqa: E402

if not triton.knobs.runtime.interpret:
    raise RuntimeError("TRITON_INTERPRET was not picked up by triton")
if type(tova_vllm.kernels.scoring._head_sum_kernel).__name__ != "InterpretedFunction":
    for name in ("scoring", "attention", "decode_step"):
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


from tova_vllm.kernels import reference as ref  # noqa: E402
from tova_vllm.kernels import attention, scoring  # noqa: E402
from tova_vllm.kernels.decode_step import tova_decode_step  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The interpreter is slow: few, small examples; derandomized so CI is stable.
# No shrinking either: a failure prints its example, shrinking would take minutes.
FEW = settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_case(seed, rows, num_kv_heads, group, head_size, block_size, seq_lens, dtype=torch.float32):
    """A paged K|V cache with each row's blocks scattered (shuffled) over it."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(triton.cdiv(max(seq_lens), block_size), 1)
    num_blocks = rows * max_blocks + 3
    kv = torch.randn(num_blocks, num_kv_heads, block_size, 2 * head_size, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)[: rows * max_blocks]
    table = perm.view(rows, max_blocks).to(torch.int32)
    q = torch.randn(rows, num_kv_heads * group, head_size, generator=g)
    return kv, table, torch.tensor(seq_lens, dtype=torch.int32), q


def check_victims(victim, sums, seq_lens, rtol=1e-5):
    """Same argmin as the reference unless the two lowest are within float
    noise; then the kernel's pick must be one of the tied minima."""
    for r in range(sums.shape[0]):
        n = int(seq_lens[r])
        s = sums[r, :n].double()
        pick = int(victim[r])
        assert 0 <= pick < n
        low = s.min()
        if (s <= low * (1 + rtol) + 1e-12).sum() == 1:
            assert pick == int(torch.argmin(s)), (r, pick, int(torch.argmin(s)))
        else:
            assert s[pick] <= low * (1 + rtol) + 1e-12


shapes = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**16),
        "group": st.sampled_from([1, 3, 4, 8]),
        "num_kv_heads": st.sampled_from([1, 2]),
        "block_size": st.sampled_from([16, 32, 128]),
        "head_size": st.sampled_from([64, 128]),
        "dtype": st.sampled_from(list(DTYPES)),
        "seq_lens": st.lists(st.integers(1, 150), min_size=1, max_size=3),
    }
)


@FEW
@given(shapes)
def test_scoring_matches_reference(case):
    dtype = DTYPES[case.pop("dtype")]
    if case["group"] * case["num_kv_heads"] > 8:
        case["num_kv_heads"] = 1  # keep the interpreter's work small
    rows = len(case["seq_lens"])
    kv, table, seq_lens, q = make_case(rows=rows, dtype=dtype, **case)
    q = q.to(dtype)
    dim = case["head_size"]
    scale = dim**-0.5
    _, lse = ref.decode_attention(q, kv, table, seq_lens, scale)
    num_cols = int(seq_lens.max()) + 5  # columns past every row: +inf
    keys = kv[..., :dim]  # strided view of the combined cache, as the backend has it
    sums = scoring.head_sum(q, keys, table, seq_lens, lse, scale, num_cols, block_n=32)
    expect = ref.head_sum(q, keys, table, seq_lens, lse, scale, num_cols)
    assert torch.equal(torch.isinf(sums), torch.isinf(expect))
    finite = torch.isfinite(expect)
    torch.testing.assert_close(sums[finite], expect[finite], rtol=2e-5, atol=1e-6)
    victim = scoring.masked_argmin(sums, seq_lens, block=32)
    check_victims(victim, expect, seq_lens)
    victim2, mean = scoring.tova_select(q, keys, table, seq_lens, lse, scale, num_cols, return_scores=True)
    assert torch.equal(victim2, victim)
    torch.testing.assert_close(mean[finite], expect[finite] / q.shape[1], rtol=2e-5, atol=1e-7)


@FEW
@given(shapes, st.sampled_from([None, 3]))
def test_attention_matches_reference(case, splits):
    dtype = DTYPES[case.pop("dtype")]
    if case["group"] * case["num_kv_heads"] > 4:
        case["group"], case["num_kv_heads"] = min(case["group"], 4), 1
    rows = len(case["seq_lens"])
    kv, table, seq_lens, q = make_case(rows=rows, dtype=dtype, **case)
    q = q.to(dtype)
    scale = case["head_size"] ** -0.5
    out, lse = attention.triton_decode_attention(
        q, kv, table, seq_lens, scale, int(seq_lens.max()), num_splits=splits, block_n=32
    )
    eout, else_ = ref.decode_attention(q, kv, table, seq_lens, scale)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(lse, else_, rtol=1e-5, atol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), eout, rtol=tol, atol=tol)


@pytest.mark.parametrize("tied", [[2, 5, 7], [3, 70], [70, 100], [100, 64]])
def test_exact_ties_evict_lowest_slot(tied):
    """Identical (zero) keys give bit-identical scores, lowest of all (every
    other key has a positive dot product with every query): the lowest slot
    index is evicted, also across tiles (block_n=32, 64: ties in different
    tiles and in the same tile)."""
    n, dim, hkv, group = 110, 64, 2, 3
    kv, table, seq_lens, q = make_case(1, 1, hkv, group, dim, 16, [n])
    q = q.abs() + 0.1
    kv[..., :dim] = kv[..., :dim].abs() + 0.1
    bs = 16
    for slot in tied:
        kv[int(table[0, slot // bs]), :, slot % bs, :dim] = 0.0
    scale = dim**-0.5
    _, lse = ref.decode_attention(q, kv, table, seq_lens, scale)
    for block_n in (32, 64):
        sums = scoring.head_sum(q, kv[..., :dim], table, seq_lens, lse, scale, n, block_n=block_n)
        assert len(set(sums[0, tied].tolist())) == 1
        assert int(scoring.masked_argmin(sums, seq_lens, block=block_n)[0]) == min(tied)
    expect = ref.head_sum(q, kv[..., :dim], table, seq_lens, lse, scale, n)
    assert int(ref.masked_argmin(expect, seq_lens)[0]) == min(tied)


def _backend_decode(query, key, value, kv_cache, block_table, positions, budgets):
    """The backend's batched TOVA decode math (`TovaAttentionImpl._forward_decode`
    with its metadata from `_decode_batch`), op for op: gather whole blocks,
    masked matmul scores, float32 softmax, head mean over all query heads,
    argmin (lowest index on ties) over the k + 1 slots, scratch -> victim.
    Transcribed rather than called: its private signatures are in flux."""
    from tova_vllm import policies

    rows, hq, dim = query.shape
    hkv, bs = kv_cache.shape[1], kv_cache.shape[2]
    held = torch.tensor([min(p, k) for p, k in zip(positions, budgets)])
    budget_t = torch.tensor(budgets)
    nb = int(held.max()) // bs + 1
    last_block = torch.div(held, bs, rounding_mode="floor").unsqueeze(1)
    blocks = torch.gather(block_table.long(), 1, torch.minimum(torch.arange(nb).unsqueeze(0), last_block))
    valid = torch.arange(nb * bs).unsqueeze(0) <= held.unsqueeze(1)
    wb = torch.gather(block_table.long(), 1, torch.div(held, bs, rounding_mode="floor").unsqueeze(1)).flatten()
    kv_cache[wb, :, held % bs, :] = torch.cat((key, value), dim=-1).to(kv_cache.dtype)
    kv = kv_cache.transpose(0, 1)[:, blocks].flatten(2, 3).to(query.dtype)  # [Hkv, R, n, 2D]
    keys, values = kv[..., :dim], kv[..., dim:]
    qg = query.view(rows, hkv, hq // hkv, dim).transpose(0, 1)
    scores = torch.matmul(qg, keys.transpose(-1, -2)) * dim**-0.5
    scores = scores.masked_fill(~valid[None, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    out = torch.matmul(probs.to(query.dtype), values).transpose(0, 1).reshape(rows, hq, dim)
    probs = probs.transpose(0, 1)
    evict = torch.nonzero(held == budget_t).flatten()
    if evict.numel():
        pri = policies.head_average(probs[evict].reshape(evict.numel(), hq, -1))
        cols = torch.arange(pri.shape[-1]).unsqueeze(0)
        pri = pri.masked_fill(cols > budget_t[evict].unsqueeze(1), float("inf"))
        victim = policies.evict_one(pri)
        dst = blocks[evict, torch.div(victim, bs, rounding_mode="floor")]
        kv_cache[dst, :, victim % bs, :] = kv_cache[wb[evict], :, held[evict] % bs, :]
    return out


@settings(
    max_examples=5,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(
    st.integers(0, 2**16),
    st.sampled_from([(1, 4), (3, 1), (4, 2), (8, 1)]),  # (group, num_kv_heads)
    st.sampled_from([16, 32]),
    st.lists(st.tuples(st.integers(0, 120), st.integers(3, 60)), min_size=1, max_size=3),
    st.booleans(),
)
# Always: rows evicting (at and past their budget) next to one that does not.
@example(1, (4, 2), 16, [(5, 8), (40, 20), (20, 20)], True)
@example(2, (3, 1), 32, [(70, 33), (33, 33), (2, 33)], False)
def test_decode_step_matches_backend(seed, heads, block_size, rows_spec, per_row_budget):
    """Output and cache after eviction equal the backend's (float32), with
    rows below, at and past their budget mixed; one budget for all rows, or
    (per-request policies) one per row."""
    group, hkv = heads
    dim = 64
    positions = [p for p, _ in rows_spec]
    budgets = [k for _, k in rows_spec] if per_row_budget else [rows_spec[0][1]] * len(rows_spec)
    rows, top = len(positions), max(budgets)
    seq_lens = [min(p, k) + 1 for p, k in zip(positions, budgets)]
    nb = triton.cdiv(top + 1, block_size)
    kv, table, _, q = make_case(seed, rows, hkv, group, dim, block_size, [nb * block_size] * rows)
    g = torch.Generator().manual_seed(seed + 1)
    key = torch.randn(rows, hkv, dim, generator=g)
    value = torch.randn(rows, hkv, dim, generator=g)
    scale = dim**-0.5
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    # No near-ties among the evicting rows' scores (else either pick is right).
    probe = kv.clone()
    ref.write_slots(probe, table, seq.long() - 1, key, value)
    _, lse = ref.decode_attention(q, probe, table, seq, scale)
    sums = ref.head_sum(q, probe[..., :dim], table, seq, lse, scale, top + 1)
    for r in range(rows):
        if seq_lens[r] == budgets[r] + 1:
            low2 = torch.sort(sums[r, : seq_lens[r]].double()).values[:2]
            assume(float(low2[1] - low2[0]) > 1e-5 * float(low2[0]))

    mine = kv.clone()
    budget_arg = torch.tensor(budgets) if per_row_budget else budgets[0]
    out, victim = tova_decode_step(
        q, key, value, mine, table, seq, budget_arg, scale, attn_impl="triton", max_budget=top
    )
    theirs = kv.clone()
    expect = _backend_decode(q, key, value, theirs, table, positions, budgets)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    assert torch.equal(mine, theirs)
    if not per_row_budget:  # the PyTorch reference of the step agrees too
        refcache = kv.clone()
        rout, rvictim = ref.decode_step(q, key, value, refcache, table, seq, budgets[0], scale)
        assert torch.equal(victim, rvictim)
        assert torch.equal(mine, refcache)
        torch.testing.assert_close(out, rout, rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("group,hkv,block_size", [(1, 2, 16), (4, 2, 32)])
def test_vllm_triton_decode_attention_on_our_layout(group, hkv, block_size):
    """The `vllm_triton` path: vLLM's kernel reads our [blocks, Hkv, bs, K|V]
    cache through the strided views we pass and returns the LSE the scoring
    consumes."""
    fn = _load_vllm_triton_decode()
    kv, table, seq_lens, q = make_case(7, 2, hkv, group, 64, block_size, [9, 75])
    scale = 0.125
    out, lse = attention.call_vllm_triton_decode(fn, q, kv, table, seq_lens, scale, 75)
    eout, else_ = ref.decode_attention(q, kv, table, seq_lens, scale)
    torch.testing.assert_close(lse, else_, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, eout, rtol=1e-5, atol=1e-5)


def test_select_attention_on_cpu():
    assert attention.select_attention(torch.device("cpu"), 64, 16) == "triton"


def test_gpu_check_smoke():
    """The GPU check script does not rot: its --smoke run (tiny shapes,
    Triton interpreter) passes its own correctness checks and prints tables."""
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
    assert "correctness: all" in proc.stdout and "throughput ratio" in proc.stdout, proc.stdout
