"""Find the fastest OpenVINO runtime settings that keep the output faithful, on this machine.

Sweeps a documented grid (docs/commands.md#tune): KV-cache precision (f16, u8, and
key/value separately down to u4), DYNAMIC_QUANTIZATION_GROUP_SIZE (0, 32, 64, 128),
INFERENCE_PRECISION_HINT (f32, bf16 where the CPU has it), ATTENTION_BACKEND (PA, SDPA),
INFERENCE_NUM_THREADS near the core count, and the paged-attention scheduler (prefix
caching, a fixed cache). Each candidate runs as a `tangquant bench` candidate (own
process, warm-up, repetitions, median) and through a fidelity gate against exact mode
(f32, no dynamic quantization, f32 KV cache) on held-out prompts: greedy tokens
identical for --fidelity-steps steps, or mean KLD per token under --kld-bound. A
setting that fails the gate is reported and rejected; one that decodes faster but
prefills slower than --min-prefill-ratio of the defaults is not kept. The search
is coordinate-wise and stops at --budget.

--apply writes the winner's plugin settings into the IR's rt_info/runtime_options
(OpenVINO's core applies the KV-cache and dynamic-quantization ones for every runtime;
`tangquant serve` and `ovms-repo` pass all of them), atomically,
and records the run in the IR's tangquant.json; threads and openvino-genai-only options
(attention backend, scheduler) cannot live there and are printed to pass yourself.

Example:
  tangquant tune --model out/poet-ov -t 16 --budget 10m --apply
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
from pathlib import Path

from tqdm import tqdm

from tangquant import engines, files, host, load, recipe
from tangquant.errors import OutputExistsError
from tangquant.measure.report import append_jsonl
from tangquant.measure.runner import environment
from tangquant.measure.search import Search, setting, table
from tangquant.ov import runtime
from tangquant.ov.options import AXES, split_winner
from tangquant.ov.runtime import APPLIED_BY_CORE
from tangquant.recipe import param, require

logger = logging.getLogger(__name__)

HELP = "find the fastest faithful OpenVINO runtime settings on this machine (and --apply them)"
PROMPTS = "assets/demo/prompts.json"


def budget_seconds(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    require(match is not None, f"--budget takes a duration like 300s, 5m or 1h, not {text!r}")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


@dataclasses.dataclass(frozen=True)
class TuneParams:
    threads: int | None = param(None, "threads of the baseline (default: the physical cores)",
                                short="-t")
    budget: str = param("5m", "wall-clock budget of the search (300s, 5m, 1h)")
    axes: tuple[str, ...] = param(AXES, f"grid axes to sweep, in order (of {', '.join(AXES)})")
    prompt_tokens: int = param(128, "prefill length of each speed run", short="-p")
    gen_tokens: int = param(64, "decoded tokens of each speed run", short="-n")
    repetitions: int = param(3, "timed repetitions per candidate (the median counts)", short="-r")
    warmup: int = param(1, "uncounted warm-up runs per candidate")
    fidelity_prompts: int = param(3, "held-out demo prompts the gate decodes")
    fidelity_steps: int = param(16, "greedy steps the gate compares")
    kld_bound: float = param(1e-3, "mean KL(exact || candidate) per token a candidate whose "
                             "greedy tokens differ may still have")
    min_prefill_ratio: float = param(0.9, "a faster-decoding candidate is kept only if its "
                                     "prefill is at least this fraction of the defaults' "
                                     "(0 accepts any prefill)")
    confirm: int = param(2, "rounds of the defaults and the winner measured again alternately; "
                         "the winner is applied only if it holds there")
    timeout_s: int = param(1800, "limit per worker run, in seconds")

    def __post_init__(self):
        require(self.threads is None or self.threads >= 1, f"-t must be positive, got {self.threads}")
        require(all(a in AXES for a in self.axes) and len(set(self.axes)) == len(self.axes),
                f"--axes takes distinct names from {', '.join(AXES)}, got {','.join(self.axes)}")
        require(min(self.prompt_tokens, self.gen_tokens, self.repetitions, self.fidelity_prompts,
                    self.fidelity_steps) >= 1 and self.warmup >= 0,
                "-p, -n, -r, --fidelity-prompts and --fidelity-steps must be at least 1")
        require(self.kld_bound >= 0 and self.timeout_s > 0 and self.confirm >= 0,
                "--kld-bound >= 0, --confirm >= 0, --timeout-s > 0")
        require(0 <= self.min_prefill_ratio <= 1,
                f"--min-prefill-ratio takes 0..1, got {self.min_prefill_ratio}")
        budget_seconds(self.budget)

    @property
    def budget_s(self) -> float:
        return budget_seconds(self.budget)


PARAMS = TuneParams


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="OpenVINO IR directory (tangquant export)")
    parser.add_argument("--apply", action="store_true",
                        help="write the winner into the IR's runtime_options and manifest")
    parser.add_argument("--results", default=files.RESULTS, metavar="DIR|FILE.jsonl",
                        help="where the candidates' records are appended: DIR/tune.jsonl (default: "
                        f"./{files.RESULTS}/tune.jsonl, in the current directory)")
    parser.add_argument("--force", action="store_true",
                        help="--apply over runtime options an earlier tune applied")


def run(args) -> dict:
    return tune(args.model, recipe.from_args(TuneParams, args), apply=args.apply,
                results=args.results, force=args.force)


def tune(model, params: TuneParams | None = None, apply: bool = False,
         results: str = files.RESULTS, force: bool = False, **overrides) -> dict:
    """Search the grid for ``model`` (an IR directory); returns ``rows``, ``winner``, the table."""
    p = recipe.resolve(TuneParams, params, overrides)
    if p.threads is None:
        p = dataclasses.replace(p, threads=host.physical_cores())
    md = load.inspect(model, kinds=("ir",))
    before = runtime.read(md.path)
    manifest = files.read_manifest(md.path) or {}
    if apply and manifest.get("tune") and not force:
        raise OutputExistsError(f"{md.path}: an earlier `tangquant tune --apply` set its runtime "
                                f"options ({setting(before)}); pass --force to replace them")
    out = Path(results)
    jsonl = files.check_output_file(out if out.suffix == ".jsonl" else out / "tune.jsonl",
                                    [md.path], force=False, append=True)
    engine = engines.get("ov")
    axes = engines.entry(engine.tune_grid)(p.axes, p.threads, host.cpu_flags(), os.cpu_count() or p.threads)
    total = 1 + sum(len(a.values) - 1 for a in axes)
    bar = tqdm(total=total, desc="tune", unit="candidate", file=sys.stderr)
    search = None
    try:
        search = Search(md.path, p, _held_out(p.fidelity_prompts), bar)
        env = environment({"prompt_tokens": p.prompt_tokens, "gen_tokens": p.gen_tokens,
                           "repetitions": p.repetitions, "warmup": p.warmup})
        winner = search.run(axes)
    finally:
        bar.close()
        if search is not None:
            search.close()
    env["loadavg_end"] = list(os.getloadavg())
    rows, conf = search.rows, search.confirmation
    append_jsonl(jsonl, [{**env, "tool": "tune", "model": str(md.path), "runtime_options_before":
                          before, **r} for r in rows]
                 + ([{**env, "tool": "tune", "model": str(md.path), "axis": "confirmation", **conf}]
                    if conf else []))
    in_ir, caller = split_winner(winner["options"])
    applied = {**before, **in_ir}
    if apply:
        runtime.write(md.path, applied)
        _record(md.path, manifest, p, winner, before, applied, caller, str(jsonl), conf)
    confirmed = "" if conf is None else (
        f"\nconfirmation, side by side ({p.confirm} rounds): {conf['setting']} decodes "
        f"{conf['ratio']:.2f}× the IR's defaults (median tg)")
    report = table(rows) + confirmed + "\n\n" + _advice(winner, in_ir, caller, apply, md.path)
    gain = (f"{conf['ratio']:.2f}× the defaults' decode side by side" if conf else
            "no candidate beat the defaults" if not winner["options"] else "unconfirmed (--confirm 0)")
    summary = f"tune: winner {winner['setting']}: {gain}; {len(rows)} candidates; records in {jsonl}"
    return {"rows": rows, "winner": winner, "runtime_options": applied if apply else before,
            "caller_options": caller, "report": report, "summary": summary}


def _held_out(n: int) -> list[str]:
    data = files.read_json(Path(__file__).parent / PROMPTS, "held-out prompts")
    return [p["prompt"] for p in data["prompts"][:n]]


def _advice(winner: dict, in_ir: dict, caller: dict, apply: bool, path: Path) -> str:
    lines = []
    if in_ir:
        verb = "written into" if apply else "for (rerun with --apply)"
        lines.append(f"runtime_options {verb} {path}: {setting(in_ir)}")
    ignored = sorted(set(in_ir) - set(APPLIED_BY_CORE))
    if ignored:
        lines.append(f"OpenVINO's core does not apply {', '.join(ignored)} from runtime_options "
                     "(tangquant serve and ovms-repo do): pass them to a plain LLMPipeline too")
    if caller:
        lines.append(f"not storable in the IR, pass them yourself: {setting(caller)}")
    return "\n".join(lines) or "the IR's defaults won: nothing to apply"


def _record(path: Path, manifest: dict, p: TuneParams, winner: dict, before: dict, applied: dict,
            caller: dict, jsonl: str, confirmation: dict | None) -> None:
    """The tune record in the IR's manifest, written atomically (temp file, then rename)."""
    manifest = dict(manifest)
    manifest["tune"] = {
        "parameters": dataclasses.asdict(p), "winner": winner["setting"],
        "tg_tps": winner["tg_tps"], "pp_tps": winner["pp_tps"], "fidelity": winner.get("fidelity"),
        "confirmation": confirmation,
        "runtime_options_before": before, "runtime_options": applied, "caller_options": caller,
        "host": host.summary(),
        "records": jsonl}
    with files.atomic_output_file(Path(path) / files.MANIFEST, force=True) as tmp:
        files.write_json(tmp, manifest)
