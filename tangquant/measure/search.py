"""The search behind ``tangquant tune`` (its grid is the engine's: :func:`tangquant.ov.options.tune_grid`).

Every candidate runs like a ``tangquant bench`` candidate (its own worker
process, warm-up, repetitions; the median of the repetitions is what counts),
then through the fidelity gate (:mod:`tangquant.ov.gate`, another worker).
The search is coordinate-wise: the axes are visited in the grid's order, each
value of an axis is tried on top of the best setting so far, and a value is
kept only if it passes the gate, decodes at least :data:`MIN_GAIN` faster
(so noise does not pin a setting) and prefills at least ``--min-prefill-ratio``
as fast as the defaults. When the budget runs out the remaining candidates are
reported as skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import sys
import time
from pathlib import Path

from tangquant import claim
from tangquant.errors import BenchError, TangquantError
from tangquant.measure.candidate import Candidate, resolve
from tangquant.measure.runner import measure_candidate, run_worker
from tangquant.ov import runtime
from tangquant.ov.options import Axis

# Decode (tg) must improve by this fraction before a non-default value is kept.
MIN_GAIN = 0.02
KEPT = "faster (kept)"
GATE = "tangquant.ov.gate:run"
SCRATCH = "tangquant-tune"  # the prefix of its working directory in the system's temp


@dataclasses.dataclass(frozen=True)
class SpeedRecipe:
    """What a speed run of the search needs (the bench's own fields)."""

    prompt_tokens: int
    gen_tokens: int
    repetitions: int
    warmup: int
    timeout_s: int
    baseline_python: str = sys.executable


def setting(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(options.items())) or "IR defaults"


class Search:
    """Runs the candidates; ``rows`` keeps every one, in order, with its verdict."""

    def __init__(self, ir: Path, params, texts: list[str], bar):
        self.ir, self.p, self.bar, self.rows = Path(ir), params, bar, []
        self.rec = SpeedRecipe(prompt_tokens=params.prompt_tokens, gen_tokens=params.gen_tokens,
                               repetitions=params.repetitions, warmup=params.warmup,
                               timeout_s=params.timeout_s)
        self.model = resolve(Candidate("tune", "ov", str(self.ir), {}))
        self.start, self.cost, self.confirmation = time.monotonic(), 0.0, None
        # Claimed like an output: a killed tune's directory is removed by the next one.
        self.scratch = contextlib.ExitStack()
        try:
            self.reference = str(self.scratch.enter_context(claim.scratch_dir(SCRATCH)) / "reference.npz")
            self.prompts = self._reference(texts)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.scratch.close()

    def _worker(self, spec: dict) -> dict:
        return run_worker({"call": GATE, **spec}, sys.executable, self.p.timeout_s)

    def _reference(self, texts: list[str]) -> list[list[int]]:
        self.bar.set_postfix_str("fidelity reference (exact mode)")
        res = self._worker({"path": str(self.ir), "threads": self.p.threads,
                            "texts": texts, "steps": self.p.fidelity_steps,
                            "reference_out": self.reference})
        if not res.get("ok"):
            raise BenchError(f"the exact-mode reference run failed: {res.get('error')}")
        # What a candidate that sets nothing gets: the plugin's values, under the IR's own options.
        self.defaults = {**res["defaults"], **runtime.read(self.ir)}
        return res["prompts"]

    def is_default(self, value: dict) -> bool:
        return all(self.defaults.get(k) == v for k, v in value.items())

    def run(self, axes: list[Axis]) -> dict:
        best = self.evaluate({}, "baseline")
        if "tg_tps" not in best:
            raise BenchError(f"the IR's defaults fail: {best['verdict']}")
        if not best["fidelity"]["passes"]:  # any faithful candidate beats unfaithful defaults
            best["verdict"] = "baseline (fails the gate)"
        # Against the defaults, not the best so far: small prefill losses must not compound.
        min_pp = best["pp_tps"] * self.p.min_prefill_ratio
        for axis in axes:
            keys = {k for v in axis.values for k in v}
            for value in axis.values[1:]:
                if axis.needs_pa and best["options"].get("ATTENTION_BACKEND") == "SDPA":
                    continue
                # The axis's own keys are replaced, never combined with an earlier value of it.
                options = {**{k: v for k, v in best["options"].items() if k not in keys}, **value}
                if self.is_default(value):
                    self.rows.append({"axis": axis.name, "setting": setting(options), "options": options,
                                      "verdict": "the default here (not run)"})
                    self.bar.update(1)
                    continue
                row = self.evaluate(options, axis.name)
                if row["verdict"] == "passes":
                    row["verdict"] = verdict(row, best, min_pp)
                    best = row if row["verdict"] == KEPT else best
        if best["options"]:
            best = self.confirm(self.rows[0], best)
        best["verdict"] = "winner" if best["options"] else "winner (the IR's defaults)"
        return best

    def confirm(self, baseline: dict, best: dict) -> dict:
        """Measure the defaults and the best candidate again, alternately (``--confirm`` rounds):
        a gain the search saw under a load spike is not applied unless it holds side by side."""
        tg = {"baseline": [], "best": []}
        for i in range(self.p.confirm):
            for name, row in (("baseline", baseline), ("best", best)):
                self.bar.set_postfix_str(f"confirm {i + 1}/{self.p.confirm}: {name}")
                tg[name].extend(self._speed(row["options"], row["threads"])["tg_tps_all"])
        ratio = statistics.median(tg["best"]) / statistics.median(tg["baseline"])
        self.confirmation = {"baseline_tg_tps": tg["baseline"], "best_tg_tps": tg["best"],
                             "ratio": ratio, "setting": best["setting"]}
        if ratio >= 1 + MIN_GAIN or not baseline["fidelity"]["passes"]:
            return best
        best["verdict"] = f"not confirmed ({ratio:.2f}× side by side)"
        return baseline

    def evaluate(self, options: dict, axis: str) -> dict:
        row = {"axis": axis, "setting": setting(options), "options": options,
               "threads": int(options.get("INFERENCE_NUM_THREADS", self.p.threads))}
        self.rows.append(row)
        self.bar.set_postfix_str(f"{axis}: {row['setting']}")
        if axis != "baseline" and time.monotonic() - self.start + self.cost > self.p.budget_s:
            row["verdict"] = "skipped (budget)"
            self.bar.update(1)
            return row
        t0 = time.monotonic()
        try:
            row.update(self._speed(options, row["threads"]))
            row["fidelity"] = self._fidelity(options, row["threads"])
            row["verdict"] = "baseline" if axis == "baseline" else (
                "passes" if row["fidelity"]["passes"] else "rejected (fidelity)")
        except TangquantError as exc:
            row["verdict"] = f"failed: {exc}"
        self.cost = max(self.cost, time.monotonic() - t0)
        self.bar.update(1)
        return row

    def _speed(self, options: dict, threads: int) -> dict:
        """One bench candidate, as bench runs it."""
        model = dataclasses.replace(self.model, candidate=Candidate("tune", "ov", str(self.ir), dict(options)))
        res = measure_candidate(model, threads, self.rec)
        pp = [self.p.prompt_tokens * 1000 / r["ttft_ms"] for r in res["runs"]]
        tg = [1000 / r["tpot_ms"] for r in res["runs"]]
        return {"pp_tps": statistics.median(pp), "tg_tps": statistics.median(tg),
                "pp_tps_all": pp, "tg_tps_all": tg, "bytes_per_token": res["bytes_per_token"],
                "peak_rss_bytes": res.get("peak_rss_bytes")}

    def _fidelity(self, options: dict, threads: int) -> dict:
        res = self._worker({"path": str(self.ir), "threads": threads,
                            "options": options, "prompts": self.prompts,
                            "steps": self.p.fidelity_steps, "reference": self.reference})
        if not res.pop("ok", False):
            raise BenchError(f"fidelity run failed: {res.get('error')}")
        identical = res["genai_identical"] and all(d is None for d in res["greedy_first_diff"])
        res.update(identical=identical, bound=self.p.kld_bound,
                   passes=identical or res["kld"] <= self.p.kld_bound)
        for k in ("peak_rss_bytes", "worker_versions", "pid"):
            res.pop(k, None)
        return res


def verdict(row: dict, best: dict, min_pp: float) -> str:
    """Whether a faithful candidate replaces the best so far (:data:`KEPT`). Decode must gain
    MIN_GAIN, and prefill may not fall under ``min_pp`` t/s: a chat user feels a slower first
    token too, and f32 inference on an AMX CPU can trade a few percent of decode for several
    times the prefill time (docs/benchmarks.md)."""
    if not best["fidelity"]["passes"]:
        return KEPT  # any faithful candidate beats unfaithful defaults
    if row["tg_tps"] <= best["tg_tps"] * (1 + MIN_GAIN):
        return "not faster"
    if row["pp_tps"] < min_pp:
        return f"slower prefill ({row['pp_tps']:.1f} t/s, under {min_pp:.1f})"
    return KEPT


def fidelity_text(row: dict) -> str:
    f = row.get("fidelity")
    if not f:
        return "—"
    same = f"{f['steps']}/{f['steps']} tokens same" if f["identical"] else "tokens differ"
    return f"{same}, KLD {f['kld']:.2e}"


def table(rows: list[dict]) -> str:
    lines = ["| axis | setting | pp t/s | tg t/s | fidelity | verdict |", "|---|---|---:|---:|---|---|"]
    for r in rows:
        pp = f"{r['pp_tps']:.1f}" if "pp_tps" in r else "—"
        tg = f"{r['tg_tps']:.2f}" if "tg_tps" in r else "—"
        lines.append(f"| {r['axis']} | {r['setting']} | {pp} | {tg} | {fidelity_text(r)} | "
                     f"{r['verdict']} |")
    return "\n".join(lines)
