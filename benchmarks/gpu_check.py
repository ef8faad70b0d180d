"""GPU check of the CUDA fast path: one command, no vLLM needed.

    python benchmarks/gpu_check.py            # on one CUDA GPU, a few minutes
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --smoke   # CPU, tiny shapes (CI)

1. Correctness: the Triton kernels (`tova_vllm.kernels`: fused scoring, paged
   decode attention with LSE, the whole decode step) against the PyTorch
   reference (`tova_vllm.kernels.reference`) over GQA ratios 1/3/4/8, block
   sizes 16/32/128, head sizes 64/128, fp32/fp16/bf16 caches, ragged lengths.
2. Decode-step benchmark at LLaMA-2-7B attention shapes (32 heads, head 128,
   fp16, block 16): full-cache attention over 4,096-token sequences at batch
   ``--full-batch`` vs TOVA (attention + scoring + eviction) at budgets
   256/512/1024/2048 with the batch that fills the same KV memory. Prints per
   step times, the per-token throughput ratio the kernels allow (attention
   only, and with one layer's LLaMA-2-7B GEMMs added as an estimate of the
   whole layer), and scoring's share of the step. Attention is this package's
   Triton kernel on both sides (vLLM's kernels are not importable here).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path


def _args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU under TRITON_INTERPRET=1)")
    p.add_argument("--full-batch", type=int, default=64, help="full-cache batch of 4,096-token sequences")
    p.add_argument("--budgets", default="256,512,1024,2048")
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
from tova_vllm.kernels import scoring  # noqa: E402
from tova_vllm.kernels.attention import triton_decode_attention  # noqa: E402
from tova_vllm.kernels.decode_step import tova_decode_step  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def table(title, header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join("-" * w for w in widths)
    print(f"\n{title}\n{line}")
    print("  ".join(str(h).rjust(w) for h, w in zip(header, widths)))
    print(line)
    for r in rows:
        print("  ".join(str(x).rjust(w) for x, w in zip(r, widths)))
    print(line, flush=True)


def make_case(gen, rows, hkv, group, dim, bs, seq_lens, dtype):
    nb = max(triton.cdiv(max(seq_lens), bs), 1)
    num_blocks = rows * nb + 3
    kv = torch.randn(num_blocks, hkv, bs, 2 * dim, generator=gen).to(dtype)
    table_ = torch.randperm(num_blocks, generator=gen)[: rows * nb].view(rows, nb).to(torch.int32)
    q = torch.randn(rows, hkv * group, dim, generator=gen).to(dtype)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    return kv.to(DEVICE), table_.to(DEVICE), seq.to(DEVICE), q.to(DEVICE)


def victims_ok(victim, sums, seq, rtol=1e-5):
    """Same argmin as the reference, or one of its float-noise-tied minima."""
    for r in range(sums.shape[0]):
        s = sums[r, : int(seq[r])].double()
        low = s.min()
        tied = s <= low * (1 + rtol) + 1e-12
        if not bool(tied[int(victim[r])]):
            return False
    return True


def correctness(smoke):
    if smoke:
        configs = [("fp32", 1, 16, 64), ("fp32", 4, 32, 64)]
        rows, max_len = 2, 40
    else:
        configs = [
            (dt, g, (16, 32, 128)[i % 3], (64, 128)[i % 2])
            for i, (dt, g) in enumerate((dt, g) for dt in DTYPES for g in (1, 3, 4, 8))
        ]
        rows, max_len = 8, 300
    gen = torch.Generator().manual_seed(0)
    out_rows, all_ok = [], True
    for dt, group, bs, dim in configs:
        dtype, hkv = DTYPES[dt], 2
        seq_lens = torch.randint(1, max_len + 1, (rows,), generator=gen).tolist()
        kv, tab, seq, q = make_case(gen, rows, hkv, group, dim, bs, seq_lens, dtype)
        scale = dim**-0.5
        # attention with LSE
        out, lse = triton_decode_attention(q, kv, tab, seq, scale, max_len)
        eout, else_ = ref.decode_attention(q, kv, tab, seq, scale)
        lse_err = (lse - else_).abs().max().item()
        out_err = (out.float() - eout).abs().max().item()
        # fused scoring
        cols = max_len + 1
        sums = scoring.head_sum(q, kv[..., :dim], tab, seq, else_, scale, cols)
        esums = ref.head_sum(q, kv[..., :dim], tab, seq, else_, scale, cols)
        fin = torch.isfinite(esums)
        rel = ((sums[fin] - esums[fin]).abs() / esums[fin].abs().clamp_min(1e-30)).max().item()
        inf_ok = torch.equal(torch.isinf(sums), torch.isinf(esums))
        victim = scoring.masked_argmin(sums, seq)
        argmin_ok = victims_ok(victim.cpu(), esums.cpu(), seq.cpu())
        # whole step (budget = a middle length: rows below, at and past it)
        budget = max(seq_lens) // 2 + 1
        step_seq = torch.clamp(seq, max=budget + 1)
        k_new = torch.randn(rows, hkv, dim, generator=gen).to(dtype).to(DEVICE)
        v_new = torch.randn(rows, hkv, dim, generator=gen).to(dtype).to(DEVICE)
        mine, theirs = kv.clone(), kv.clone()
        sout, svictim = tova_decode_step(q, k_new, v_new, mine, tab, step_seq, budget, scale)
        rout, rvictim = ref.decode_step(q, k_new, v_new, theirs, tab, step_seq, budget, scale)
        step_ok = bool(torch.equal(svictim, rvictim) and torch.equal(mine, theirs))
        if not step_ok:  # a float-noise tie may pick another minimum: check that
            probe = kv.clone()
            ref.write_slots(probe, tab, step_seq.long() - 1, k_new, v_new)
            _, plse = ref.decode_attention(q, probe, tab, step_seq, scale)
            psums = ref.head_sum(q, probe[..., :dim], tab, step_seq, plse, scale, budget + 1)
            evict = (step_seq == budget + 1).cpu()
            step_ok = victims_ok(svictim.cpu()[evict], psums.cpu()[evict], step_seq.cpu()[evict])
        step_out_err = (sout.float() - rout).abs().max().item()
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        ok = (
            lse_err < 1e-3 and out_err < tol and rel < 1e-4 and inf_ok and argmin_ok and step_ok
            and step_out_err < tol
        )
        all_ok &= ok
        out_rows.append(
            [dt, f"{group * hkv}/{hkv}", bs, dim, f"{lse_err:.1e}", f"{out_err:.1e}", f"{rel:.1e}",
             "yes" if argmin_ok else "NO", "yes" if step_ok else "NO", "ok" if ok else "FAIL"]
        )
    table(
        f"Correctness vs the PyTorch reference ({DEVICE.type}, {rows} ragged rows, lengths 1..{max_len})",
        ["cache", "Hq/Hkv", "block", "head", "lse err", "out err", "score rel err", "argmin", "step",
         "result"],
        out_rows,
    )
    print(f"correctness: {'all passed' if all_ok else 'FAILURES'}")
    return all_ok


def timeit(fn, iters):
    fn()  # warm-up (compiles)
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


def graphed(fn):
    """The step captured in a CUDA graph (fixed shapes, no host sync)."""
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
        print(f"CUDA graph capture failed: {type(e).__name__}: {e}")
        return None


def paged(rows, slots, hkv, bs, dim, dtype, gen_seed):
    nb = triton.cdiv(slots, bs)
    torch.manual_seed(gen_seed)
    kv = torch.randn(rows * nb, hkv, bs, 2 * dim, dtype=dtype, device=DEVICE)
    tab = torch.randperm(rows * nb, device=DEVICE).view(rows, nb).to(torch.int32)
    return kv, tab


def gemm_time(batch, hidden, inter, dtype, iters):
    """One LLaMA-style layer's projections and MLP at this batch (random weights)."""
    x = torch.randn(batch, hidden, dtype=dtype, device=DEVICE)
    w = [torch.randn(hidden, n, dtype=dtype, device=DEVICE) * 0.01 for n in (3 * hidden, hidden, 2 * inter)]
    w_down = torch.randn(inter, hidden, dtype=dtype, device=DEVICE) * 0.01

    def run():
        x @ w[0]
        x @ w[1]
        h = x @ w[2]
        h[:, :inter] @ w_down

    return timeit(run, iters)


