"""PROJECTION: the decode speed a target/draft pair would reach, from measured acceptance and step costs.

Takes the tokens per round E of benchmarks/draft_acceptance.py (the demo pair on its held-out
prompts, per engine and K) and the step costs of benchmarks/draft_step_cost.py (the 7B/0.5B
shapes, random weights, per engine and K), and applies tangquant.measure.speedup.project:

    projected decode t/s = E / (t_verify(K) + K · t_draft),  × plain = that · t_target

It is a projection, labelled so: it assumes a 7B/0.5B pair would accept as the demo pair does.
The ratio against llama.cpp's plain decode uses llama.cpp's t_target from the same step-cost run.

  python benchmarks/draft_projection.py --acceptance acceptance.json --costs step-cost.json [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tangquant.measure.speedup import project  # noqa: E402

ACCEPTANCE_OF = {"ov": "ov", "llamacpp": "llamacpp"}  # which acceptance rows a cost engine takes


def rows(acceptance: dict, costs: dict) -> list[dict]:
    out = []
    llama_plain = costs["engines"].get("llamacpp", {}).get("t_target_ms")
    for engine, c in costs["engines"].items():
        measured = acceptance["summary"].get(ACCEPTANCE_OF[engine], {})
        for k, t_verify in c["t_verify_ms"].items():
            if str(k) not in measured:
                continue
            e = measured[str(k)]["tokens_per_round"]
            row = {"engine": engine, "acceptance": measured[str(k)]["acceptance"],
                   **project(e, int(k), c["t_target_ms"], t_verify, c["t_draft_ms"]),
                   "t_target_ms": c["t_target_ms"], "t_verify_ms": t_verify, "t_draft_ms": c["t_draft_ms"]}
            row["vs_llamacpp_plain"] = row["projected_tps"] * llama_plain / 1000 if llama_plain else None
            out.append(row)
    return out


def markdown(rows_: list[dict], acceptance: dict, costs: dict) -> str:
    lines = [f"**Projection** (not a measurement): E from `{acceptance['command']}` ({acceptance['date']}); "
             f"step costs from `{costs['command']}` ({costs['date']}, {costs['host'].get('cpu')}, "
             f"{costs['threads']} threads, {costs['label']}). projected t/s = E / (t_verify(K) + K · t_draft).",
             "", "| engine | K | acceptance (demo pair) | E tokens/round | t_target ms | t_verify(K) ms | t_draft ms "
             "| projected t/s | × its plain | × llama.cpp plain |", "|---" * 10 + "|"]
    for r in rows_:
        vs = f"{r['vs_llamacpp_plain']:.2f}×" if r["vs_llamacpp_plain"] else "–"
        lines.append(f"| {r['engine']} | {r['k']} | {100 * r['acceptance']:.1f}% | {r['tokens_per_round']:.2f} | "
                     f"{r['t_target_ms']:.1f} | {r['t_verify_ms']:.1f} | {r['t_draft_ms']:.1f} | "
                     f"{r['projected_tps']:.1f} | {r['projected_speedup']:.2f}× | {vs} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    a = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--acceptance", required=True)
    a.add_argument("--costs", required=True)
    a.add_argument("--out")
    args = a.parse_args(argv)
    acceptance = json.loads(Path(args.acceptance).read_text(encoding="utf-8"))
    costs = json.loads(Path(args.costs).read_text(encoding="utf-8"))
    md = markdown(rows(acceptance, costs), acceptance, costs)
    if args.out:
        Path(args.out).write_text(md + "\n", encoding="utf-8")
    print(md)


if __name__ == "__main__":
    main()
