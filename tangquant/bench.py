"""Measure tokens/s of models side by side, llama-bench style, against the memory-bandwidth roofline.

Each candidate is ``NAME=KIND:PATH[,key=value...]``; the kinds and the options each takes
(an option a kind does not take is refused before anything runs):

{kinds}

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
import logging
import os
from pathlib import Path

from tangquant import engines, files, host, recipe
from tangquant.errors import BenchError, TangquantError
from tangquant.load import context_length
from tangquant.measure.candidate import Candidate, Resolved, parse_candidate, resolve
from tangquant.measure.report import add_ratios, append_jsonl, markdown_table
from tangquant.measure.report import plot as draw
from tangquant.measure.runner import DEFAULT_BASELINE_PYTHON, MARKER, environment, sweep  # noqa: F401 (MARKER: bench.MARKER)
from tangquant.recipe import param, require

__doc__ = __doc__.replace("{kinds}", engines.describe() + f"\n  {'deploy':<16} a deployment directory "
                          "(tangquant tune --apply): its chosen engine, model and options")
logger = logging.getLogger(__name__)

HELP = "tokens/s side by side (pp/tg, llama-bench style) against the bandwidth roofline"
KINDS = tuple(engines.ENGINES)
PLOT_SUFFIXES = (".png", ".svg", ".pdf")


@dataclasses.dataclass(frozen=True)
class BenchRecipe:
    candidates: tuple[str, ...] = param((), f"a model to measure, NAME=KIND:PATH[,key=value…] "
                                        f"(repeatable); KIND is one of {', '.join(engines.ENGINES)}, or deploy",
                                        flag="--candidate", repeat=True, metavar="NAME=KIND:PATH[,k=v]")
    prompt_tokens: int = param(512, "prefill length", short="-p")
    gen_tokens: int = param(128, "decoded tokens", short="-n")
    repetitions: int = param(5, "timed repetitions", short="-r")
    rounds: int = param(1, "run the candidates in turn this many times, each a fresh process with -r "
                        "repetitions, and pool the runs: a drifting host's speed falls on all alike")
    threads: tuple[int, ...] = param((), "thread count, or a comma list to sweep (default: the "
                                     "physical cores, as tune and llama-bench count them)", short="-t")
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


def _resolve_all(parsed: list[Candidate], rec: BenchRecipe) -> dict[str, Resolved]:
    """Each candidate's model checked once; a run past its context refused before any measurement
    (a bad path instead fails that candidate alone, in the sweep)."""
    resolved = {}
    for c in parsed:
        try:
            resolved[c.name] = resolve(c)
        except TangquantError:
            continue
        context = context_length(resolved[c.name].config)
        if context is not None and rec.prompt_tokens + rec.gen_tokens > context:
            raise BenchError(f"candidate {c.name}: -p {rec.prompt_tokens} + -n {rec.gen_tokens} tokens run "
                             f"past the model's context of {context}")
    return resolved


def bench(candidates=(), params: BenchRecipe | str | Path | None = None, plot: str | None = None,
          results_dir: str = files.RESULTS, force: bool = False, **overrides) -> dict:
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
    thread_list = [int(t) for t in (rec.threads or (host.physical_cores(),))]
    out = Path(results_dir)
    jsonl = out if out.suffix == ".jsonl" else out / "bench.jsonl"
    inputs = [c.path for c in parsed] + [c.options.get(k) for c in parsed for k in ("adapter", "draft")]
    files.check_output_file(jsonl, inputs, force, append=True)  # before any run: never an input
    if plot:
        if Path(plot).suffix.lower() not in PLOT_SUFFIXES:
            raise BenchError(f"--plot {plot}: the file name must end in {', '.join(PLOT_SUFFIXES)}")
        files.check_output_file(plot, inputs + [jsonl], force)
    resolved = _resolve_all(parsed, rec)
    env = environment({"prompt_tokens": rec.prompt_tokens, "gen_tokens": rec.gen_tokens,
                       "repetitions": rec.repetitions, "rounds": rec.rounds, "warmup": rec.warmup})
    partial = jsonl.with_name(f"{jsonl.name}.{env['date'][:19].replace(':', '')}.partial")
    append_jsonl(partial, [{"partial_of": str(jsonl), **env}])
    logger.info("each round goes to %s until the records are appended to %s", partial, jsonl)
    try:
        rows = sweep(parsed, thread_list, rec, partial, resolved)
    except BaseException:
        _drop_if_unmeasured(partial)
        raise
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


def _drop_if_unmeasured(partial: Path) -> None:
    """A run that fails or is stopped before its first round keeps no ``.partial`` (only its
    header would be in it); one with measured rounds keeps them machine-readable."""
    try:
        with open(partial, encoding="utf-8") as f:
            measured = sum(1 for _ in f) > 1
    except OSError:
        return
    if not measured:
        partial.unlink(missing_ok=True)


def add_arguments(parser) -> None:
    parser.add_argument("--plot", metavar="FILE.png", help="also draw the results")
    parser.add_argument("--results", default=files.RESULTS, metavar="DIR|FILE.jsonl",
                        help="where the JSONL records are appended: DIR/bench.jsonl (default: "
                        f"./{files.RESULTS}/bench.jsonl, in the current directory)")
    parser.add_argument("--force", action="store_true", help="replace an existing --plot file")


def run(args) -> dict:
    return bench(params=recipe.from_args(BenchRecipe, args), plot=args.plot, results_dir=args.results,
                 force=args.force)