def benchmark(smoke):
    if smoke:
        hq = hkv = 2
        dim, bs, seq_len, full_batch, budgets, iters = 64, 16, 64, 2, [8, 16], 1
        hidden, inter, dtype = 128, 256, torch.float32
    else:
        hq = hkv = 32
        dim, bs, seq_len, full_batch, iters = 128, 16, 4096, ARGS.full_batch, ARGS.iters
        budgets = [int(b) for b in ARGS.budgets.split(",")]
        hidden, inter, dtype = 4096, 11008, torch.float16
    scale = dim**-0.5
    # full cache: every row attends over seq_len tokens (its new token included)
    kv, tab = paged(full_batch, seq_len, hkv, bs, dim, dtype, 0)
    q = torch.randn(full_batch, hq, dim, dtype=dtype, device=DEVICE)
    seq = torch.full((full_batch,), seq_len, dtype=torch.int32, device=DEVICE)
    new = torch.randn(full_batch, hkv, 2 * dim, dtype=dtype, device=DEVICE)
    last = torch.full((full_batch,), seq_len - 1, dtype=torch.long, device=DEVICE)
    wb = tab.long()[torch.arange(full_batch, device=DEVICE), last // bs]

    def full_step():
        kv[wb, :, last % bs, :] = new
        triton_decode_attention(q, kv, tab, seq, scale, seq_len)

    t_full = timeit(full_step, iters)
    g_full = graphed(full_step)
    t_full_g = timeit(g_full, iters) if g_full else None
    gemm_full = gemm_time(full_batch, hidden, inter, dtype, iters)
    kv_bytes = kv.numel() * kv.element_size()
    del kv, tab
    rows_out = []
    for budget in budgets:
        slots = triton.cdiv(budget + 1, bs) * bs
        batch = full_batch * triton.cdiv(seq_len, bs) * bs // slots  # same KV memory
        kv, tab = paged(batch, budget + 1, hkv, bs, dim, dtype, 1)
        q = torch.randn(batch, hq, dim, dtype=dtype, device=DEVICE)
        k_new = torch.randn(batch, hkv, dim, dtype=dtype, device=DEVICE)
        v_new = torch.randn(batch, hkv, dim, dtype=dtype, device=DEVICE)
        seq = torch.full((batch,), budget + 1, dtype=torch.int32, device=DEVICE)  # every row evicts
        out = torch.empty_like(q)
        _, lse = triton_decode_attention(q, kv, tab, seq, scale, budget + 1)

        def step():
            tova_decode_step(q, k_new, v_new, kv, tab, seq, budget, scale, output=out, attn_impl="triton")

        def attn():
            triton_decode_attention(q, kv, tab, seq, scale, budget + 1, out=out)

        def score():
            sums = scoring.head_sum(q, kv[..., :dim], tab, seq, lse, scale, budget + 1)
            scoring.masked_argmin(sums, seq)

        t_step, t_attn, t_score = timeit(step, iters), timeit(attn, iters), timeit(score, iters)
        g = graphed(step)
        t_step_g = timeit(g, iters) if g else None
        gemm = gemm_time(batch, hidden, inter, dtype, iters)
        best_full = t_full_g or t_full
        best_step = t_step_g or t_step
        ratio = (batch / best_step) / (full_batch / best_full)
        ratio_layer = (batch / (best_step + gemm)) / (full_batch / (best_full + gemm_full))
        rows_out.append(
            [budget, batch, f"{t_attn * 1e3:.3f}", f"{t_score * 1e3:.3f}",
             f"{max(t_step - t_attn - t_score, 0) * 1e3:.3f}", f"{t_step * 1e3:.3f}",
             f"{t_step_g * 1e3:.3f}" if t_step_g else "-", f"{100 * t_score / t_step:.0f}%",
             f"{ratio:.2f}x", f"{ratio_layer:.2f}x"]
        )
        del kv, tab
    full_desc = (
        f"full cache: batch {full_batch} x {seq_len} tokens, {kv_bytes / 2**30:.2f} GiB of K|V per layer; "
        f"step {t_full * 1e3:.3f} ms"
        + (f" ({t_full_g * 1e3:.3f} ms graphed)" if t_full_g else "")
        + f"; GEMMs of one layer {gemm_full * 1e3:.3f} ms"
    )
    table(
        f"Decode step, one layer, Hq=Hkv={hq}, head {dim}, block {bs}, {str(dtype).split('.')[-1]}, "
        f"{DEVICE.type} ({torch.cuda.get_device_name() if DEVICE.type == 'cuda' else 'interpreter'})\n"
        + full_desc,
        ["budget", "batch", "attn ms", "score ms", "write+evict ms", "step ms", "graphed ms",
         "score share", "throughput ratio", "with GEMMs"],
        rows_out,
    )
    print(
        "throughput ratio = (batch / step time) / (full batch / full step time): tokens per "
        "second of the attention step against full-cache attention in the same KV memory "
        "(graphed times where capture worked). 'with GEMMs' adds one LLaMA-2-7B layer's "
        "projection + MLP matmuls at each batch: an estimate for the whole layer."
    )
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("(Triton interpreter: these times say nothing about speed; the run checks shapes only.)")


def main():
    print(f"torch {torch.__version__}, triton {triton.__version__}, device {DEVICE}"
          + (", TRITON_INTERPRET=1" if os.environ.get("TRITON_INTERPRET") == "1" else ""))
    t0 = time.perf_counter()
    ok = correctness(ARGS.smoke)
    benchmark(ARGS.smoke)
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
