"""Measure tokens/s of models side by side, llama-bench style, against the memory-bandwidth roofline.

Each candidate is ``NAME=KIND:PATH[,key=value...]`` with KIND one of:

  ov               an OpenVINO IR directory through openvino-genai (the merged INT4 model)
  ov+lora          an OpenVINO base IR plus ``adapter=DIR`` through genai's Adapter (alpha = lora_alpha/r)
  torch-gptq+lora  the seed baseline: a GPTQ checkpoint plus the un-merged peft ``adapter=DIR``,
                   transformers + gptqmodel in bf16, run in the baseline environment's python
  torch            any Hugging Face directory via transformers (``dtype=bf16|fp32``, ``adapter=DIR``)

Other keys: ``device=CPU``, ``lora_mode=auto|dynamic|static_rank`` (ov+lora), ``alpha=`` (override),
and any OpenVINO property for the ov kinds (``KV_CACHE_PRECISION=u8``,
``DYNAMIC_QUANTIZATION_GROUP_SIZE=32``, ``INFERENCE_PRECISION_HINT=bf16``, ``ENABLE_CPU_PINNING=true``).

Every candidate runs in its own process (clean peak RSS). A run is pp (prefill of -p random token
ids) and tg (decode of -n tokens, EOS ignored), after an uncounted warm-up that also checks the
output is complete and finite; -r repetitions give mean ± std. DRAM bandwidth is measured on the
spot (STREAM copy/triad, same threads) and decode is compared with bandwidth / weight bytes read
per token. A candidate that fails is reported as failed, never as a speed.

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

from tangquant.errors import BenchError

logger = logging.getLogger(__name__)

HELP = "tokens/s side by side (pp/tg, llama-bench style) against the bandwidth roofline"
KINDS = ("ov", "ov+lora", "torch-gptq+lora", "torch")
MARKER = "random weights — speed only"
DEFAULT_BASELINE_PYTHON = "benchmarks/baseline/.venv/bin/python"
_ROOT = Path(__file__).resolve().parent.parent  # put on PYTHONPATH for the baseline's python


@dataclasses.dataclass(frozen=True)
class BenchRecipe:
    candidates: tuple[str, ...] = ()
    prompt_tokens: int = 512
    gen_tokens: int = 128
    repetitions: int = 5
    threads: tuple[int, ...] = ()
    warmup: int = 1
    baseline_python: str = DEFAULT_BASELINE_PYTHON
    timeout_s: int = 3600
    bandwidth_bytes: int = 2**30


@dataclasses.dataclass(frozen=True)
class Candidate:
    name: str
    kind: str
    path: str
    options: dict


def parse_candidate(text: str) -> Candidate:
    """``NAME=KIND:PATH[,key=value...]`` -> Candidate (the path need not exist yet)."""
    name, sep, rest = str(text).partition("=")
    kind, sep2, rest = rest.partition(":")
    if not (sep and sep2 and name.strip() and rest):
        raise BenchError(f"candidate {text!r} must look like NAME=KIND:PATH[,key=value...]")
    if kind not in KINDS:
        raise BenchError(f"candidate {name}: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    path, *pairs = rest.split(",")
    options = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not (eq and key.strip()):
            raise BenchError(f"candidate {name}: option {pair!r} must be key=value")
        options[key.strip()] = value.strip()
    if kind == "ov+lora" and "adapter" not in options:
        raise BenchError(f"candidate {name}: kind ov+lora needs adapter=DIR")
    if options.get("dtype", "bf16") not in ("bf16", "fp16", "fp32"):
        raise BenchError(f"candidate {name}: dtype must be bf16, fp16 or fp32")
    return Candidate(name.strip(), kind, path, options)


def _check_paths(c: Candidate) -> None:
    """Raise BenchError for a missing model or adapter (reported as a failed candidate)."""
    for what, p in (("model directory", c.path), ("adapter", c.options.get("adapter"))):
        if p is not None and not Path(p).is_dir():
            raise BenchError(f"{what} {p} does not exist")


def _read_config(path: str) -> dict:
    try:
        return json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _worker(spec: dict, python: str, timeout_s: int) -> dict:
    """Run one measurement in a fresh process; its last stdout line is the JSON result."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]),
               PYTHONPATH=os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [python, "-m", "tangquant.measure.worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout_s} s"}
    except OSError as exc:
        return {"ok": False, "error": f"cannot start {python}: {exc.strerror or exc}"}
    lines = [l for l in proc.stdout.strip().splitlines() if l.startswith("{")]
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        return {"ok": False, "error": f"worker exited with code {proc.returncode} and no result"}


