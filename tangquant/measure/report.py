"""The bench's outputs: a markdown table, JSONL records and an optional plot."""

from __future__ import annotations

import json
from pathlib import Path

from tangquant.files import atomic_output_file, human_size


def _pm(mean, std, digits: int = 1) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _ratio(x) -> str:
    return f"{x:.2f}×" if x is not None else "–"


def add_ratios(rows: list[dict], reference: str | None = None) -> None:
    """Ratios of pp/tg against the candidate named ``reference`` (default: the first) that
    succeeded at the same thread count."""
    for row in rows:
        ref = next((r for r in rows if r["threads"] == row["threads"] and r["status"] == "ok"
                    and reference in (None, r["name"])), None)
        ok = ref is not None and row["status"] == "ok"
        row["ratio_pp"] = row["pp_tps"] / ref["pp_tps"] if ok else None
        row["ratio_tg"] = row["tg_tps"] / ref["tg_tps"] if ok else None
        row["ratio_ref"] = ref["name"] if ref else None


def markdown_table(rows: list[dict], p: int, n: int) -> str:
    head = (f"| candidate | kind | threads | pp{p} t/s | tg{n} t/s | TTFT ms | ×pp | ×tg | "
            "peak RSS | size | bytes/token | roofline t/s | % roofline |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | {r['kind']} | {r['threads']} | FAILED: "
                         f"{r['error'].replace('|', '/')} |" + " |" * 9)
            continue
        roof = r.get("roofline_tps")
        pct = f"{r['roofline_pct']:.0f}%" if roof else "–"
        kind = r["kind"] + (f" ({r['origin']})" if r.get("origin") else "")  # who made the file
        lines.append(
            f"| {r['name']} | {kind} | {r['threads']} | {_pm(r['pp_tps'], r['pp_tps_std'])} | "
            f"{_pm(r['tg_tps'], r['tg_tps_std'], 2)} | {r['ttft_ms']:.1f} | {_ratio(r['ratio_pp'])} | "
            f"{_ratio(r['ratio_tg'])} | {human_size(r['peak_rss_bytes'])} | {human_size(r['size_bytes'])} | "
            f"{human_size(r['bytes_per_token'])} | {f'{roof:.1f}' if roof else '–'} | {pct} |")
    return "\n".join(lines + _drafted(rows))


def _drafted(rows: list[dict]) -> list[str]:
    """Under the table, for each candidate with a draft: its acceptance and tokens per step."""
    out = []
    for r in rows:
        if r["status"] == "ok" and r.get("draft_acceptance") is not None:
            same = {True: "; greedy tokens identical to the target alone's",
                    False: "; greedy tokens DIFFER from the target alone's"}.get(r.get("greedy_identical"), "")
            out.append(f"- {r['name']} ({r['threads']} threads): draft K={r.get('draft_tokens')}, "
                       f"{100 * r['draft_acceptance']:.1f}% of {r['drafted']} drafted tokens accepted, "
                       f"{r['tokens_per_step']:.2f} tokens per target step{same}")
    return [""] + out if out else []


def append_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False, sort_keys=False) + "\n")


def plot(rows: list[dict], out: Path, p: int, n: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    labels = [f"{r['name']}\n{r['threads']}t" for r in ok]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(ok) + 4), 4.5))
    x = range(len(ok))
    ax1.bar(x, [r["pp_tps"] for r in ok], yerr=[r["pp_tps_std"] for r in ok], color="tab:blue")
    ax1.set_title(f"prefill pp{p} (tokens/s)")
    ax2.bar(x, [r["tg_tps"] for r in ok], yerr=[r["tg_tps_std"] for r in ok], color="tab:green",
            label="measured")
    roofs = [r.get("roofline_tps") or 0 for r in ok]
    ax2.scatter(x, roofs, marker="_", s=900, color="tab:red", label="bandwidth roofline")
    ax2.set_title(f"decode tg{n} (tokens/s)")
    ax2.legend(loc="best")
    for ax in (ax1, ax2):
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, fontsize=8)
    fig.suptitle((ok[0].get("label") if ok else None) or "tangquant bench")
    fig.tight_layout()
    out = Path(out)
    with atomic_output_file(out, force=True) as tmp:  # bench checked --plot before it started
        fig.savefig(tmp, dpi=110, format=out.suffix[1:].lower() or "png")
    plt.close(fig)
    return out
