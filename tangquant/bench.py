"""Measure tokens/s of models side by side, llama-bench style, against the memory-bandwidth roofline.

Each candidate is ``NAME=KIND:PATH[,key=value...]`` with KIND one of:

  ov               an OpenVINO IR directory through openvino-genai (the merged INT4 model)
  ov+lora          an OpenVINO base IR plus ``adapter=DIR`` through genai's Adapter (alpha = lora_alpha/r)
  torch-gptq+lora  the seed baseline: a GPTQ checkpoint plus the un-merged peft ``adapter=DIR``,
                   transformers + gptqmodel in bf16, run in the baseline environment's python
  torch            any Hugging Face directory via transformers (``dtype=bf16|fp32``, ``adapter=DIR``)
  llamacpp         a GGUF file (or a directory holding one) through llama.cpp (llama-cpp-python's
                   low-level API); ``repack=0|1`` turns llama.cpp's CPU weight repacking off or on
                   (default on, as llama.cpp); the row records which tensors it really repacked

Other keys: ``device=CPU``, ``lora_mode=auto|dynamic|static_rank`` (ov+lora), ``alpha=`` (override),
and any OpenVINO property for the ov kinds (``KV_CACHE_PRECISION=u8``,
``DYNAMIC_QUANTIZATION_GROUP_SIZE=32``, ``INFERENCE_PRECISION_HINT=bf16``, ``ENABLE_CPU_PINNING=true``),
plus genai's scheduler ``cache_size=GB`` and ``enable_prefix_caching=false``.

Every candidate runs in its own process (clean peak RSS). A run is pp (prefill of -p random token
ids) and tg (decode of -n tokens, EOS ignored, after that prompt for every kind: llama-bench's
tg128 starts on an empty context instead), after an uncounted warm-up that also checks the
output is complete and finite; -r repetitions give mean ± std (medians in the records); --rounds N
runs the candidates in turn N times and pools the runs. DRAM bandwidth is measured on the
spot (a read-only sum, the roofline, plus STREAM copy/triad, same threads) and decode is
compared with read bandwidth / weight bytes read per token. A candidate that fails is reported as failed, never as a speed.

Example:
  tangquant bench --candidate merged=ov:out/ir --candidate lora=ov+lora:out/base-ir,adapter=lora \\
      --candidate seed=torch-gptq+lora:out/base-gptq,adapter=lora -p 512 -n 128 -r 5 -t 16
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

from tangquant import files, load, recipe
from tangquant.errors import BenchError, TangquantError
from tangquant.files import cpu_model, dir_size, existing_dir, package_versions
from tangquant.measure.candidate import KINDS, Candidate, parse_candidate
from tangquant.measure.report import add_ratios, append_jsonl, markdown_table
from tangquant.measure.report import plot as draw
from tangquant.measure.roofline import bytes_per_token
from tangquant.measure.rounds import pool
from tangquant.recipe import param, require

logger = logging.getLogger(__name__)

HELP = "tokens/s side by side (pp/tg, llama-bench style) against the bandwidth roofline"
KIND_MODELS = {"ov": ("ir",), "ov+lora": ("ir",), "torch-gptq+lora": ("gptq",), "torch": ("hf", "gptq"),
               "llamacpp": ("gguf",)}
MARKER = "random weights — speed only"
PLOT_SUFFIXES = (".png", ".svg", ".pdf")
DEFAULT_BASELINE_PYTHON = "benchmarks/baseline/.venv/bin/python"
_ROOT = Path(__file__).resolve().parent.parent  # the checkout (the baseline default, the git sha)


@dataclasses.dataclass(frozen=True)
class BenchRecipe:
    candidates: tuple[str, ...] = param((), f"a model to measure, NAME=KIND:PATH[,key=value…] "
                                        f"(repeatable); KIND is one of {', '.join(KINDS)}",
                                        flag="--candidate", repeat=True, metavar="NAME=KIND:PATH[,k=v]")
    prompt_tokens: int = param(512, "prefill length", short="-p")
    gen_tokens: int = param(128, "decoded tokens", short="-n")
    repetitions: int = param(5, "timed repetitions", short="-r")
    rounds: int = param(1, "run the candidates in turn this many times, each a fresh process with -r "
                        "repetitions, and pool the runs: a drifting host's speed falls on all alike")
    threads: tuple[int, ...] = param((), "thread count, or a comma list to sweep (default: all cores)",
                                     short="-t")
    warmup: int = param(1, "uncounted warm-up runs (at least one runs: it checks the output)")
    baseline_python: str = param(DEFAULT_BASELINE_PYTHON, "python of the seed-baseline environment")
    timeout_s: int = param(3600, "limit per candidate run, in seconds")
    bandwidth_mb: int = param(1024, "size of each STREAM array, MiB")

    def __post_init__(self):
        require(min(self.prompt_tokens, self.gen_tokens, self.repetitions, self.rounds) >= 1
                and self.warmup >= 0, "-p, -n, -r and --rounds must be at least 1 and the warm-up at least 0")
        require(all(t >= 1 for t in self.threads), f"-t must be positive, got {self.threads}")
        require(self.timeout_s > 0 and self.bandwidth_mb >= 1, "timeout_s and bandwidth_mb must be positive")


PARAMS = BenchRecipe
RECIPE_HELP = "a bench recipe (e.g. recipes/bench-llama-bench.yaml); flags override it"


def _model_config(c: Candidate) -> dict:
    """The candidate's config.json, after the loader's checks (a bad path fails the candidate)."""
    md = load.inspect(c.path, kinds=KIND_MODELS[c.kind])
    if c.options.get("adapter"):
        existing_dir(c.options["adapter"], "adapter")
    return md.config


def _check_context(c: Candidate, rec: BenchRecipe) -> None:
    """Refuse, before any measurement, a run past a candidate's context (a bad path instead
    fails that candidate alone, in the sweep)."""
    try:
        context = load.context_length(_model_config(c))
    except TangquantError:
        return
    if context is not None and rec.prompt_tokens + rec.gen_tokens > context:
        raise BenchError(f"candidate {c.name}: -p {rec.prompt_tokens} + -n {rec.gen_tokens} tokens run "
                         f"past the model's context of {context}")


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
        logger.debug("worker %s: %s", spec.get("kind", spec.get("op")), line)
    lines = [l for l in proc.stdout.strip().splitlines() if l.startswith("{")]
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        last = f": {errors[-1][:300]}" if errors else ""
        return {"ok": False, "error": f"worker exited with code {proc.returncode} and no result{last}"}


def measure_bandwidth(threads: int, nbytes: int, timeout_s: int) -> dict:
    res = run_worker({"op": "bandwidth", "threads": threads, "bytes": nbytes}, sys.executable, timeout_s)
    if not res.get("ok"):
        raise BenchError(f"bandwidth measurement failed: {res.get('error')}")
    # The roofline is the read-only kernel's: decode reads weights; copy/triad stay in the record.
    res["gbs"] = res["read_gbs"]
    return res


def measure_candidate(c: Candidate, threads: int, rec: BenchRecipe) -> dict:
    config = _model_config(c)
    if c.kind == "llamacpp":
        from tangquant.gguf.reader import bytes_per_token as gguf_bytes_per_token

        path = load.inspect(c.path, kinds=("gguf",)).path  # the .gguf file itself
        out = {"size_bytes": path.stat().st_size, **gguf_bytes_per_token(path)}
    else:
        path = Path(c.path)
        out = {"size_bytes": dir_size(path) + (dir_size(Path(c.options["adapter"]))
                                               if c.options.get("adapter") else 0)}
        out.update(bytes_per_token(c.kind, path, c.options))
    python = sys.executable
    if c.kind == "torch-gptq+lora":
        python = rec.baseline_python
        if not Path(python).is_absolute() and not Path(python).exists():
            python = str(_ROOT / python)  # the default is relative to the checkout
        if not Path(python).is_file():
            raise BenchError(f"baseline python {python} does not exist; build it with "
                             "benchmarks/baseline/setup.sh or pass --baseline-python")
    spec = {"op": "generate", "kind": c.kind, "path": str(path.resolve()),
            "options": c.options, "prompt_tokens": rec.prompt_tokens, "gen_tokens": rec.gen_tokens,
            "repetitions": rec.repetitions, "warmup": rec.warmup, "threads": threads,
            "vocab": min(int(config.get("vocab_size") or 256), 151643)}
    res = run_worker(spec, python, rec.timeout_s)
    if not res.pop("ok", False):
        raise BenchError(res.get("error") or "worker failed")
    out.update(res)
    if config.get("tangquant_random_weights") or MARKER in _readme(c.path):
        out["label"] = MARKER
    return out


def _readme(path: str) -> str:
    try:
        return (Path(path) / "README.md").read_text(encoding="utf-8")
    except OSError:
        return ""


def environment(rec: BenchRecipe) -> dict:
    try:
        sha = subprocess.run(["git", "-C", str(_ROOT), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    sha = sha if len(sha) == 40 and all(c in "0123456789abcdef" for c in sha) else None
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "cpu": cpu_model(), "cores": os.cpu_count(),
            "git_sha": sha, "versions": package_versions(), "loadavg_start": list(os.getloadavg()),
            "flags": {"prompt_tokens": rec.prompt_tokens, "gen_tokens": rec.gen_tokens,
                      "repetitions": rec.repetitions, "rounds": rec.rounds, "warmup": rec.warmup}}


def _sweep(parsed: list[Candidate], thread_list: list[int], rec: BenchRecipe, partial: Path) -> list[dict]:
    """Every candidate at every thread count, bandwidth first; failures become failed rows.

    Each round's result is also appended to ``partial`` as it ends: a run killed before its
    records are written (a lent machine taken back) still leaves its figures machine-readable."""
    rows = []
    bar = tqdm(total=len(parsed) * len(thread_list) * rec.rounds, desc="bench", file=sys.stderr, unit="run")
    for t in thread_list:
        bar.set_postfix_str(f"bandwidth, {t} threads")
        bw = measure_bandwidth(t, rec.bandwidth_mb * 2**20, rec.timeout_s)
        logger.info("bandwidth at %d threads: read %.1f GB/s (the roofline), copy %.1f GB/s, "
                    "triad %.1f GB/s", t, bw["read_gbs"], bw["copy_gbs"], bw["triad_gbs"])
        results = {c.name: [] for c in parsed}
        errors: dict[str, str] = {}
        for rnd in range(rec.rounds):
            for c in parsed:
                bar.set_postfix_str(f"{c.name}, {t} threads" + (f", round {rnd + 1}" if rec.rounds > 1 else ""))
                if c.name not in errors:  # a failed round fails the candidate: its later rounds are skipped
                    res, error = _one_round(c, t, rec, rnd, partial)
                    if error is None:
                        results[c.name].append(res)
                    else:
                        errors[c.name] = error
                        logger.warning("candidate %s failed: %s", c.name, error)
                bar.update(1)
        for c in parsed:
            rows.append(_row(c, t, bw, results[c.name], errors.get(c.name), rec))
    bar.close()
    return rows


def _one_round(c: Candidate, t: int, rec: BenchRecipe, rnd: int, partial: Path) -> tuple[dict | None, str | None]:
    """One round of one candidate: its result (logged, and appended to ``partial``), or why it failed."""
    try:
        res = measure_candidate(c, t, rec)
    except (TangquantError, OSError) as exc:
        return None, f"round {rnd + 1}: {exc}" if rec.rounds > 1 else str(exc)
    logger.info("%s at %d threads%s: pp %.1f t/s, tg %.2f t/s, peak RSS %.2f GB", c.name, t,
                f", round {rnd + 1}" if rec.rounds > 1 else "", res.get("pp_tps", float("nan")),
                res["tg_tps"], res.get("peak_rss_bytes", 0) / 1e9)
    append_jsonl(partial, [{"name": c.name, "kind": c.kind, "path": c.path, "threads": t, "round": rnd + 1, **res}])
    return res, None


def _row(c: Candidate, t: int, bw: dict, results: list[dict], error: str | None, rec: BenchRecipe) -> dict:
    row = {"name": c.name, "kind": c.kind, "path": c.path, "options": c.options, "threads": t,
           "bandwidth": {k: bw[k] for k in ("copy_gbs", "triad_gbs", "read_gbs", "read_kernels_gbs", "gbs",
                                             "array_bytes")}}
    if error is not None:  # a failure in any round fails the row: never a speed from part of it
        return {**row, "status": "failed", "error": error}
    row.update(pool(results, rec.prompt_tokens), status="ok", error=None)
    row["roofline_tps"] = bw["gbs"] * 1e9 / row["bytes_per_token"]
    row["roofline_pct"] = 100 * row["tg_tps"] / row["roofline_tps"]
    return row


def bench(candidates=(), params: BenchRecipe | str | Path | None = None, plot: str | None = None,
          results_dir: str = "benchmarks/results", force: bool = False, **overrides) -> dict:
    """Benchmark every candidate at every thread count.

    Returns ``records`` (one per candidate and thread count; a failed candidate is a record
    with ``status: "failed"`` and its ``error``), the markdown ``report``, a ``summary`` and
    ``exit_code`` 1 when a candidate failed.
    """
    rec = recipe.resolve(BenchRecipe, params, {"candidates": tuple(candidates) or None, **overrides})
    parsed = [parse_candidate(c) for c in rec.candidates]
    if not parsed:
        raise BenchError("no candidate given (--candidate NAME=KIND:PATH, or a recipe's candidates)")
    if len({c.name for c in parsed}) != len(parsed):
        raise BenchError("candidate names must be unique")
    thread_list = [int(t) for t in (rec.threads or (os.cpu_count() or 1,))]
    out = Path(results_dir)
    jsonl = out if out.suffix == ".jsonl" else out / "bench.jsonl"
    inputs = [c.path for c in parsed] + [c.options.get("adapter") for c in parsed]
    files.check_output_file(jsonl, inputs, force, append=True)  # before any run: never an input
    if plot:
        if Path(plot).suffix.lower() not in PLOT_SUFFIXES:
            raise BenchError(f"--plot {plot}: the file name must end in {', '.join(PLOT_SUFFIXES)}")
        files.check_output_file(plot, inputs + [jsonl], force)
    for c in parsed:
        _check_context(c, rec)
    env = environment(rec)
    partial = jsonl.with_name(f"{jsonl.name}.{env['date'][:19].replace(':', '')}.partial")
    append_jsonl(partial, [{"partial_of": str(jsonl), **env}])
    logger.info("each round goes to %s until the records are appended to %s", partial, jsonl)
    rows = _sweep(parsed, thread_list, rec, partial)
    add_ratios(rows)
    env["loadavg_end"] = list(os.getloadavg())
    records = [{**env, **row} for row in rows]
    append_jsonl(jsonl, records)
    partial.unlink()
    if plot:
        draw(rows, Path(plot), rec.prompt_tokens, rec.gen_tokens)
    failed = sum(r["status"] != "ok" for r in rows)
    return {"records": records, "report": markdown_table(rows, rec.prompt_tokens, rec.gen_tokens),
            "summary": f"bench: {len(rows) - failed} ok, {failed} failed; appended to {jsonl}"
                       + (f"; plot {plot}" if plot else ""),
            "exit_code": 1 if failed else 0}


def add_arguments(parser) -> None:
    parser.add_argument("--plot", metavar="FILE.png", help="also draw the results")
    parser.add_argument("--results", default="benchmarks/results", metavar="DIR|FILE.jsonl",
                        help="where the JSONL records are appended (DIR/bench.jsonl by default)")
    parser.add_argument("--force", action="store_true", help="replace an existing --plot file")


def run(args) -> dict:
    return bench(params=recipe.from_args(BenchRecipe, args), plot=args.plot, results_dir=args.results,
                 force=args.force)