def _bandwidth(threads: int, nbytes: int, timeout_s: int) -> dict:
    res = _worker({"op": "bandwidth", "threads": threads, "bytes": nbytes}, sys.executable, timeout_s)
    if not res.get("ok"):
        raise BenchError(f"bandwidth measurement failed: {res.get('error')}")
    res["gbs"] = max(res["copy_gbs"], res["triad_gbs"])
    return res


def _measure(c: Candidate, threads: int, rec: BenchRecipe) -> dict:
    from tangquant.measure.roofline import bytes_per_token
    from tangquant.files import dir_size

    _check_paths(c)
    config = _read_config(c.path)
    out = {"size_bytes": dir_size(Path(c.path)) + (dir_size(Path(c.options["adapter"]))
                                                   if c.options.get("adapter") else 0)}
    out.update(bytes_per_token(c.kind, Path(c.path), c.options))
    python = sys.executable
    if c.kind == "torch-gptq+lora":
        python = rec.baseline_python
        if not Path(python).is_absolute() and not Path(python).exists():
            python = str(_ROOT / python)  # the default is relative to the checkout
        if not Path(python).is_file():
            raise BenchError(f"baseline python {python} does not exist; build it with "
                             "benchmarks/baseline/setup.sh or pass --baseline-python")
    spec = {"op": "generate", "kind": c.kind, "path": str(Path(c.path).resolve()),
            "options": c.options, "prompt_tokens": rec.prompt_tokens, "gen_tokens": rec.gen_tokens,
            "repetitions": rec.repetitions, "warmup": rec.warmup, "threads": threads,
            "vocab": min(int(config.get("vocab_size") or 256), 151643)}
    res = _worker(spec, python, rec.timeout_s)
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


def _environment(rec: BenchRecipe) -> dict:
    from tangquant.files import cpu_model, package_versions

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
                      "repetitions": rec.repetitions, "warmup": rec.warmup}}


def _sweep(parsed: list[Candidate], thread_list: list[int], rec: BenchRecipe) -> list[dict]:
    """Every candidate at every thread count, bandwidth first; failures become failed rows."""
    from tqdm import tqdm

    from tangquant.errors import TangquantError

    rows = []
    bar = tqdm(total=len(parsed) * len(thread_list), desc="bench", file=sys.stderr, unit="run")
    for t in thread_list:
        bar.set_postfix_str(f"bandwidth, {t} threads")
        bw = _bandwidth(t, rec.bandwidth_bytes, rec.timeout_s)
        logger.info("bandwidth at %d threads: copy %.1f GB/s, triad %.1f GB/s",
                    t, bw["copy_gbs"], bw["triad_gbs"])
        for c in parsed:
            bar.set_postfix_str(f"{c.name}, {t} threads")
            row = {"name": c.name, "kind": c.kind, "path": c.path, "options": c.options,
                   "threads": t, "bandwidth": {k: bw[k] for k in ("copy_gbs", "triad_gbs", "gbs",
                                                                   "array_bytes")}}
            try:
                row.update(_measure(c, t, rec), status="ok", error=None)
                row["roofline_tps"] = bw["gbs"] * 1e9 / row["bytes_per_token"]
                row["roofline_pct"] = 100 * row["tg_tps"] / row["roofline_tps"]
            except (TangquantError, OSError) as exc:
                row.update(status="failed", error=str(exc))
                logger.warning("candidate %s failed: %s", c.name, exc)
            rows.append(row)
            bar.update(1)
    bar.close()
    return rows


