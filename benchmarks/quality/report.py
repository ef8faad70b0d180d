"""Outputs: JSON results, a PNG plot and a markdown table."""

from __future__ import annotations

import json
from pathlib import Path

def fraction(budget: int, context: int) -> str:
    ratio = context / budget
    return "1/1" if budget >= context else f"1/{ratio:g}"


def markdown(results: dict) -> str:
    ctx = results["settings"]["context"]
    budgets = results["settings"]["budgets"]
    ppl = results["perplexity"]
    lines = [
        f"Perplexity ({results['settings']['num_sequences']} x {ctx} tokens, every token predicted "
        f"from the compressed cache; full cache: {ppl['full']:.2f}). Lower is better.",
        "",
        "| policy | " + " | ".join(f"{b} ({fraction(b, ctx)})" for b in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    rows = results["settings"].get("rows", results["settings"]["policies"])
    for p in rows:
        row = [f"{ppl[p][str(b)]:.2f}" for b in budgets]
        best = [min(ppl[q][str(b)] for q in rows) for b in budgets]
        row = [f"**{v}**" if float(v) == round(bv, 2) else v for v, bv in zip(row, best)]
        lines.append(f"| {p} | " + " | ".join(row) + " |")
    if "retrieval" in results:
        r = results["retrieval"]
        rctx, rb = results["settings"]["retrieval_context"], results["settings"]["retrieval_budgets"]
        lines += [
            "",
            f"Passkey retrieval accuracy ({r['trials']} prompts of about {rctx} tokens, key at depths "
            f"{', '.join(str(d) for d in results['settings']['depths'])}; prompt processed as "
            f"'{results['settings']['retrieval_prompt_mode']}'; full cache: {r['full']:.2f}).",
            "",
            "| policy | " + " | ".join(f"{b} ({fraction(b, rctx)})" for b in rb) + " |",
            "|---|" + "---:|" * len(rb),
        ]
        for p in rows:
            lines.append(f"| {p} | " + " | ".join(f"{r[p][str(b)]:.2f}" for b in rb) + " |")
    return "\n".join(lines) + "\n"


# Distinct markers and dashes: equal results (accuracy often is) must not hide a line.
_STYLE = {
    "tova": dict(marker="o", linestyle="-", linewidth=2.2),
    "h2o": dict(marker="s", linestyle="--"),
    "sink": dict(marker="^", linestyle="-.", markersize=9),
    "window": dict(marker="x", linestyle=":", markersize=8),
    "keydiff": dict(marker="D", linestyle=(0, (3, 1, 1, 1)), markersize=6),
    "tova (chunked)": dict(marker="o", linestyle=(0, (1, 1)), markerfacecolor="none", markersize=9),
}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_r = "retrieval" in results
    fig, axes = plt.subplots(1, 2 if has_r else 1, figsize=(12 if has_r else 6.5, 4.5), squeeze=False)
    ax = axes[0][0]
    s = results["settings"]
    ppl = results["perplexity"]
    xs = [*s["budgets"], s["context"]]  # the last point, 1/1, is the full cache
    rows = s.get("rows", s["policies"])
    for p in rows:
        ax.plot(xs, [ppl[p][str(b)] for b in xs], label=p, **_STYLE.get(p, {}))
    ax.axhline(ppl["full"], color="black", linestyle="--", label="full cache")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"KV budget (tokens per layer; context {s['context']})")
    ax.set_ylabel("perplexity")
    ax.set_title(f"Perplexity vs budget ({Path(s['model']).name})")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    if has_r:
        ax = axes[0][1]
        r = results["retrieval"]
        for p in rows:
            ax.plot(s["retrieval_budgets"], [r[p][str(b)] for b in s["retrieval_budgets"]], label=p,
                    **_STYLE.get(p, {}))
        ax.axhline(r["full"], color="black", linestyle="--", label="full cache")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel(f"KV budget (tokens per layer; prompt about {s['retrieval_context']})")
        ax.set_ylabel("passkey accuracy")
        ax.set_title("Passkey retrieval vs budget")
        ax.legend()
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tova_vs_baselines(results: dict) -> dict:
    """Per budget: is TOVA's perplexity <= sink's and h2o's (the paper's claim)?"""
    ppl = results["perplexity"]
    out = {}
    for b in results["settings"]["budgets"]:
        t = ppl.get("tova", {}).get(str(b))
        others = {p: ppl[p][str(b)] for p in ("sink", "h2o", "window") if p in ppl}
        if t is not None:
            out[str(b)] = {"tova": t, **others, "tova_best_of_sink_h2o": all(
                t <= v for p, v in others.items() if p in ("sink", "h2o"))}
    return out


def write(results: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "quality.json", "png": out_dir / "quality.png", "md": out_dir / "quality.md"}
    paths["json"].write_text(json.dumps(results, indent=2))
    paths["md"].write_text(markdown(results))
    plot(results, paths["png"])
    return paths
