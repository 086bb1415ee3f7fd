"""lm-evaluation-harness on two models side by side: the deployed one and its reference.

An OpenVINO IR runs through lm_eval's own ``openvino`` model (optimum-intel's
``OVModelForCausalLM``, on the CPU device: lm_eval otherwise picks CUDA),
compiled with OpenVINO's CPU defaults as chat and serve run it, or in exact
mode; a Hugging Face or GPTQ directory through lm_eval's ``hf`` model holding
the model tangquant's loader built (fp32, GPTQ dequantised exactly, a peft
adapter on top when given). Both see the same documents (``limit`` applies to
both), so the difference of every metric has a paired standard error, much
tighter than the two errors combined: per document for means (accuracy), to
first order of the ratio estimator for byte perplexity and bits per byte
(lm_eval reports no error for those).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import tempfile
from pathlib import Path

import lm_eval
import numpy as np
from lm_eval.api.model import LM
from lm_eval.models.huggingface import HFLM
from lm_eval.models.optimum_lm import OptimumLM
from lm_eval.tasks import TaskManager
from tqdm import tqdm

from tangquant import load
from tangquant.errors import ParameterError
from tangquant.ov.ir import EXACT_CONFIG

logger = logging.getLogger(__name__)

# Metrics whose per-document value is (log-likelihood, units): f(R) of R = −Σll / Σunits, f'(R).
RATIO_METRICS = {"byte_perplexity": (math.exp, math.exp), "word_perplexity": (math.exp, math.exp),
                 "bits_per_byte": (lambda r: r / math.log(2), lambda r: 1 / math.log(2))}


def task_manager(tasks_dir: Path, names: tuple[str, ...]) -> TaskManager:
    """A TaskManager that knows ``names``; lm_eval's own tasks are indexed only when needed."""
    own = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    if all(n in own.all_tasks for n in names):
        return own
    full = TaskManager(include_path=str(tasks_dir))
    unknown = [n for n in names if n not in full.all_tasks]
    if unknown:
        raise ParameterError(f"unknown lm_eval task(s) {', '.join(unknown)}; tangquant ships "
                             f"{', '.join(sorted(n for n in own.all_tasks if n.startswith('tang')))}")
    return full


class _Progress(LM):
    """Hands requests to ``inner`` a chunk at a time, so that one tangquant bar shows them all
    (lm_eval's own bars are off)."""

    def __init__(self, inner: LM, bar, chunk: int):
        super().__init__()
        self.inner, self.bar, self.chunk = inner, bar, chunk

    def _run(self, method: str, requests) -> list:
        self.bar.total = (self.bar.total or 0) + len(requests)
        self.bar.refresh()
        out = []
        for i in range(0, len(requests), self.chunk):
            part = requests[i:i + self.chunk]
            out += getattr(self.inner, method)(part, disable_tqdm=True)
            self.bar.update(len(part))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._run("loglikelihood", requests)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._run("loglikelihood_rolling", requests)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._run("generate_until", requests)

    def __getattr__(self, name):  # everything else (rank, tokenizer, chat template …) is the inner LM's
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def _lm(md: load.ModelDir, adapter, batch_size: int, exact: bool, workdir: Path) -> LM:
    if md.kind == "ir":
        config = workdir / "ov_config.json"  # lm_eval's openvino model reads its config from a file
        config.write_text(json.dumps(EXACT_CONFIG if exact else {}), encoding="utf-8")
        return OptimumLM(pretrained=str(md.path), device="cpu", ov_config=str(config), batch_size=batch_size)
    return HFLM(pretrained=load.torch_model(md, adapter=adapter), tokenizer=load.tokenizer(md),
                batch_size=batch_size, device="cpu")


def run_one(md, adapter, tasks, manager, limit, batch_size: int, exact: bool, desc: str) -> dict:
    """lm_eval's result dict (with per-document samples) for one model."""
    quiet = not logger.isEnabledFor(logging.DEBUG)
    with tempfile.TemporaryDirectory(prefix="tangquant-lm-eval-") as tmp, \
            tqdm(total=0, desc=desc, unit="request", leave=False) as bar:
        lm = _Progress(_lm(md, adapter, batch_size, exact, Path(tmp)), bar, chunk=max(16, 4 * batch_size))
        # lm_eval draws a bar per task while it builds requests; below -v they would stack up.
        with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
            return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                           log_samples=True, bootstrap_iters=0, batch_size=batch_size)


def _err(x: np.ndarray) -> float | None:
    return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None


