"""A bench run's table with every ratio to one candidate of the same run (README's headline).

  python benchmarks/headline.py bench-main.jsonl --ref llama-Q4_0 [--title "..."]

Rows are read as `tangquant bench --results` appends them (the newest run in the file); a failed
row is listed with its error. Ratios > 1 mean faster than the reference (TTFT: shorter).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tangquant.measure.report import add_ratios  # noqa: E402


def newest_run(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    last = rows[-1]["date"] if rows else None
    return [r for r in rows if r.get("date") == last]


def where(r: dict) -> str:
    """How the engine ran the weights: llama.cpp's buffer (AMX, CPU_REPACK), ik's -rtr, OpenVINO's options."""
    if r.get("weights_path"):
        return r["weights_path"] + (" (fallback)" if r.get("amx_fallback") else "")
    if r.get("options"):
        return ",".join(f"{k}={v}" for k, v in r["options"].items())
    return ""


def table(rows: list[dict], ref: str) -> str:
    add_ratios(rows, ref)
    if not any(r["name"] == ref and r.get("status") == "ok" for r in rows):
        raise SystemExit(f"no ok row named {ref}")
    p, n = rows[0]["flags"]["prompt_tokens"], rows[0]["flags"]["gen_tokens"]
    out = [f"| candidate | engine (model made by) | weights | pp{p} t/s | tg{n} t/s | pp × {ref} | tg × {ref} "
           f"| TTFT ms | peak RSS GB | % read roofline |", "|---" * 10 + "|"]
    for r in rows:
        if r.get("status") != "ok":
            out.append(f"| {r['name']} | {r['kind']} | failed: {str(r.get('error', ''))[:120]} |" + " |" * 7)
            continue
        out.append(f"| {r['name']} | {r['kind']} ({r.get('origin', '?')}) | {where(r)} | {r['pp_tps']:.1f} "
                   f"| {r['tg_tps']:.2f} | {r['ratio_pp']:.2f}× | {r['ratio_tg']:.2f}× "
                   f"| {r['ttft_ms']:.0f} | {r['peak_rss_bytes'] / 1e9:.2f} | {r.get('roofline_pct', float('nan')):.0f}% |")
    h = rows[0]["host"]
    out.append(f"\n{h['cpu']} (family {h.get('cpu_family')}, model {h.get('cpu_model_number')}), "
               f"{h.get('physical_cores')} cores, L3 {h.get('l3_bytes', 0) / 2**20:.0f} MiB, {rows[0]['threads']} "
               f"threads; read roofline {rows[0]['bandwidth']['read_gbs']:.0f} GB/s; {rows[0]['date']}; "
               + (f"{rounds} rounds interleaved, medians." if (rounds := rows[0]["flags"]["rounds"]) > 1
                  else "one round: single values, not medians (noise not measured)."))
    return "\n".join(out)


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("results", type=Path)
    a.add_argument("--ref", default="llama-Q4_0")
    args = a.parse_args()
    print(table(newest_run(args.results), args.ref))


if __name__ == "__main__":
    main()
