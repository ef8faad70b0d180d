"""GPU check of the CUDA fast path: one prepared command, no vLLM, no network.

    python benchmarks/gpu_check.py            # one CUDA GPU; well under 5 minutes on an H200
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --smoke   # CPU, tiny shapes (the tests)

Everything runs on the engine's cache layout (`tova_vllm.kernels.layout`:
``torch.empty(blocks, bs, Hkv, C).transpose(1, 2)``, ``C = 2D + 16 bytes``
of side channel) with GQA, at Llama-3-8B attention shapes (32 query / 8 KV
heads, head 128) and LLaMA-2-7B's (32 / 32, head 128):

1. Correctness against `tova_vllm.kernels.reference`, fp16 and bf16: the
   decode step (ragged held / budget rows, below and at the budget; victims,
   output, scores, the cache bit for bit: only the written slot changes and it
   gets the caller's whole slot), constructed exact ties (cached vs cached,
   cached vs the new token, the new token dropped), the prompt path
   (`paged_prefill_attention` on full prompts and chunks, `last_query_head_sum`).
2. Decode-step timings, fp16, block 16: TOVA at budgets 256/512/1024/2048,
   every row at its budget (evicting), with the batch that fills the same KV
   memory as a full-cache batch (``--full-batch``) of 4,096-token sequences;
   against full-cache paged attention (write the new token, attend over 4,096
   slots). Attention is the kernel `select_attention` picks on both sides
   (this package's Triton kernel where vLLM is absent). Eager (each kernel
   launched from Python, as vLLM runs attention between CUDA-graph pieces) and
   CUDA-graphed; per-token throughput ratio = (batch / step) / (full batch /
   full step).
3. The prompt path at an 8k-token prompt: `paged_prefill_attention` (the
   PyTorch fallback where vLLM is absent) and the last query's scoring, with
   the last query checked against the reference.

stdout: ONE JSON object (``ok``, ``correctness``, ``decode``, ``prefill``, ...);
human-readable tables go to stderr. Exit status 0 iff every check passed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path


def _args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU under TRITON_INTERPRET=1)")
    p.add_argument("--full-batch", type=int, default=64, help="full-cache batch of --seq-len sequences")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--budgets", default="256,512,1024,2048")
    p.add_argument("--prompt", type=int, default=8192, help="prompt length of the prompt-path timing")
    p.add_argument("--iters", type=int, default=20)
    return p.parse_args()


ARGS = _args()
import torch  # noqa: E402

if ARGS.smoke and not torch.cuda.is_available():
    # Triton reads this when the kernels are defined (import below).
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402

from tova_vllm.kernels import reference as ref  # noqa: E402
from tova_vllm.kernels.attention import decode_attention, select_attention  # noqa: E402
from tova_vllm.kernels.decode_step import tova_decode_step  # noqa: E402
from tova_vllm.kernels.layout import as_bits, slot_elems  # noqa: E402
from tova_vllm.kernels.prefill import last_query_head_sum, paged_prefill_attention  # noqa: E402
from tova_vllm.kernels.scoring import head_sum, select_and_write  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
SHAPES = {"llama3-8b": (32, 8, 128), "llama2-7b": (32, 32, 128)}  # Hq, Hkv, D
SMOKE_SHAPES = {"gqa-4/2": (4, 2, 64), "mha-2/2": (2, 2, 64)}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def table(title, header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join("-" * w for w in widths)
    log(f"\n{title}\n{line}")
    log("  ".join(str(h).rjust(w) for h, w in zip(header, widths)))
    log(line)
    for r in rows:
        log("  ".join(str(x).rjust(w) for x, w in zip(r, widths)))
    log(line)


def num(x, digits=4):
    """JSON-safe float."""
    if x is None:
        return None
    x = float(x)
    return round(x, digits) if math.isfinite(x) else None


# -- cases on the engine's layout -----------------------------------------------


def engine_cache(num_blocks, bs, hkv, dim, dtype, gen):
    """``torch.empty(nb, bs, Hkv, C).transpose(1, 2)`` (as the engine does),
    K/V random, side channel = int32 position + float32 score bit patterns."""
    c = slot_elems(dim, dtype)
    kv = torch.empty(num_blocks, bs, hkv, c, dtype=dtype, device=DEVICE).transpose(1, 2)
    kv[..., : 2 * dim] = torch.randn(num_blocks, hkv, bs, 2 * dim, generator=gen).to(dtype).to(DEVICE)
    side = as_bits(kv[..., 2 * dim :]).view(torch.int32)  # the 16 bytes as 4 int32
    side.copy_(torch.randint(-(2**31), 2**31 - 1, side.shape, generator=gen, dtype=torch.int32).to(DEVICE))
    return kv


def block_tables(rows, blocks_per_row, gen):
    """Distinct blocks per row, shuffled, never block 0 (vLLM's null block)."""
    perm = torch.randperm(rows * blocks_per_row, generator=gen) + 1
    return perm.view(rows, blocks_per_row).to(torch.int32).to(DEVICE)


def new_slots(rows, hkv, dim, dtype, gen, positions):
    c = slot_elems(dim, dtype)
    s = torch.randn(rows, hkv, c, generator=gen).to(dtype)
    side = as_bits(s[..., 2 * dim :]).view(torch.int32)
    side[..., 0] = positions.view(-1, 1).to(torch.int32)
    side[..., 1] = torch.rand(rows, hkv, generator=gen).view(torch.int32)
    return s.to(DEVICE)


def victims_ok(victim, sums, held, budget, rtol=1e-4):
    """Below the budget: ``held``; at it: the reference's argmin, or one of
    its minima within float noise."""
    for r in range(sums.shape[0]):
        h = int(held[r])
        if h < int(budget[r]):
            if int(victim[r]) != h:
                return False
            continue
        s = sums[r, : h + 1].double()
        low = s.min()
        if not bool(s[int(victim[r])] <= low * (1 + rtol) + 1e-12):
            return False
    return True


def cache_ok(before, after, new_slot, table_, held, budget, victim):
    """Only the slot the kernel chose changed, and it holds the whole new slot."""
    expect = as_bits(before).clone()
    bs = before.shape[2]
    for r in range(victim.shape[0]):
        v, h = int(victim[r]), int(held[r])
        if v < h or h < int(budget[r]):
            expect[int(table_[r, v // bs]), :, v % bs, :] = as_bits(new_slot[r])
    return bool(torch.equal(expect, as_bits(after)))


def decode_case(name, dt, gen, rows, max_budget, bs):
    hq, hkv, dim = (SMOKE_SHAPES if ARGS.smoke else SHAPES)[name]
    dtype = DTYPES[dt]
    nb = triton.cdiv(max_budget, bs)
    kv = engine_cache(rows * nb + 1, bs, hkv, dim, dtype, gen)
    tab = block_tables(rows, nb, gen)
    budget = torch.randint(1, max_budget + 1, (rows,), generator=gen)
    budget[0], budget[1] = max_budget, (max_budget // bs) * bs or 1  # the maximum, a multiple of bs
    held = torch.where(torch.arange(rows) % 2 == 0, budget, (torch.rand(rows, generator=gen) * budget).long() + 1)
    held = torch.minimum(held, budget)
    q = torch.randn(rows, hq, dim, generator=gen).to(dtype).to(DEVICE)
    new = new_slots(rows, hkv, dim, dtype, gen, held + 1000)
    return kv, tab, held.to(torch.int32).to(DEVICE), budget.to(torch.int32).to(DEVICE), q, new, dim


def check_decode(name, dt, gen, rows, max_budget, bs):
    kv, tab, held, budget, q, new, dim = decode_case(name, dt, gen, rows, max_budget, bs)
    scale = dim**-0.5
    mine, theirs = kv.clone(), kv.clone()
    out, victim, scores = tova_decode_step(
        q, new, mine, tab, held, budget, scale, max_budget=max_budget, return_scores=True
    )
    rout, rvictim, rscores = ref.decode_step(
        q, new, theirs, tab, held, budget, scale, max_budget=max_budget, return_scores=True
    )
    fin = torch.isfinite(rscores)
    score_rel = ((scores[fin] - rscores[fin]).abs() / rscores[fin].abs().clamp_min(1e-30)).max().item()
    out_err = (out.float() - rout.float()).abs().max().item()
    v_ok = victims_ok(victim.cpu(), rscores.cpu(), held.cpu(), budget.cpu())
    c_ok = cache_ok(kv, mine, new, tab, held, budget, victim)
    inf_ok = bool(torch.equal(torch.isinf(scores), torch.isinf(rscores)))
    ok = v_ok and c_ok and inf_ok and out_err < 2e-2 and score_rel < 1e-3
    return {
        "check": "decode_step", "shape": name, "dtype": dt, "rows": rows, "max_budget": max_budget,
        "block_size": bs, "attn_impl": select_attention(DEVICE, dim, bs, q.dtype, kv.dtype),
        "out_max_abs_err": num(out_err, 6), "score_max_rel_err": num(score_rel, 8),
        "victims_ok": v_ok, "cache_ok": c_ok, "same_victims_as_reference": bool(torch.equal(victim, rvictim)),
        "ok": bool(ok),
    }


def check_ties(name, dt, gen, bs):
    """Zero keys: q.k = 0, below every other (positive) key: exact ties."""
    hq, hkv, dim = (SMOKE_SHAPES if ARGS.smoke else SHAPES)[name]
    dtype, held_n = DTYPES[dt], 3 * bs + 5
    results = {}
    for case, zero_slots, zero_new, expect in (
        ("cached_vs_cached", [7, 2 * bs + 1], False, 7),
        ("cached_vs_new", [bs + 3], True, bs + 3),
        ("new_dropped", [], True, held_n),
    ):
        nb = triton.cdiv(held_n, bs)
        kv = engine_cache(nb + 1, bs, hkv, dim, dtype, gen)
        kv[..., :dim] = kv[..., :dim].abs() + 0.1
        tab = block_tables(1, nb, gen)
        for s in zero_slots:
            kv[int(tab[0, s // bs]), :, s % bs, :dim] = 0
        q = (torch.rand(1, hq, dim, generator=gen) + 0.1).to(dtype).to(DEVICE)
        new = new_slots(1, hkv, dim, dtype, gen, torch.tensor([5000]))
        new[..., :dim] = 0 if zero_new else new[..., :dim].abs() + 0.1
        held = torch.tensor([held_n], dtype=torch.int32, device=DEVICE)
        mine = kv.clone()
        _, victim = tova_decode_step(q, new, mine, tab, held, held_n, dim**-0.5, max_budget=held_n)
        ok = int(victim[0]) == expect and cache_ok(kv, mine, new, tab, held, held, victim)
        results[case] = bool(ok)
    return {"check": "exact_ties", "shape": name, "dtype": dt, **results, "ok": all(results.values())}


def prefill_case(name, dtype, gen, lens, bs):
    hq, hkv, dim = (SMOKE_SHAPES if ARGS.smoke else SHAPES)[name]
    rows = len(lens)
    nb = triton.cdiv(max(k for _, k in lens), bs)
    kv = engine_cache(rows * nb + 1, bs, hkv, dim, dtype, gen)
    tab = block_tables(rows, nb, gen)
    cu = torch.tensor([0] + [q for q, _ in lens], dtype=torch.int32).cumsum(0).to(torch.int32)
    k_lens = torch.tensor([k for _, k in lens], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), hq, dim, generator=gen).to(dtype).to(DEVICE)
    return kv, tab, cu.to(DEVICE), k_lens.to(DEVICE), q, dim


def check_prefill(name, dt, gen, lens, bs):
    dtype = DTYPES[dt]
    kv, tab, cu, k_lens, q, dim = prefill_case(name, dtype, gen, lens, bs)
    scale = dim**-0.5
    max_q, max_k = max(a for a, _ in lens), max(b for _, b in lens)
    out, lse = paged_prefill_attention(q, kv, tab, cu, k_lens, scale, max_q, max_k)
    rout, rlse = ref.prefill_attention(q, kv, tab, cu, k_lens, scale)
    sums = last_query_head_sum(q, lse, kv, tab, cu, k_lens, scale, max_k)
    rsums = ref.last_query_head_sum(q, rlse, kv, tab, cu, k_lens, scale, max_k)
    fin = torch.isfinite(rsums)
    out_err = (out.float() - rout).abs().max().item()
    lse_err = (lse - rlse).abs().max().item()
    rel = ((sums[fin] - rsums[fin]).abs() / rsums[fin].clamp_min(1e-30)).max().item()
    inf_ok = bool(torch.equal(torch.isinf(sums), torch.isinf(rsums)))
    ok = out_err < 2e-2 and lse_err < 1e-3 and rel < 1e-3 and inf_ok
    return {
        "check": "prefill", "shape": name, "dtype": dt, "rows_q_k": lens, "out_max_abs_err": num(out_err, 6),
        "lse_max_abs_err": num(lse_err, 6), "last_query_score_max_rel_err": num(rel, 8), "ok": bool(ok),
    }


def correctness():
    gen = torch.Generator().manual_seed(0)
    res = []
    rows, max_budget = (3, 40) if ARGS.smoke else (8, 300)
    lens = [(37, 37), (9, 30), (1, 21)] if ARGS.smoke else [(300, 300), (64, 200), (1, 77)]
    shapes = SMOKE_SHAPES if ARGS.smoke else SHAPES
    for name in shapes:
        for dt in DTYPES:
            res.append(check_decode(name, dt, gen, rows, max_budget, 16))
            res.append(check_ties(name, dt, gen, 16))
            res.append(check_prefill(name, dt, gen, lens, 16))
    table(
        f"Correctness vs the PyTorch reference ({DEVICE.type}; engine layout, block 16)",
        ["check", "shape", "dtype", "details", "result"],
        [
            [r["check"], r["shape"], r["dtype"],
             ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("check", "shape", "dtype", "ok")),
             "ok" if r["ok"] else "FAIL"]
            for r in res
        ],
    )
    return res


# -- timings --------------------------------------------------------------------


def timeit(fn, iters):
    """Seconds per call of ``iters`` back-to-back calls (after one warm-up
    that compiles); on CUDA between events, without syncs in between."""
    fn()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters / 1e3
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def graphed(fn, errors):
    """``fn`` captured in a CUDA graph (fixed shapes, no host sync), or None."""
    if DEVICE.type != "cuda":
        return None
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g.replay
    except Exception as e:  # report, do not hide
        errors.append(f"CUDA graph capture failed: {type(e).__name__}: {e}")
        log(errors[-1])
        return None


def paged(rows, slots, hkv, bs, dim, dtype):
    nb = triton.cdiv(slots, bs)
    c = slot_elems(dim, dtype)
    kv = torch.empty(rows * nb + 1, bs, hkv, c, dtype=dtype, device=DEVICE).transpose(1, 2)
    kv.normal_()
    tab = (torch.randperm(rows * nb, device=DEVICE) + 1).view(rows, nb).to(torch.int32)
    return kv, tab


def decode_bench(errors):
    if ARGS.smoke:
        seq_len, full_batch, budgets, iters, shapes = 32, 2, [8, 16], 1, {"gqa-4/2": SMOKE_SHAPES["gqa-4/2"]}
    else:
        seq_len, full_batch, iters, shapes = ARGS.seq_len, ARGS.full_batch, ARGS.iters, SHAPES
        budgets = [int(b) for b in ARGS.budgets.split(",")]
    dtype, bs = torch.float16, 16
    result = {}
    for name, (hq, hkv, dim) in shapes.items():
        scale = dim**-0.5
        impl = select_attention(DEVICE, dim, bs, dtype, dtype)
        # full cache: each row writes its new token into slot seq_len - 1 and attends over seq_len slots
        kv, tab = paged(full_batch, seq_len, hkv, bs, dim, dtype)
        q = torch.randn(full_batch, hq, dim, dtype=dtype, device=DEVICE)
        new = torch.randn(full_batch, hkv, kv.shape[-1], dtype=dtype, device=DEVICE)
        seq = torch.full((full_batch,), seq_len, dtype=torch.int32, device=DEVICE)
        last = torch.full((full_batch,), seq_len - 1, dtype=torch.long, device=DEVICE)
        wb = tab.long()[torch.arange(full_batch, device=DEVICE), last // bs]
        out = torch.empty_like(q)

        def full_step():
            kv[wb, :, last % bs, :] = new
            decode_attention(q, kv, tab, seq, scale, seq_len, out=out, impl=impl)

        t_full = timeit(full_step, iters)
        g = graphed(full_step, errors)
        t_full_g = timeit(g, iters) if g else None
        kv_gib = kv.numel() * kv.element_size() / 2**30
        del kv, tab, g
        rows_out = []
        for budget in budgets:
            slots = triton.cdiv(budget, bs) * bs  # no scratch slot: ceil(budget / bs) blocks
            batch = full_batch * triton.cdiv(seq_len, bs) * bs // slots  # same KV memory
            kv, tab = paged(batch, budget, hkv, bs, dim, dtype)
            q = torch.randn(batch, hq, dim, dtype=dtype, device=DEVICE)
            new = torch.randn(batch, hkv, kv.shape[-1], dtype=dtype, device=DEVICE)
            held = torch.full((batch,), budget, dtype=torch.int32, device=DEVICE)  # every row evicts
            budget_t = held.clone()
            out = torch.empty_like(q)
            _, lse = decode_attention(q, kv, tab, held, scale, budget, new_slot=new, impl=impl)
            sums = head_sum(q, kv, tab, held, lse, scale, budget + 1, new_slot=new)

            def step():
                tova_decode_step(q, new, kv, tab, held, budget_t, scale, max_budget=budget, output=out, attn_impl=impl)

            def attn():
                decode_attention(q, kv, tab, held, scale, budget, new_slot=new, out=out, impl=impl)

            def score():
                head_sum(q, kv, tab, held, lse, scale, budget + 1, new_slot=new, out=sums)

            def select():
                select_and_write(sums, held, budget_t, new, kv, tab)

            t_step, t_attn = timeit(step, iters), timeit(attn, iters)
            t_score, t_sel = timeit(score, iters), timeit(select, iters)
            g = graphed(step, errors)
            t_step_g = timeit(g, iters) if g else None
            ratio = (batch / t_step) / (full_batch / t_full)
            ratio_g = (batch / t_step_g) / (full_batch / t_full_g) if t_step_g and t_full_g else None
            rows_out.append({
                "budget": budget, "batch": batch, "attn_ms": num(t_attn * 1e3), "score_ms": num(t_score * 1e3),
                "select_write_ms": num(t_sel * 1e3), "step_eager_ms": num(t_step * 1e3),
                "step_graphed_ms": num(t_step_g * 1e3) if t_step_g else None,
                "score_share_eager": num(t_score / t_step, 3),
                "throughput_ratio_eager": num(ratio, 3), "throughput_ratio_graphed": num(ratio_g, 3),
            })
            del kv, tab, g
        result[name] = {
            "heads_q_kv_dim": [hq, hkv, dim], "dtype": "fp16", "block_size": bs, "attn_impl": impl,
            "full": {"batch": full_batch, "seq_len": seq_len, "kv_gib_per_layer": num(kv_gib, 3),
                     "step_eager_ms": num(t_full * 1e3), "step_graphed_ms": num(t_full_g * 1e3) if t_full_g else None},
            "tova": rows_out,
        }
        table(
            f"Decode step, one layer, {name} (Hq {hq}, Hkv {hkv}, head {dim}), fp16, block {bs}, attention "
            f"'{impl}', {DEVICE.type}\nfull cache: batch {full_batch} x {seq_len} tokens, {kv_gib:.2f} GiB per "
            f"layer; step {t_full * 1e3:.3f} ms eager"
            + (f", {t_full_g * 1e3:.3f} ms graphed" if t_full_g else ""),
            ["budget", "batch", "attn ms", "score ms", "select ms", "step ms", "graphed ms", "score share",
             "ratio eager", "ratio graphed"],
            [[r["budget"], r["batch"], r["attn_ms"], r["score_ms"], r["select_write_ms"], r["step_eager_ms"],
              r["step_graphed_ms"], r["score_share_eager"], r["throughput_ratio_eager"],
              r["throughput_ratio_graphed"]] for r in rows_out],
        )
    log("ratio = (batch / TOVA step time) / (full batch / full-cache step time): decode tokens per second "
        "of one layer's attention step against full-cache attention in the same KV memory.")
    return result


def prefill_bench():
    gen = torch.Generator().manual_seed(1)
    n, iters = (48, 1) if ARGS.smoke else (ARGS.prompt, 3)
    shapes = {"gqa-4/2": SMOKE_SHAPES["gqa-4/2"]} if ARGS.smoke else SHAPES
    dtype, bs, result = torch.float16, 16, {}
    for name in shapes:
        kv, tab, cu, k_lens, q, dim = prefill_case(name, dtype, gen, [(n, n)], bs)
        scale = dim**-0.5
        impl = "flash_attn" if select_attention(DEVICE, dim, bs, dtype, dtype) == "flash_attn" else "torch"
        out, lse = paged_prefill_attention(q, kv, tab, cu, k_lens, scale, n, n)
        t_attn = timeit(lambda: paged_prefill_attention(q, kv, tab, cu, k_lens, scale, n, n, out=out), iters)
        sums = last_query_head_sum(q, lse, kv, tab, cu, k_lens, scale, n)
        t_score = timeit(lambda: last_query_head_sum(q, lse, kv, tab, cu, k_lens, scale, n, out=sums), iters)
        # the last query against the reference (one query over all n keys: cheap)
        rout, rlse = ref.cached_attention(q[-1:], kv, tab, k_lens, scale)
        rsums = ref.head_sum(q[-1:], kv, tab, k_lens, rlse, scale, n)
        out_err = (out[-1:].float() - rout).abs().max().item()
        lse_err = (lse[-1:] - rlse).abs().max().item()
        rel = ((sums - rsums).abs() / rsums.clamp_min(1e-30)).max().item()
        ok = out_err < 2e-2 and lse_err < 1e-3 and rel < 1e-3
        result[name] = {
            "prompt": n, "impl": impl, "attention_ms": num(t_attn * 1e3), "last_query_score_ms": num(t_score * 1e3),
            "last_query_out_err": num(out_err, 6), "last_query_lse_err": num(lse_err, 6),
            "last_query_score_rel_err": num(rel, 8), "ok": bool(ok),
        }
        del kv, tab, q, out, lse
    table(
        f"Prompt path, one layer, fp16, block {bs}, {DEVICE.type}",
        ["shape", "prompt", "impl", "attention ms", "last-query score ms", "last query ok"],
        [[k, v["prompt"], v["impl"], v["attention_ms"], v["last_query_score_ms"], v["ok"]] for k, v in result.items()],
    )
    return result


def main():
    t0 = time.perf_counter()
    info = {
        "torch": torch.__version__, "triton": triton.__version__, "device": str(DEVICE),
        "device_name": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
        "interpreter": INTERPRET, "smoke": ARGS.smoke,
    }
    log(", ".join(f"{k} {v}" for k, v in info.items()))
    errors: list[str] = []
    corr = correctness()
    decode = decode_bench(errors)
    prefill = prefill_bench()
    ok = all(r["ok"] for r in corr) and all(v["ok"] for v in prefill.values())
    result = {
        "ok": bool(ok), **info, "correctness": corr, "decode": decode, "prefill": prefill,
        "errors": errors, "elapsed_s": num(time.perf_counter() - t0, 1),
    }
    if INTERPRET:
        result["note"] = "Triton interpreter: times say nothing about speed; the run checks shapes and semantics."
    log(f"correctness: {'all passed' if ok else 'FAILURES'}; total {result['elapsed_s']} s")
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