def _mean_row(ref: list, mod: list) -> dict:
    r, m = np.asarray(ref, np.float64), np.asarray(mod, np.float64)
    return {"reference": float(r.mean()), "reference_err": _err(r), "model": float(m.mean()),
            "model_err": _err(m), "delta": float((m - r).mean()), "delta_err": _err(m - r)}


def _ratio_row(ref: list, mod: list, f, df) -> dict:
    """f(R) of both sides, R = −Σll/Σunits, with first-order (delta-method) errors."""
    def linear(pairs):
        ll, units = (np.asarray(c, np.float64) for c in zip(*pairs))
        r = -ll.sum() / units.sum()
        return r, (-ll - r * units) / units.mean()  # each document's influence on R

    (rr, zr), (rm, zm) = linear(ref), linear(mod)
    return {"reference": f(rr), "reference_err": _scaled(_err(zr), df(rr)), "model": f(rm),
            "model_err": _scaled(_err(zm), df(rm)), "delta": f(rm) - f(rr),
            "delta_err": _err(df(rm) * zm - df(rr) * zr)}


def _scaled(err, factor):
    return None if err is None else err * factor


def _by_doc(samples: list, flt: str) -> dict:
    return {s["doc_id"]: s for s in samples if s.get("filter", "none") == flt}


def paired_rows(ref_res: dict, mod_res: dict) -> list[dict]:
    """One row per (task, metric, filter) that both runs scored, with paired Δ errors."""
    rows = []
    for task, samples in ref_res["samples"].items():
        other = mod_res["samples"].get(task, [])
        for flt in sorted({s.get("filter", "none") for s in samples}):
            a, b = _by_doc(samples, flt), _by_doc(other, flt)
            docs = sorted(set(a) & set(b))
            if not docs:
                continue
            hib = ref_res.get("higher_is_better", {}).get(task, {})
            for metric in a[docs[0]]["metrics"]:
                ref, mod = [a[d][metric] for d in docs], [b[d][metric] for d in docs]
                if metric in RATIO_METRICS:
                    row = _ratio_row(ref, mod, *RATIO_METRICS[metric])
                elif isinstance(ref[0], (int, float, bool)):
                    row = _mean_row(ref, mod)
                else:
                    continue  # a corpus-level metric (BLEU, F1): lm_eval's own table has it
                rows.append({"task": task, "metric": metric, "filter": flt, "n": len(docs),
                             "higher_is_better": hib.get(metric), **row})
    return rows


def side_by_side(model: load.ModelDir, reference: load.ModelDir, tasks: tuple[str, ...], tasks_dir: Path,
                 limit: int | None, batch_size: int, exact: bool, reference_adapter=None) -> dict:
    """lm_eval on ``reference`` then ``model``; the rows and each side's lm_eval results."""
    manager = task_manager(tasks_dir, tasks)
    runs = {}
    for side, md, adapter in (("reference", reference, reference_adapter), ("model", model, None)):
        runs[side] = run_one(md, adapter, tasks, manager, limit, batch_size, exact, f"lm_eval {side}")
    return {"rows": paired_rows(runs["reference"], runs["model"]), "tasks": list(tasks),
            "tasks_dir": str(tasks_dir), "limit": limit, "ov_exact": exact,
            "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None,
            "results": {side: plain_results(r) for side, r in runs.items()}}


def plain_results(res: dict) -> dict:
    """The JSON-safe part of an lm_eval result (no samples, no task configs with functions)."""
    keep = ("results", "groups", "group_subtasks", "versions", "n-shot", "higher_is_better", "n-samples")
    return json.loads(json.dumps({k: res[k] for k in keep if k in res}, default=str))


def format_table(t: dict, names=("reference", "model")) -> list[str]:
    """The side-by-side markdown table: value ± standard error, Δ ± paired standard error."""
    def pm(v, e):
        return f"{v:.4f}" + ("" if e is None else f" ± {e:.4f}")

    lines = [f"| task | metric | n | {names[0]} | {names[1]} | Δ ({names[1]} − {names[0]}) |",
             "|---|---|---|---|---|---|"]
    for r in t["rows"]:
        arrow = {True: " ↑", False: " ↓"}.get(r["higher_is_better"], "")
        metric = r["metric"] + ("" if r["filter"] == "none" else f" ({r['filter']})") + arrow
        lines.append(f"| {r['task']} | {metric} | {r['n']} | {pm(r['reference'], r['reference_err'])} | "
                     f"{pm(r['model'], r['model_err'])} | {pm(r['delta'], r['delta_err'])} |")
    return lines
