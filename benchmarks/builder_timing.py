"""Time of the TOVA metadata builder per step, for plain decode batches.

    python -m benchmarks.builder_timing [--rows 8,64,256] [--budget 512] [--device cpu|cuda]

Builds the real `TovaMetadataBuilder` (no engine: a stand-in runner adapter
holds the batch's requests) and times `build()` for a decode step of R rows,
each past its budget (every row evicts): the host plan (NumPy), the one copy
of the packed integers, and the few per-wave device operations. Also with
every other row on another policy (two policy groups). Prints the median of
``--iters`` builds, in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
import types


class _StandIn:
    """The model runner's side (`tova_vllm.backend.runner_adapter`): a fixed batch."""

    name = "stand-in"

    def __init__(self, requests) -> None:
        self.requests = requests

    def batch(self, cm):
        return self.requests


def build_once_factory(rows: int, budget: int, device: str, mixed: bool):
    import numpy as np
    import torch
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from tova_vllm.backend.backend import TovaAttentionBackend
    from tova_vllm.backend.builder import TovaMetadataBuilder
    from tova_vllm.backend.runner_adapter import BatchRequests
    from tova_vllm.config import engine_settings

    bs, hkv, head = 16, 8, 128
    settings = engine_settings({"kv_policy": "tova", "kv_budget": budget})
    spec = TovaAttentionBackend.for_settings(settings).customize_spec(
        FullAttentionSpec(block_size=bs, num_kv_heads=hkv, head_size=head, dtype=torch.bfloat16)
    )
    dev = torch.device(device)
    vllm_config = types.SimpleNamespace(model_config=types.SimpleNamespace(dtype=torch.bfloat16))
    builder = TovaMetadataBuilder(spec, ["layer"], vllm_config, dev)
    req_ids = [f"r{i}" for i in range(rows)]
    extra = [{"kv_policy": "window"} if mixed and i % 2 else None for i in range(rows)]
    builder.bind_runner(
        _StandIn(BatchRequests(req_ids, np.full(rows, 100, dtype=np.int64), extra))
    )
    width = -(-budget // bs) + 64
    table = torch.arange(1, rows * width + 1, dtype=torch.int32).view(rows, width).to(dev)
    seq = torch.tensor(np.arange(rows) + budget + 50, dtype=torch.int32)
    qsl = torch.arange(rows + 1, dtype=torch.int32)
    cm = CommonAttentionMetadata(
        query_start_loc=qsl.to(dev),
        query_start_loc_cpu=qsl,
        seq_lens=seq.to(dev),
        num_reqs=rows,
        num_actual_tokens=rows,
        max_query_len=1,
        max_seq_len=int(seq.max()),
        block_table_tensor=table,
        slot_mapping=torch.zeros(rows, dtype=torch.long, device=dev),
        seq_lens_cpu_upper_bound=seq,
    )
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def once() -> float:
        sync()
        t = time.perf_counter()
        builder.build(0, cm)
        sync()
        return 1000 * (time.perf_counter() - t)

    return once


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="8,64,256")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    print(f"TOVA metadata builder, decode steps, budget {args.budget}, device {args.device}; median of {args.iters}")
    print(f"{'rows':>6} {'one policy (ms)':>16} {'two policies (ms)':>18}")
    for rows in (int(r) for r in args.rows.split(",")):
        times = []
        for mixed in (False, True):
            once = build_once_factory(rows, args.budget, args.device, mixed)
            for _ in range(10):
                once()
            times.append(statistics.median(once() for _ in range(args.iters)))
        print(f"{rows:>6} {times[0]:>16.3f} {times[1]:>18.3f}", flush=True)


if __name__ == "__main__":
    main()