def bench(candidates=(), prompt_tokens: int | None = None, gen_tokens: int | None = None,
          repetitions: int | None = None, threads=(), warmup: int | None = None,
          plot: str | None = None,
          results_dir: str = "benchmarks/results", recipe: str | None = None,
          baseline_python: str | None = None, bandwidth_bytes: int | None = None) -> list[dict]:
    """Benchmark every candidate at every thread count; return one record per (candidate, threads).

    Settings left as None come from ``recipe`` or the defaults (-p 512 -n 128 -r 5, one warm-up,
    all cores); a failed candidate is a record with ``status: "failed"`` and its ``error``.
    """
    from tangquant import recipe as recipes
    from tangquant.measure.report import add_ratios, append_jsonl, markdown_table
    from tangquant.measure.report import plot as draw

    rec = recipes.load(BenchRecipe, recipe, {
        "candidates": tuple(candidates) or None, "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens, "repetitions": repetitions, "threads": tuple(threads) or None,
        "warmup": warmup, "baseline_python": baseline_python, "bandwidth_bytes": bandwidth_bytes})
    parsed = [parse_candidate(c) for c in rec.candidates]
    if not parsed:
        raise BenchError("no candidate given (--candidate NAME=KIND:PATH, or a recipe's candidates)")
    if len({c.name for c in parsed}) != len(parsed):
        raise BenchError("candidate names must be unique")
    if min(rec.prompt_tokens, rec.gen_tokens, rec.repetitions) < 1 or rec.warmup < 0:
        raise BenchError("-p, -n and -r must be at least 1 and the warm-up at least 0")
    thread_list = [int(t) for t in (rec.threads or (os.cpu_count() or 1,))]
    env = _environment(rec)
    rows = _sweep(parsed, thread_list, rec)
    add_ratios(rows)
    env["loadavg_end"] = list(os.getloadavg())
    records = [{**env, **row} for row in rows]
    out = Path(results_dir)
    jsonl = out if out.suffix == ".jsonl" else out / "bench.jsonl"
    append_jsonl(jsonl, records)
    print(markdown_table(rows, rec.prompt_tokens, rec.gen_tokens))
    if plot:
        draw(rows, Path(plot), rec.prompt_tokens, rec.gen_tokens)
    failed = sum(r["status"] != "ok" for r in rows)
    print(f"bench: {len(rows) - failed} ok, {failed} failed; appended to {jsonl}"
          + (f"; plot {plot}" if plot else ""))
    return records


def add_arguments(parser) -> None:
    parser.add_argument("--candidate", action="append", default=[], metavar="NAME=KIND:PATH[,k=v]",
                        help=f"a model to measure (repeatable); KIND is one of {', '.join(KINDS)}")
    parser.add_argument("-p", "--prompt-tokens", type=int, help="prefill length (default 512)")
    parser.add_argument("-n", "--gen-tokens", type=int, help="decoded tokens (default 128)")
    parser.add_argument("-r", "--repetitions", type=int, help="timed repetitions (default 5)")
    parser.add_argument("-t", "--threads", help="thread count, or a comma list to sweep (default: all cores)")
    parser.add_argument("--warmup", type=int,
                        help="uncounted warm-up runs (default 1; at least one runs: it checks the output)")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw the results")
    parser.add_argument("--recipe", metavar="FILE", help="a bench recipe (YAML); flags override it")
    parser.add_argument("--results", default="benchmarks/results", metavar="DIR|FILE.jsonl",
                        help="where the JSONL records are appended (DIR/bench.jsonl by default)")
    parser.add_argument("--baseline-python", metavar="PATH",
                        help=f"python of the seed-baseline environment (default {DEFAULT_BASELINE_PYTHON})")
    parser.add_argument("--bandwidth-mb", type=int, help="size of each STREAM array (default 1024 MiB)")


def run(args) -> int:
    threads = ()
    if args.threads:
        try:
            threads = tuple(int(t) for t in str(args.threads).split(",") if t.strip())
        except ValueError:
            raise BenchError(f"-t must be a number or a comma list, got {args.threads!r}") from None
    records = bench(args.candidate, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                    repetitions=args.repetitions, threads=threads, warmup=args.warmup,
                    plot=args.plot, results_dir=args.results, recipe=args.recipe,
                    baseline_python=args.baseline_python,
                    bandwidth_bytes=args.bandwidth_mb * 2**20 if args.bandwidth_mb else None)
    return 0 if all(r["status"] == "ok" for r in records) else 1
