"""Running bench candidates: one worker process per measurement, rounds in turn, one row each.

``tangquant bench`` and ``tangquant tune`` both measure through here, so a candidate is timed
the same way whichever command asked. The engines table says which runner, which Python and
which bytes-per-token count a kind has; this module starts the worker, reads its one JSON line,
and turns a crash or a timeout into a failed candidate, never a speed.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

from tangquant import files, host
from tangquant.card import RANDOM_WEIGHTS as MARKER
from tangquant.errors import BenchError, TangquantError
from tangquant.measure.candidate import Candidate, Resolved, resolve
from tangquant.measure.report import append_jsonl
from tangquant.measure.roofline import bytes_per_token
from tangquant.measure.rounds import pool

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]  # the checkout (the baseline default, the git sha)
DEFAULT_BASELINE_PYTHON = "benchmarks/baseline/.venv/bin/python"
BANDWIDTH = "tangquant.measure.roofline:bandwidth"


def run_worker(spec: dict, python: str, timeout_s: int) -> dict:
    """Run one measurement in a fresh process; its last stdout line is the JSON result."""
    env = files.child_env(OMP_NUM_THREADS=str(spec["threads"]))
    cmd = [python, "-m", "tangquant.measure.worker", json.dumps(spec)]
    try:
        # The worker's stderr (its per-repetition lines, its libraries' noise) goes to the log
        # at -v, not between the progress bars.
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout_s} s"}
    except OSError as exc:
        return {"ok": False, "error": f"cannot start {python}: {exc.strerror or exc}"}
    if proc.returncode < 0:  # a segfault in a runtime is a failed candidate, never a speed
        return {"ok": False, "error": f"worker crashed (signal {-proc.returncode})"}
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    for line in errors:
        logger.debug("worker %s: %s", spec.get("kind", spec.get("call")), line)
    lines = [l for l in proc.stdout.strip().splitlines() if l.startswith("{")]
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        last = f": {errors[-1][:300]}" if errors else ""
        return {"ok": False, "error": f"worker exited with code {proc.returncode} and no result{last}"}


def measure_bandwidth(threads: int, nbytes: int, timeout_s: int) -> dict:
    res = run_worker({"call": BANDWIDTH, "threads": threads, "bytes": nbytes}, sys.executable, timeout_s)
    if not res.get("ok"):
        raise BenchError(f"bandwidth measurement failed: {res.get('error')}")
    # The roofline is the read-only kernel's: decode reads weights; copy/triad stay in the record.
    res["gbs"] = res["read_gbs"]
    return res


def interpreter(c: Candidate, baseline_python: str) -> str:
    """The Python a candidate's engine runs in (the seed baseline's own environment, or this one)."""
    if c.engine.python != "baseline":
        return sys.executable
    python = baseline_python
    if not Path(python).is_absolute() and not Path(python).exists():
        python = str(ROOT / python)  # the default is relative to the checkout
    if not Path(python).is_file():
        raise BenchError(f"baseline python {python} does not exist; build it with "
                         "benchmarks/baseline/setup.sh or pass --baseline-python")
    return python


def model_size(r: Resolved) -> int:
    c = r.candidate
    size = r.model.stat().st_size if r.model.is_file() else files.dir_size(r.model)
    adapter = c.engine.adapter_option
    return size + (files.dir_size(Path(c.options[adapter])) if adapter and c.options.get(adapter) else 0)


def measure_candidate(c: Candidate | Resolved, threads: int, rec) -> dict:
    """One worker run of a candidate (``rec``: the bench's prompt/gen/repetition settings)."""
    r = c if isinstance(c, Resolved) else resolve(c)
    c = r.candidate
    out = {"size_bytes": model_size(r), **bytes_per_token(c.kind, r.model, c.options), **origin(r.model)}
    spec = {"call": c.engine.runner, "kind": c.kind, "path": str(r.model.resolve()),
            "options": c.options, "prompt_tokens": rec.prompt_tokens, "gen_tokens": rec.gen_tokens,
            "repetitions": rec.repetitions, "warmup": rec.warmup, "threads": threads,
            "vocab": min(int(r.config.get("vocab_size") or 256), 151643)}
    res = run_worker(spec, interpreter(c, rec.baseline_python), rec.timeout_s)
    if not res.pop("ok", False):
        raise BenchError(res.get("error") or "worker failed")
    out.update(res)
    if r.config.get("tangquant_random_weights") or MARKER in _readme(r.model):
        out["label"] = MARKER
    return out


def origin(model: Path) -> dict:
    """Who made the model file a row measures: ``{"origin": "tangquant" | the outside tool, "by": …}``.
    A GGUF says so in its metadata (:func:`tangquant.gguf.reader.origin`); a directory by the
    manifest (``tangquant.json``) tangquant writes into everything it makes."""
    if model.is_file() and model.suffix == ".gguf":
        from tangquant.gguf.reader import origin as gguf_origin  # gguf and numpy, only for a GGUF

        try:
            return gguf_origin(model)
        except TangquantError as exc:
            return {"origin": "unknown", "by": f"unreadable metadata: {exc}"}
    # quantize --export-ir writes its IR into <checkpoint>/openvino, under the checkpoint's manifest
    for where in (model, model.parent) if model.name == "openvino" else (model,):
        try:
            manifest = files.read_manifest(where) if where.is_dir() else None
        except TangquantError:
            manifest = None
        if manifest:
            return {"origin": "tangquant", "by": f"tangquant {manifest.get('stage', '?')} "
                                                 f"{manifest.get('tangquant_version', '')}".strip()}
    quant = (_json(model / "config.json").get("quantization_config") or {}) if model.is_dir() else {}
    return {"origin": "outside", "by": f"no tangquant.json ({quant.get('quant_method', 'no quantization_config')})"}


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _readme(path: Path) -> str:
    try:
        return (path / "README.md").read_text(encoding="utf-8") if path.is_dir() else ""
    except OSError:
        return ""


def environment(flags: dict) -> dict:
    """The run's record: the host, the command, the commit and the bench's flags."""
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    sha = sha if len(sha) == 40 and all(ch in "0123456789abcdef" for ch in sha) else None
    rec = host.record()
    return {"date": rec.pop("date"), "command": " ".join(sys.argv), "host": rec, "cpu": rec["cpu"],
            "cores": rec["cores"], "git_sha": sha, "versions": rec["versions"],
            "loadavg_start": rec["loadavg"], "flags": flags}


def sweep(cands: list[Candidate], thread_list: list[int], rec, partial: Path,
          resolved: dict[str, Resolved] | None = None) -> list[dict]:
    """Every candidate at every thread count, bandwidth first; failures become failed rows.

    Each round's result is also appended to ``partial`` as it ends: a run killed before its
    records are written (a lent machine taken back) still leaves its figures machine-readable."""
    rows, resolved = [], dict(resolved or {})
    bar = tqdm(total=len(cands) * len(thread_list) * rec.rounds, desc="bench", file=sys.stderr, unit="run")
    for t in thread_list:
        bar.set_postfix_str(f"bandwidth, {t} threads")
        bw = measure_bandwidth(t, rec.bandwidth_mb * 2**20, rec.timeout_s)
        logger.info("bandwidth at %d threads: read %.1f GB/s (the roofline), copy %.1f GB/s, "
                    "triad %.1f GB/s", t, bw["read_gbs"], bw["copy_gbs"], bw["triad_gbs"])
        results = {c.name: [] for c in cands}
        errors: dict[str, str] = {}
        for rnd in range(rec.rounds):
            for c in cands:
                bar.set_postfix_str(f"{c.name}, {t} threads" + (f", round {rnd + 1}" if rec.rounds > 1 else ""))
                if c.name not in errors:  # a failed round fails the candidate: its later rounds are skipped
                    res, error = _one_round(c, resolved, t, rec, rnd, partial)
                    if error is None:
                        results[c.name].append(res)
                    else:
                        errors[c.name] = error
                        logger.warning("candidate %s failed: %s", c.name, error)
                bar.update(1)
        for c in cands:
            row = _row(c, t, bw, results[c.name], errors.get(c.name), rec)
            if "origin" not in row and c.name in resolved:  # a failed row still says whose file it was
                row.update(origin(resolved[c.name].model))
            rows.append(row)
    bar.close()
    return rows


def _one_round(c: Candidate, resolved: dict, t: int, rec, rnd: int, partial: Path):
    """One round of one candidate: (its result, None) — logged and appended to ``partial`` —
    or (None, why it failed). The model is resolved on its first round only."""
    try:
        if c.name not in resolved:
            resolved[c.name] = resolve(c)
        res = measure_candidate(resolved[c.name], t, rec)
    except (TangquantError, OSError) as exc:
        return None, f"round {rnd + 1}: {exc}" if rec.rounds > 1 else str(exc)
    logger.info("%s at %d threads%s: pp %.1f t/s, tg %.2f t/s, peak RSS %.2f GB", c.name, t,
                f", round {rnd + 1}" if rec.rounds > 1 else "", res.get("pp_tps", float("nan")),
                res["tg_tps"], res.get("peak_rss_bytes", 0) / 1e9)
    append_jsonl(partial, [{"name": c.name, "kind": c.kind, "path": c.path, "threads": t, "round": rnd + 1, **res}])
    return res, None


def _row(c: Candidate, t: int, bw: dict, results: list[dict], error: str | None, rec) -> dict:
    row = {"name": c.name, "kind": c.kind, "path": c.path, "options": c.options, "threads": t,
           "bandwidth": {k: bw[k] for k in ("copy_gbs", "triad_gbs", "read_gbs", "read_kernels_gbs", "gbs",
                                             "array_bytes")}}
    if error is not None:  # a failure in any round fails the row: never a speed from part of it
        return {**row, "status": "failed", "error": error}
    row.update(pool(results, rec.prompt_tokens), status="ok", error=None)
    row["roofline_tps"] = bw["gbs"] * 1e9 / row["bytes_per_token"]
    row["roofline_pct"] = 100 * row["tg_tps"] / row["roofline_tps"]
    return row
