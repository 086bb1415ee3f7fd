"""Find the fastest faithful engine and runtime settings for the model, on this machine.

Measures the IR in OpenVINO and, with --gguf, the GGUF of the same integers in llama.cpp, each
over its own grid (docs/commands.md#tune). OpenVINO: KV-cache precision, dynamic quantization
group size, inference precision, attention backend, threads, the paged-attention scheduler.
llama.cpp: weight repacking, flash attention, -ctk/-ctv KV-cache types, threads. Each
candidate runs as a `tangquant bench` candidate (own process, warm-up, repetitions, median) and
through a fidelity gate against the IR's exact mode (f32, no dynamic quantization, f32 KV cache)
on held-out prompts: greedy tokens identical for --fidelity-steps steps, or mean KLD per token
under --kld-bound. A setting that fails the gate is rejected; one that decodes faster but
prefills slower than --min-prefill-ratio of that engine's defaults is not kept. The search is
coordinate-wise and stops at --budget. With two engines, each one's best then runs side by side
on every --workloads shape (prefill-heavy pp512+tg128, short-in long-out pp32+tg256), and the
faster faithful engine wins each.

--apply writes OpenVINO's best plugin settings into the IR's rt_info/runtime_options (OpenVINO's
core applies the KV-cache and dynamic-quantization ones for every runtime; `tangquant serve` and
`ovms-repo` pass all of them), atomically, and records the run in the IR's tangquant.json; with
--gguf (or --deploy DIR) it also writes tangquant.deploy.json — each workload's engine, model
file and settings — beside the models, which `chat`, `serve` and `bench` run when given its
directory.

Example:
  tangquant tune --model out/poet/ir --gguf out/poet/gguf -t 16 --budget 20m --apply
  tangquant serve --model out/poet
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import sys
from pathlib import Path

from tqdm import tqdm

from tangquant import claim, deploy, engines, files, host, load, recipe
from tangquant.errors import InputError, OutputExistsError
from tangquant.gguf.options import AXES as LLAMA_AXES
from tangquant.gguf.options import DEFAULTS as LLAMA_DEFAULTS
from tangquant.measure import finals
from tangquant.measure.report import append_jsonl
from tangquant.measure.runner import environment
from tangquant.measure.search import Measure, Search, Side, engine_options, setting, table
from tangquant.ov import runtime
from tangquant.ov.options import AXES as OV_AXES
from tangquant.ov.options import split_winner
from tangquant.ov.runtime import APPLIED_BY_CORE
from tangquant.recipe import param, require

logger = logging.getLogger(__name__)

HELP = "find the fastest faithful engine and runtime settings on this machine (and --apply them)"
PROMPTS = "assets/demo/prompts.json"
AXES = tuple(dict.fromkeys(OV_AXES + LLAMA_AXES))


def budget_seconds(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    require(match is not None, f"--budget takes a duration like 300s, 5m or 1h, not {text!r}")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


@dataclasses.dataclass(frozen=True)
class TuneParams:
    threads: int | None = param(None, "threads of the baseline (default: the physical cores)",
                                short="-t")
    budget: str = param("5m", "wall-clock budget of the search (300s, 5m, 1h)")
    axes: tuple[str, ...] = param(AXES, f"grid axes to sweep, in order (of {', '.join(AXES)}; "
                                  "each engine sweeps those it has)")
    prompt_tokens: int = param(128, "prefill length of each speed run", short="-p")
    gen_tokens: int = param(64, "decoded tokens of each speed run", short="-n")
    repetitions: int = param(3, "timed repetitions per candidate (the median counts)", short="-r")
    warmup: int = param(1, "uncounted warm-up runs per candidate")
    fidelity_prompts: int = param(3, "held-out demo prompts the gate decodes")
    fidelity_steps: int = param(16, "greedy steps the gate compares")
    kld_bound: float = param(1e-3, "mean KL(exact || candidate) per token a candidate whose "
                             "greedy tokens differ may still have")
    min_prefill_ratio: float = param(0.9, "a faster-decoding candidate is kept only if its "
                                     "prefill is at least this fraction of its engine's "
                                     "defaults' (0 accepts any prefill)")
    confirm: int = param(2, "rounds of the defaults and the winner measured again alternately "
                         "(the winner is applied only if it holds there), and of the engines "
                         "side by side on each workload")
    workloads: tuple[str, ...] = param(("512+128", "32+256"), "PROMPT+GEN request shapes the "
                                       "engines' best settings race on (with --gguf)")
    deploy_for: str = param("32+256", "the workload whose winner the deployment runs in chat, "
                            "serve and bench (one of --workloads)")
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
        names = [finals.Workload.parse(w).name for w in self.workloads]
        require(bool(names) and len(set(names)) == len(names), "--workloads must be distinct")
        require(finals.Workload.parse(self.deploy_for).name in names,
                f"--deploy-for must be one of --workloads ({', '.join(names)})")
        budget_seconds(self.budget)

    @property
    def budget_s(self) -> float:
        return budget_seconds(self.budget)


PARAMS = TuneParams


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="OpenVINO IR directory (tangquant export)")
    parser.add_argument("--gguf", help="the GGUF of the same checkpoint (tangquant export --format "
                        "gguf): race llama.cpp against OpenVINO")
    parser.add_argument("--apply", action="store_true",
                        help="write OpenVINO's best into the IR, and the deployment file")
    parser.add_argument("--deploy", metavar="DIR", help="where --apply writes tangquant.deploy.json "
                        "(default with --gguf: the directory holding the IR)")
    parser.add_argument("--results", default=files.RESULTS, metavar="DIR|FILE.jsonl",
                        help="where the candidates' records are appended: DIR/tune.jsonl (default: "
                        f"./{files.RESULTS}/tune.jsonl, in the current directory)")
    parser.add_argument("--force", action="store_true",
                        help="--apply over runtime options or a deployment an earlier tune wrote")


def run(args) -> dict:
    return tune(args.model, recipe.from_args(TuneParams, args), apply=args.apply,
                results=args.results, force=args.force, gguf=args.gguf, deploy_dir=args.deploy)


def _claimed_for_apply(tune_fn):
    """``--apply``: the IR is claimed for the whole run, as every output is (``claim.claim``: a
    second tune or an export to it is refused), and its directory must be writable before the
    search starts, not after it (issue 30)."""
    @functools.wraps(tune_fn)
    def run_claimed(model, params=None, apply: bool = False, *args, **kwargs):
        if not apply:
            return tune_fn(model, params, apply, *args, **kwargs)
        md = load.inspect(model, kinds=("ir",))
        files.check_writable(md.path)  # the claim's lock lies beside the IR
        files.check_writable(md.path / runtime.MODEL_XML)  # the XML and manifest are replaced
        with claim.claim(md.path):
            return tune_fn(md, params, apply, *args, **kwargs)
    return run_claimed


@_claimed_for_apply
def tune(model, params: TuneParams | None = None, apply: bool = False,
         results: str = files.RESULTS, force: bool = False, gguf=None, deploy_dir=None,
         measure=None, **overrides) -> dict:
    """Search each engine's grid for ``model`` (an IR) and ``gguf``; returns ``rows``, ``winner``
    (OpenVINO's best), ``bests`` (each engine's), ``finals`` (each workload's race), the report.
    ``measure``: what runs the measurements (a :class:`Measure`, by default)."""
    p = recipe.resolve(TuneParams, params, overrides)
    if p.threads is None:
        p = dataclasses.replace(p, threads=host.physical_cores())
    md = load.inspect(model, kinds=("ir",))
    gg = _same_integers(md, load.inspect(gguf, kinds=("gguf",))) if gguf else None
    target = Path(deploy_dir) if deploy_dir else (md.path.parent if gg else None)
    before = runtime.read(md.path)
    manifest = files.read_manifest(md.path) or {}
    if apply:
        _check_apply(force, md.path, manifest, before, target, given=deploy_dir is not None)
    out = Path(results)
    jsonl = files.check_output_file(out if out.suffix == ".jsonl" else out / "tune.jsonl",
                                    [md.path] + ([gg.path] if gg else []), force=False, append=True)
    env = environment({"prompt_tokens": p.prompt_tokens, "gen_tokens": p.gen_tokens,
                       "repetitions": p.repetitions, "warmup": p.warmup, "workloads": list(p.workloads)})
    own = measure is None
    measure = Measure(p) if own else measure
    try:
        sides, bests, rows, confirmations, races = _search(md, gg, p, measure)
    finally:
        if own:
            measure.close()
    env["loadavg_end"] = list(os.getloadavg())
    record = {**env, "tool": "tune", "model": str(md.path), "gguf": str(gg.path) if gg else None}
    append_jsonl(jsonl, [{**record, "runtime_options_before": before, **r} for r in rows]
                 + [{**record, "axis": "confirmation", **c} for c in confirmations]
                 + [{**record, "axis": "workload", **res, "workload": w} for w, res in races.items()])
    winner = bests["ov"]
    in_ir, caller = split_winner(winner["options"])
    applied = {**before, **in_ir}
    plan = _deployment(target, p, sides, bests, races, str(jsonl)) if apply and target is not None else None
    written = _apply(md.path, manifest, p, winner, before, applied, caller, str(jsonl), confirmations,
                     target, plan) if apply else None
    report = _report(p, rows, confirmations, races, in_ir, caller, apply, md.path, written)
    return {"rows": rows, "winner": winner, "bests": bests, "finals": races, "deployment": plan,
            "runtime_options": applied if apply else before, "caller_options": caller,
            "report": report, "summary": _summary(rows, confirmations, races, winner, jsonl, written)}


def _same_integers(ir: load.ModelDir, gg: load.ModelDir) -> load.ModelDir:
    """The GGUF must hold the IR's integers: both exports name the same checkpoint."""
    sources = [((files.read_manifest(d) or {}).get("inputs") or {}).get("model")
               for d in (ir.path, gg.path.parent)]
    if all(sources) and Path(sources[0]).resolve() != Path(sources[1]).resolve():
        raise InputError(f"{gg.path} was exported from {sources[1]}, the IR from {sources[0]}: tune "
                         "races the same integers in both engines; export both from one checkpoint")
    if not sources[1]:
        logger.warning("warning: %s has no tangquant export manifest beside it; the gate still checks "
                       "it against the IR's exact mode", gg.path)
    return gg


def _search(md, gg, p: TuneParams, measure):
    """Each engine's coordinate search, then (two engines) the race on each workload."""
    kinds = ("ov", "llamacpp") if gg else ("ov",)
    grids = {k: engines.entry(engines.get(k).tune_grid)(p.axes, p.threads, host.cpu_flags(),
                                                        os.cpu_count() or p.threads) for k in kinds}
    workloads = [finals.Workload.parse(w) for w in p.workloads] if gg else []
    total = sum(1 + sum(len(a.values) - 1 for a in axes) for axes in grids.values())
    bar = tqdm(total=total + len(workloads) * len(kinds) * max(1, p.confirm), desc="tune",
               unit="run", file=sys.stderr)
    rows, bests, confirmations = [], {}, []
    try:
        bar.set_postfix_str("fidelity reference (exact mode)")
        prompts, ov_defaults = measure.reference(md.path, _held_out(p.fidelity_prompts))
        sides = {"ov": Side("ov", md.path, {**ov_defaults, **runtime.read(md.path)})}
        if gg:
            sides["llamacpp"] = Side("llamacpp", gg.path, LLAMA_DEFAULTS)
        for kind, side in sides.items():
            search = Search(side, p, measure, prompts, bar, rows)
            bests[kind] = search.run(grids[kind])
            confirmations += [search.confirmation] if search.confirmation else []
        races = finals.compare(measure, sides, bests, workloads, p.confirm, bar) if gg else {}
    finally:
        bar.close()
    return sides, bests, rows, confirmations, races


def _held_out(n: int) -> list[str]:
    data = files.read_json(Path(__file__).parent / PROMPTS, "held-out prompts")
    return [p["prompt"] for p in data["prompts"][:n]]


def _check_apply(force: bool, ir: Path, manifest: dict, before: dict, target, given: bool) -> None:
    """Refuse, before anything is measured, an --apply that would replace an earlier one, or
    write a deployment into a model directory."""
    if target is not None:
        deploy.check_directory(target, given)
    if force:
        return
    if manifest.get("tune"):
        raise OutputExistsError(f"{ir}: an earlier `tangquant tune --apply` set its runtime "
                                f"options ({setting(before)}); pass --force to replace them")
    if target is not None and deploy.find(target):
        raise OutputExistsError(f"{Path(target) / deploy.FILE} exists; pass --force to replace it")


def _apply(ir: Path, manifest: dict, p: TuneParams, winner: dict, before: dict, applied: dict,
           caller: dict, jsonl: str, confirmations: list, target, plan: dict | None) -> Path | None:
    """Everything --apply writes: OpenVINO's best into the IR (its runtime options, the manifest's
    tune record) and, with a target, the deployment file. Each write is atomic."""
    runtime.write(ir, applied)
    manifest = dict(manifest)
    manifest["tune"] = {
        "parameters": dataclasses.asdict(p), "winner": winner["setting"],
        "tg_tps": winner["tg_tps"], "pp_tps": winner["pp_tps"], "fidelity": winner.get("fidelity"),
        "confirmation": next((c for c in confirmations if c["engine"] == "ov"), None),
        "runtime_options_before": before, "runtime_options": applied, "caller_options": caller,
        "host": host.summary(), "records": jsonl}
    with files.atomic_output_file(Path(ir) / files.MANIFEST, force=True) as tmp:
        files.write_json(tmp, manifest)
    return deploy.write(target, plan, force=True) if target is not None else None


def _deployment(target: Path, p: TuneParams, sides: dict, bests: dict, races: dict, jsonl: str) -> dict:
    """The deployment file's content: each workload's winner (with one engine, its best)."""
    workloads = {}
    for w in p.workloads:
        name = finals.Workload.parse(w).name
        kind = races[name]["winner"] if name in races else "ov"
        if kind is None:  # no engine passed the gate: the IR's defaults, as a plain IR runs
            continue
        best = bests[kind]
        fig = next((r for r in races.get(name, {}).get("rows", []) if r["engine"] == kind), {})
        workloads[name] = deploy.entry(target, kind, sides[kind].path, engine_options(best["options"]),
                                       int(best["threads"]), setting=best["setting"],
                                       fidelity=best.get("fidelity"),
                                       **{k: fig[k] for k in ("request_s", "pp_tps", "tg_tps") if k in fig})
    use = finals.Workload.parse(p.deploy_for).name
    if use not in workloads:
        raise InputError(f"no engine passed the fidelity gate on {use}: nothing to deploy")
    return {"use": use, "workloads": workloads, "host": host.summary(), "records": jsonl,
            "made_by": "tangquant tune"}


def _report(p, rows, confirmations, races, in_ir, caller, apply, ir, written) -> str:
    parts = [table(rows)]
    for c in confirmations:
        parts.append(f"confirmation, side by side ({p.confirm} rounds): {c['engine']} {c['setting']} "
                     f"decodes {c['ratio']:.2f}× its defaults (median tg)")
    if races:
        parts.append("\n" + finals.table(races))
    parts.append("\n" + _advice(in_ir, caller, apply, ir))
    if written:
        parts.append(f"deployment written to {written}: chat, serve and bench run its "
                     f"{finals.Workload.parse(p.deploy_for).name} winner")
    return "\n".join(parts)


def _summary(rows, confirmations, races, winner, jsonl, written) -> str:
    ov = next((c for c in confirmations if c["engine"] == "ov"), None)
    gain = (f"{ov['ratio']:.2f}× the defaults' decode side by side" if ov else
            "no candidate beat the defaults" if not winner["options"] else "unconfirmed (--confirm 0)")
    text = f"tune: OpenVINO winner {winner['setting']}: {gain}"
    for name, res in races.items():
        text += f"; {name}: {res['winner'] or 'no faithful engine'}"
    return text + f"; {len(rows)} candidates; records in {jsonl}" + (f"; deployment {written}" if written else "")


def _advice(in_ir: dict, caller: dict, apply: bool, path: Path) -> str:
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
