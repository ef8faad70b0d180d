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


def _variants(part: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """The TOVA variants of a budget's result (one, bulk, in results written
    before variants existed)."""
    return b.get("variants") or [{
        "name": "bulk", "label": "bulk", "tova": b["tova"], "ideal": b.get("ideal"),
        "ideal_concurrency": b.get("ideal_concurrency"), "ratio_vs_stock": b["ratio_vs_stock"],
        "ideal_ratio_vs_stock": b["ideal_ratio_vs_stock"], "efficiency": b["efficiency"],
    }]


def _tova_label(v: dict[str, Any], many: bool, budget: int) -> str:
    return f"tova b={budget}" + (f" {v['label']}" if many else "")


def offline_table(off: dict[str, Any], seq_len: int) -> str:
    rows = []
    for b in off["budgets"]:
        budget = b["budget"]
        variants = _variants(off, b)
        many = len(variants) > 1
        rows.append(_row(f"stock (next to b={budget})", b["stock"], 1.0))
        share = f"{fraction(budget, seq_len)} of seq" if budget < seq_len else "nothing evicted"
        for v in variants:
            rows.append(_row(f"{_tova_label(v, many, budget)} ({share})", v["tova"],
                             v["ratio_vs_stock"], v["efficiency"]))
        seen = set()
        for v in variants:
            c = v["ideal_concurrency"]
            if v["ideal"] is None or c in seen:
                continue
            seen.add(c)
            rows.append(_row(f"ideal b={budget} (stock, {c} seqs)", v["ideal"], v["ideal_ratio_vs_stock"], 1.0))
    return _table(rows)


def targets(part: dict[str, Any], target_efficiency: float | None, target_nothing_evicted: float | None = None) -> str:
    """Per evicting budget and variant: efficiency against the target, and
    (with several variants) peak/mean running sequences, the admission side;
    where nothing is evicted, TOVA / stock against its own target."""
    lines = []
    for b in part["budgets"]:
        variants = _variants(part, b)
        if not b.get("evicts", True) and target_nothing_evicted is not None:
            for v in variants:
                r = v.get("ratio_vs_stock")
                if r is not None:
                    lines.append(f"b={b['budget']} {v['label']}: nothing evicted, x stock {r:.2f} (target >= "
                                 f"{target_nothing_evicted:.2f}: {'met' if r >= target_nothing_evicted else 'not met'})")
        for v in variants:
            if not b.get("evicts", True) or v.get("efficiency") is None:
                continue
            eff = v["efficiency"]
            met = "" if target_efficiency is None else (
                f" (target >= {target_efficiency:.2f}: {'met' if eff >= target_efficiency else 'not met'})")
            extra = ""
            if len(variants) > 1:
                t = v["tova"]
                mean = f", mean {t['mean_running']}" if t.get("mean_running") is not None else ""
                extra = f"; running peak {t['peak_running']}{mean}; x stock {v['ratio_vs_stock']:.2f}"
                if v.get("efficiency_vs_best_ideal") not in (None, eff):
                    extra += f"; vs the ideal at the highest concurrency {v['efficiency_vs_best_ideal']:.2f}"
            lines.append(f"b={b['budget']} {v['label']}: efficiency {eff:.2f} vs ideal at "
                         f"{v['ideal_concurrency']} seqs{met}{extra}")
    return "\n".join(lines)


def served_table(srv: dict[str, Any]) -> str:
    cols = ("config", "out tok/s", "req/s", "peak run", "preempt", "x stock", "effic.",
            "TTFT p50/p99 ms", "TPOT p50/p99 ms")
    rows = []
    for b in srv["budgets"]:
        variants = _variants(srv, b)
        many = len(variants) > 1
        entries = [(b["stock"], f"stock (next to b={b['budget']})", 1.0, None)]
        entries += [(v["tova"], _tova_label(v, many, b["budget"]), v["ratio_vs_stock"], v["efficiency"])
                    for v in variants]
        seen = set()
        for v in variants:
            if v.get("ideal") is not None and v["ideal_concurrency"] not in seen:
                seen.add(v["ideal_concurrency"])
                entries.append((v["ideal"], f"ideal b={b['budget']} ({v['ideal_concurrency']} seqs)",
                                v["ideal_ratio_vs_stock"], 1.0))
        for r, label, ratio, eff in entries:
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
    """Left: output throughput over stock's vs the budget, per TOVA variant and
    mode, with the ideal's (dashed). Right: peak running sequences (the
    admission side: how many sequences the KV memory held at once)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    for mode, marker in (("offline", "o"), ("served", "s")):
        part = result.get(mode)
        if not part:
            continue
        bs = sorted(part["budgets"], key=lambda b: b["budget"])  # lines join neighbouring budgets
        x = [b["budget"] for b in bs]
        names = [v["name"] for v in _variants(part, bs[0])]
        many = len(names) > 1
        for k, name in enumerate(names):
            vs = [next(v for v in _variants(part, b) if v["name"] == name) for b in bs]
            label = vs[0]["label"]
            tag = f"TOVA {label}" if many else "TOVA"
            line, = ax.plot(x, [v["ratio_vs_stock"] for v in vs], marker=marker, label=f"{tag} / stock ({mode})")
            ax.plot(x, [v["ideal_ratio_vs_stock"] for v in vs], marker=marker, linestyle="--", color=line.get_color(),
                    alpha=0.7, label=f"ideal{f' at {label} concurrency' if many else ''} / stock ({mode})")
            offset = (k - (len(names) - 1) / 2) * 0.04
            xs = [xi * (1 + offset) for xi in x]
            ax2.plot(xs, [v["tova"]["peak_running"] for v in vs], marker=marker,
                     linestyle="none" if len(x) == 1 else "-", color=line.get_color(), label=f"{tag} ({mode})")
            if all("mean_running" in v["tova"] for v in vs):
                ax2.plot(xs, [v["tova"]["mean_running"] for v in vs], marker=marker, fillstyle="none",
                         linestyle="none" if len(x) == 1 else ":", color=line.get_color())
        ax2.plot(x, [b["stock"]["peak_running"] for b in bs], marker=marker, color="grey",
                 linestyle="none" if len(x) == 1 else "-", label=f"stock ({mode})")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    seq = result["settings"]["seq_len"]
    budgets = sorted({b["budget"] for m in ("offline", "served") for b in (result.get(m) or {}).get("budgets", [])})
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xticks(budgets, [f"{b}\n({fraction(b, seq)})" for b in budgets], fontsize=8)
        a.minorticks_off()
        a.set_xlabel(f"KV budget (tokens; sequences are {seq} tokens)")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    if len(budgets) == 1:
        for a in (ax, ax2):
            a.set_xlim(budgets[0] / 1.5, budgets[0] * 1.5)
    ax.set_ylabel("output throughput vs stock vLLM")
    ax2.set_ylabel("running sequences\n(filled: peak; open: mean, offline)")
    ax2.set_ylim(bottom=0)
    fig.suptitle(f"tova-vllm throughput, preset '{result['preset']}', {result['settings']['model_name']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
