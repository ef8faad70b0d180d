"""The printed table, the JSON file and the PNG plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

def fraction(budget: int, seq_len: int) -> str:
    """A budget as a share of the sequence: '1/8', '3/4', or '>= seq'."""
    from fractions import Fraction

    if budget >= seq_len:
        return ">= seq"
    f = Fraction(budget, seq_len)
    return f"{f.numerator}/{f.denominator}"


COLUMNS = ("config", "out tok/s", "req/s", "run peak/mean", "peak blocks", "preempt", "x stock", "effic.")


def _row(label, r, ratio=None, eff=None) -> tuple:
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    blocks = f"{r['peak_kv_blocks']}/{r['kv_blocks']}" if r.get("kv_blocks") is not None else "-"
    return (label, fmt(r["output_tok_per_s"], ".1f"), fmt(r["requests_per_s"], ".3f"),
            f"{r['peak_running']}/{r['mean_running']:.1f}", blocks, fmt(r.get("preemptions"), "d"),
            fmt(ratio, ".2f"), fmt(eff, ".2f"))


def _table(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(COLUMNS), line(["-" * w for w in widths]), *map(line, rows)])


def offline_table(off: dict[str, Any], seq_len: int) -> str:
    rows = []
    for b in off["budgets"]:
        budget = b["budget"]
        rows.append(_row(f"stock (next to b={budget})", b["stock"], 1.0))
        share = f"{fraction(budget, seq_len)} of seq" if budget < seq_len else "nothing evicted"
        rows.append(_row(f"tova b={budget} ({share})", b["tova"],
                         b["ratio_vs_stock"], b["efficiency"]))
        if b["ideal"] is not None:
            rows.append(_row(f"ideal b={budget} (stock, {b['ideal_concurrency']} seqs)", b["ideal"],
                             b["ideal_ratio_vs_stock"], 1.0))
    return _table(rows)


def served_table(srv: dict[str, Any]) -> str:
    cols = ("config", "out tok/s", "req/s", "peak run", "preempt", "x stock", "effic.",
            "TTFT p50/p99 ms", "TPOT p50/p99 ms")
    rows = []
    for b in srv["budgets"]:
        for key, label, ratio, eff in (
            ("stock", f"stock (next to b={b['budget']})", 1.0, None),
            ("tova", f"tova b={b['budget']}", b["ratio_vs_stock"], b["efficiency"]),
            ("ideal", f"ideal b={b['budget']}", b["ideal_ratio_vs_stock"], 1.0),
        ):
            r = b.get(key)
            if r is None:
                continue
            rows.append((
                label, f"{r['output_tok_per_s']:.1f}", f"{r['requests_per_s']:.3f}",
                str(r.get("peak_running", "-")), str(r.get("preemptions", "-")),
                "-" if ratio is None else f"{ratio:.2f}", "-" if eff is None else f"{eff:.2f}",
                f"{r['ttft_ms']['p50']:.0f}/{r['ttft_ms']['p99']:.0f}",
                f"{r['tpot_ms']['p50']:.1f}/{r['tpot_ms']['p99']:.1f}",
            ))
    widths = [max(len(str(r[i])) for r in [cols, *rows]) for i in range(len(cols))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(cols), line(["-" * w for w in widths]), *map(line, rows)])


def write_json(result: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(result, indent=1))


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for mode, marker in (("offline", "o"), ("served", "s")):
        part = result.get(mode)
        if not part:
            continue
        bs = part["budgets"]
        x = [b["budget"] for b in bs]
        ax.plot(x, [b["ratio_vs_stock"] for b in bs], marker=marker, label=f"TOVA / stock ({mode})")
        ax.plot(x, [b["ideal_ratio_vs_stock"] for b in bs], marker=marker, linestyle="--",
                label=f"ideal / stock ({mode})")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    seq = result["settings"]["seq_len"]
    budgets = sorted({b["budget"] for m in ("offline", "served") for b in (result.get(m) or {}).get("budgets", [])})
    ax.set_xticks(budgets, [f"{b}\n({fraction(b, seq)})" for b in budgets], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel(f"KV budget (tokens; sequences are {result['settings']['seq_len']} tokens)")
    ax.set_ylabel("output throughput vs stock vLLM")
    ax.set_title(f"tova-vllm throughput, preset '{result['preset']}', {result['settings']['model_name']}",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
