"""The engines' best settings side by side on each workload: which engine serves it fastest.

After each engine's own search (:mod:`tangquant.measure.search`), ``tangquant tune`` runs every
engine's best setting that passes the fidelity gate on each workload — ``pp512+tg128``
(prefill-heavy) and ``pp32+tg256`` (short in, long out: a Tang poem request) by default —
alternately for ``--confirm`` rounds, so a drifting host's speed falls on all alike. A
workload's time is a request's: the prefill (TTFT) plus ``n - 1`` decode steps, the median over
the pooled runs; the fastest faithful engine wins it. An engine whose best fails the gate is
listed and never wins.
"""

from __future__ import annotations

import dataclasses
import re
import statistics

from tangquant.errors import ParameterError
from tangquant.measure.search import engine_options, setting


@dataclasses.dataclass(frozen=True)
class Workload:
    prompt_tokens: int
    gen_tokens: int

    @property
    def name(self) -> str:
        return f"pp{self.prompt_tokens}+tg{self.gen_tokens}"

    @classmethod
    def parse(cls, text: str) -> "Workload":
        m = re.fullmatch(r"\s*(?:pp)?(\d+)\s*\+\s*(?:tg)?(\d+)\s*", str(text))
        if not m or min(int(m.group(1)), int(m.group(2))) < 1:
            raise ParameterError(f"a workload is PROMPT+GEN tokens like 512+128 or pp32+tg256, not {text!r}")
        return cls(int(m.group(1)), int(m.group(2)))


def compare(measure, sides: dict, bests: dict, workloads: list[Workload], rounds: int, bar=None) -> dict:
    """{workload name: {"winner": engine or None, "rows": [one per engine]}} (see the module)."""
    out = {}
    for w in workloads:
        runs = {kind: [] for kind in bests}
        for i in range(max(1, rounds)):
            for kind, best in bests.items():
                if not _faithful(best):
                    continue
                if bar is not None:
                    bar.set_postfix_str(f"{w.name}: {kind}, round {i + 1}")
                res = measure.speed(sides[kind], engine_options(best["options"]), best["threads"],
                                    w.prompt_tokens, w.gen_tokens)
                runs[kind].extend(res["runs"])
                if bar is not None:
                    bar.update(1)
        rows = [_row(w, kind, bests[kind], runs[kind]) for kind in bests]
        timed = [r for r in rows if "request_s" in r]
        winner = min(timed, key=lambda r: r["request_s"]) if timed else None
        for r in timed:
            r["vs_winner"] = r["request_s"] / winner["request_s"]
        out[w.name] = {**dataclasses.asdict(w), "winner": winner["engine"] if winner else None, "rows": rows}
    return out


def _faithful(best: dict) -> bool:
    return bool((best.get("fidelity") or {}).get("passes")) and "tg_tps" in best


def _row(w: Workload, kind: str, best: dict, runs: list[dict]) -> dict:
    row = {"engine": kind, "setting": best["setting"], "options": best["options"], "threads": best["threads"]}
    if not runs:
        return {**row, "verdict": "fails the gate" if "tg_tps" in best else best["verdict"]}
    seconds = [(r["ttft_ms"] + (w.gen_tokens - 1) * r["tpot_ms"]) / 1000 for r in runs]
    return {**row, "request_s": statistics.median(seconds), "request_s_all": seconds,
            "pp_tps": statistics.median(w.prompt_tokens * 1000 / r["ttft_ms"] for r in runs),
            "tg_tps": statistics.median(1000 / r["tpot_ms"] for r in runs)}


def table(results: dict) -> str:
    lines = ["| workload | engine | setting | pp t/s | tg t/s | request s | |", "|---|---|---|---:|---:|---:|---|"]
    for name, res in results.items():
        for r in res["rows"]:
            if "request_s" not in r:
                lines.append(f"| {name} | {r['engine']} | {r['setting']} | — | — | — | {r['verdict']} |")
                continue
            mark = "**winner**" if r["engine"] == res["winner"] else f"{r['vs_winner']:.2f}× the winner's time"
            lines.append(f"| {name} | {r['engine']} | {setting(r['options'])} | {r['pp_tps']:.1f} | "
                         f"{r['tg_tps']:.2f} | {r['request_s']:.3f} | {mark} |")
    return "\n".join(lines)
