"""The search behind ``tangquant tune``: each engine's grid (the engines table's ``tune_grid``).

Every candidate runs like a ``tangquant bench`` candidate (its own worker process, warm-up,
repetitions; the median of the repetitions is what counts), then through its engine's fidelity
gate (the row's ``tune_gate``, another worker) against one reference: the IR in exact mode. The
search is coordinate-wise, per engine: the axes are visited in the grid's order, each value of
an axis is tried on top of the best setting so far, and a value is kept only if it passes the
gate, decodes at least :data:`MIN_GAIN` faster (so noise does not pin a setting) and prefills
at least ``--min-prefill-ratio`` as fast as that engine's defaults. When the budget runs out
the remaining candidates are reported as skipped. :mod:`tangquant.measure.finals` then puts
the engines' best settings side by side on each workload.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import sys
import time
from pathlib import Path

from tangquant import claim, engines
from tangquant.errors import BenchError, TangquantError
from tangquant.measure.candidate import Candidate, resolve
from tangquant.measure.runner import measure_candidate, run_worker

# Decode (tg) must improve by this fraction before a non-default value is kept.
MIN_GAIN = 0.02
KEPT = "faster (kept)"
REFERENCE_GATE = "tangquant.ov.gate:run"
# Settings keys that set threads: an OpenVINO property (kept in the options), or the worker's
# thread count (llama.cpp's -t), which is no option of its row and is taken out of them.
THREAD_KEYS = ("INFERENCE_NUM_THREADS", "threads")
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


@dataclasses.dataclass(frozen=True)
class Side:
    """One engine the search tunes: its row in the engines table, its model, and the values a
    setting equal to which is not run (the engine's own defaults on this machine)."""

    kind: str
    path: Path
    defaults: dict

    @property
    def engine(self) -> engines.Engine:
        return engines.get(self.kind)


def setting(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(options.items())) or "defaults"


def engine_options(options: dict) -> dict:
    return {k: v for k, v in options.items() if k != "threads"}


class Measure:
    """Every measurement of a tune, each in a worker process: the exact-mode reference, a speed
    run (as ``bench`` runs it), a gate run. (A unit test passes its own, with a stubbed clock.)"""

    def __init__(self, params):
        self.p = params
        # Claimed like an output: a killed tune's directory is removed by the next one.
        self.scratch = contextlib.ExitStack()
        self.reference_npz = str(self.scratch.enter_context(claim.scratch_dir(SCRATCH)) / "reference.npz")
        self._resolved: dict = {}

    def close(self) -> None:
        self.scratch.close()

    def _worker(self, spec: dict) -> dict:
        return run_worker(spec, sys.executable, self.p.timeout_s)

    def reference(self, ir: Path, texts: list[str]) -> tuple[list[list[int]], dict]:
        """(the held-out prompts as the IR's token ids, the CPU plugin's defaults)."""
        res = self._worker({"call": REFERENCE_GATE, "path": str(ir), "threads": self.p.threads,
                            "texts": texts, "steps": self.p.fidelity_steps,
                            "reference_out": self.reference_npz})
        if not res.get("ok"):
            raise BenchError(f"the exact-mode reference run failed: {res.get('error')}")
        return res["prompts"], res["defaults"]

    def speed(self, side: Side, options: dict, threads: int, prompt_tokens: int, gen_tokens: int) -> dict:
        """One bench candidate, as bench runs it: its runs' ``ttft_ms`` and ``tpot_ms``."""
        if side.kind not in self._resolved:
            self._resolved[side.kind] = resolve(Candidate("tune", side.kind, str(side.path), {}))
        model = dataclasses.replace(self._resolved[side.kind],
                                    candidate=Candidate("tune", side.kind, str(side.path), dict(options)))
        rec = SpeedRecipe(prompt_tokens, gen_tokens, self.p.repetitions, self.p.warmup, self.p.timeout_s)
        return measure_candidate(model, threads, rec)

    def fidelity(self, side: Side, options: dict, threads: int, prompts: list[list[int]]) -> dict:
        res = self._worker({"call": side.engine.tune_gate, "path": str(side.path), "threads": threads,
                            "options": options, "prompts": prompts, "steps": self.p.fidelity_steps,
                            "reference": self.reference_npz})
        if not res.pop("ok", False):
            raise BenchError(f"fidelity run failed: {res.get('error')}")
        for k in ("peak_rss_bytes", "worker_versions", "pid"):
            res.pop(k, None)
        return res


def rates(res: dict, prompt_tokens: int) -> dict:
    """Medians of a speed run's prefill and decode rates, with every run's kept."""
    pp = [prompt_tokens * 1000 / r["ttft_ms"] for r in res["runs"]]
    tg = [1000 / r["tpot_ms"] for r in res["runs"]]
    return {"pp_tps": statistics.median(pp), "tg_tps": statistics.median(tg),
            "pp_tps_all": pp, "tg_tps_all": tg, "bytes_per_token": res.get("bytes_per_token"),
            "peak_rss_bytes": res.get("peak_rss_bytes")}


class Search:
    """One engine's coordinate search; its rows (every candidate, in order, with its verdict) are
    appended to ``rows``, shared by the engines of one tune."""

    def __init__(self, side: Side, params, measure, prompts: list[list[int]], bar, rows: list,
                 start: float | None = None):
        self.side, self.p, self.measure, self.prompts = side, params, measure, prompts
        self.bar, self.rows = bar, rows
        self.start, self.cost, self.confirmation = start or time.monotonic(), 0.0, None

    def is_default(self, value: dict) -> bool:
        return all(self.side.defaults.get(k) == v for k, v in value.items())

    def run(self, axes) -> dict:
        best = self.evaluate({}, "baseline")
        if "tg_tps" not in best:
            raise BenchError(f"the {self.side.kind} engine's defaults fail: {best['verdict']}")
        if not best["fidelity"]["passes"]:  # any faithful candidate beats unfaithful defaults
            best["verdict"] = "baseline (fails the gate)"
        baseline = best
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
                    self.rows.append({"engine": self.side.kind, "axis": axis.name, "setting": setting(options),
                                      "options": options, "verdict": "the default here (not run)"})
                    self.bar.update(1)
                    continue
                row = self.evaluate(options, axis.name)
                if row["verdict"] == "passes":
                    row["verdict"] = verdict(row, best, min_pp)
                    best = row if row["verdict"] == KEPT else best
        if best["options"]:
            best = self.confirm(baseline, best)
        best["verdict"] = "winner" if best["options"] else "winner (the defaults)"
        return best

    def confirm(self, baseline: dict, best: dict) -> dict:
        """Measure the defaults and the best candidate again, alternately (``--confirm`` rounds):
        a gain the search saw under a load spike is not applied unless it holds side by side."""
        tg = {"baseline": [], "best": []}
        for i in range(self.p.confirm):
            for name, row in (("baseline", baseline), ("best", best)):
                self.bar.set_postfix_str(f"{self.side.kind} confirm {i + 1}/{self.p.confirm}: {name}")
                tg[name].extend(self._speed(row["options"], row["threads"])["tg_tps_all"])
        if not tg["best"]:  # --confirm 0
            return best
        ratio = statistics.median(tg["best"]) / statistics.median(tg["baseline"])
        self.confirmation = {"engine": self.side.kind, "baseline_tg_tps": tg["baseline"],
                             "best_tg_tps": tg["best"], "ratio": ratio, "setting": best["setting"]}
        if ratio >= 1 + MIN_GAIN or not baseline["fidelity"]["passes"]:
            return best
        best["verdict"] = f"not confirmed ({ratio:.2f}× side by side)"
        return baseline

    def threads(self, options: dict) -> int:
        return int(next((options[k] for k in THREAD_KEYS if k in options), self.p.threads))

    def evaluate(self, options: dict, axis: str) -> dict:
        row = {"engine": self.side.kind, "axis": axis, "setting": setting(options), "options": options,
               "threads": self.threads(options)}
        self.rows.append(row)
        self.bar.set_postfix_str(f"{self.side.kind} {axis}: {row['setting']}")
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
        res = self.measure.speed(self.side, engine_options(options), threads, self.p.prompt_tokens,
                                 self.p.gen_tokens)
        return rates(res, self.p.prompt_tokens)

    def _fidelity(self, options: dict, threads: int) -> dict:
        res = self.measure.fidelity(self.side, engine_options(options), threads, self.prompts)
        identical = res["genai_identical"] and all(d is None for d in res["greedy_first_diff"])
        res.update(identical=identical, bound=self.p.kld_bound,
                   passes=identical or res["kld"] <= self.p.kld_bound)
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
    lines = ["| engine | axis | setting | pp t/s | tg t/s | fidelity | verdict |",
             "|---|---|---|---:|---:|---|---|"]
    for r in rows:
        pp = f"{r['pp_tps']:.1f}" if "pp_tps" in r else "—"
        tg = f"{r['tg_tps']:.2f}" if "tg_tps" in r else "—"
        lines.append(f"| {r.get('engine', 'ov')} | {r['axis']} | {r['setting']} | {pp} | {tg} | "
                     f"{fidelity_text(r)} | {r['verdict']} |")
    return "\n".join(lines)
