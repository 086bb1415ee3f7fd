"""Run a pipeline recipe stage by stage: merge → quantize → export → bench.

The recipe is flat YAML (see recipes/qwen1.5-7b-chat-tang.yaml); paths in it are
relative to the working directory. Each stage writes its own directory under
``workdir`` (merged, int4-gptq, int4-openvino, bench). A stage is skipped when
its output exists, its manifest (``tangquant.json``) names that stage, and the
stage's key (its parameters plus a fingerprint of each input: the input's own
manifest, or the names, sizes and times of its files) equals the key recorded
in ``workdir/pipeline.json`` when it was made. An output made from other inputs
is replaced only with ``--force``.

Example:
  tangquant run recipes/qwen1.5-7b-chat-tang.yaml
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tangquant import files
from tangquant.errors import OutputExistsError, RecipeError

logger = logging.getLogger(__name__)

HELP = "run a pipeline recipe (merge → quantize → export → bench), skipping up-to-date stages"
STAGES = ("merge", "quantize", "export", "bench")
STAMPS = "pipeline.json"


@dataclass(frozen=True)
class PipelineRecipe:
    base: str = ""
    adapter: str = ""
    workdir: str = ""
    merge_dtype: str = "auto"
    merge_verify: int = 0
    quant_recipe: str | None = None
    calib: str | None = None
    export_format: str = "openvino"
    export_embeddings: str = "int8"
    bench: bool = True
    bench_baseline: str | None = None
    bench_prompt_tokens: int = 512
    bench_gen_tokens: int = 128
    bench_repetitions: int = 5
    bench_threads: tuple[int, ...] = ()


def fingerprint(path: str | Path | None) -> str | None:
    """A stage output's manifest digest, else a digest of its files' names, sizes and times."""
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        return files.sha256_file(p)
    if not p.is_dir():
        return None
    if (p / files.MANIFEST).is_file():
        return files.sha256_file(p / files.MANIFEST)
    h = hashlib.sha256()
    for f in sorted(p.rglob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def stage_key(stage: str, params: dict, inputs: dict) -> str:
    blob = json.dumps({"stage": stage, "params": params,
                       "inputs": {k: fingerprint(v) for k, v in inputs.items()}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _output_file(stage: str, out: Path) -> Path:
    return out / "bench.jsonl" if stage == "bench" else out / files.MANIFEST


def up_to_date(stage: str, out: Path, key: str, stamps: dict) -> bool:
    marker = _output_file(stage, out)
    if not marker.is_file():
        return False
    if stage != "bench":
        manifest = files.read_manifest(out) or {}
        if manifest.get("stage") != stage:
            return False
    stamp = stamps.get(stage) or {}
    return stamp.get("key") == key and stamp.get("output_sha256") == files.sha256_file(marker)


def plan(r: PipelineRecipe) -> list[tuple[str, Path, dict, dict]]:
    """(stage, output, parameters, inputs) for every stage the recipe asks for."""
    import dataclasses

    from tangquant.quantize import resolve_recipe

    work = Path(r.workdir)
    merged, gptq, ir = work / "merged", work / "int4-gptq", work / "int4-openvino"
    qr = dataclasses.asdict(resolve_recipe(r.quant_recipe, calib=r.calib))
    stages = [("merge", merged, {"dtype": r.merge_dtype, "verify": r.merge_verify},
               {"base": r.base, "adapter": r.adapter}),
              ("quantize", gptq, qr, {"model": merged, "calib": r.calib}),
              ("export", ir, {"format": r.export_format, "embeddings": r.export_embeddings}, {"model": gptq})]
    if r.bench:
        params = {"prompt_tokens": r.bench_prompt_tokens, "gen_tokens": r.bench_gen_tokens,
                  "repetitions": r.bench_repetitions, "threads": list(r.bench_threads),
                  "candidates": _candidates(r, ir)}
        stages.append(("bench", work / "bench", params, {"model": ir, "baseline": r.bench_baseline}))
    return stages


def _candidates(r: PipelineRecipe, ir: Path) -> list[str]:
    out = [f"merged-int4=ov:{ir}"]
    if r.bench_baseline:
        out.append(f"seed=torch-gptq+lora:{r.bench_baseline},adapter={r.adapter}")
    return out


def _run_stage(stage: str, out: Path, params: dict, inputs: dict, r: PipelineRecipe, force: bool) -> None:
    if stage == "merge":
        from tangquant.merge import merge

        merge(r.base, r.adapter, out, dtype=r.merge_dtype, verify=r.merge_verify, force=force)
    elif stage == "quantize":
        from tangquant.quantize import quantize

        quantize(inputs["model"], out, recipe=r.quant_recipe, calib=r.calib, force=force)
    elif stage == "export":
        from tangquant.export import export

        export(inputs["model"], out, format=r.export_format, embeddings=r.export_embeddings, force=force)
    else:
        from tangquant.bench import bench

        if out.exists() and force:
            (out / "bench.jsonl").unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        bench(candidates=tuple(params["candidates"]), prompt_tokens=r.bench_prompt_tokens,
              gen_tokens=r.bench_gen_tokens, repetitions=r.bench_repetitions,
              threads=tuple(r.bench_threads), results_dir=str(out))


def load_recipe(path, **overrides) -> PipelineRecipe:
    from tangquant import recipe as recipes

    r = recipes.load(PipelineRecipe, path, overrides)
    missing = [k for k in ("base", "adapter", "workdir") if not getattr(r, k)]
    if missing:
        raise RecipeError(f"{path}: the pipeline recipe needs {', '.join(missing)}")
    return r


def run_pipeline(recipe, force: bool = False, dry_run: bool = False, **overrides) -> dict:
    """Run (or, with ``dry_run``, only plan) every stage; returns {stage: "ran"|"skipped"|"planned"}."""
    r = load_recipe(recipe, **overrides)
    files.existing_dir(r.base, "base model")
    files.existing_dir(r.adapter, "adapter")
    work = Path(r.workdir)
    stamps_path = work / STAMPS
    stamps = files.read_json(stamps_path, "pipeline stamps") if stamps_path.is_file() else {}
    status, t0, stale = {}, time.time(), False
    for stage, out, params, inputs in plan(r):
        key = stage_key(stage, params, inputs)
        # Once a stage is (to be) rebuilt, everything after it is too.
        if not stale and up_to_date(stage, out, key, stamps):
            status[stage] = "skipped"
            logger.info("%s: %s is up to date; skipped", stage, out)
            continue
        stale = True
        if dry_run:
            status[stage] = "planned"
            continue
        if out.exists() and not force:
            raise OutputExistsError(f"{stage}: {out} exists but was not made from these inputs "
                                    "and settings; pass --force to rebuild it")
        logger.info("%s → %s", stage, out)
        _run_stage(stage, out, params, inputs, r, force=out.exists())
        stamps[stage] = {"key": key,
                         "output_sha256": files.sha256_file(_output_file(stage, out)),
                         "made": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        work.mkdir(parents=True, exist_ok=True)
        files.write_json(stamps_path, stamps)
        status[stage] = "ran"
    summary = ", ".join(f"{s} {v}" for s, v in status.items())
    print(f"{work}: {summary} ({time.time() - t0:.0f} s)")
    return status


def add_arguments(parser) -> None:
    parser.add_argument("recipe", metavar="RECIPE", help="pipeline recipe (flat YAML)")
    parser.add_argument("--workdir", help="override the recipe's workdir")
    parser.add_argument("--dry-run", action="store_true", help="only say which stages would run")
    parser.add_argument("--force", action="store_true", help="rebuild stale stage outputs")


def run(args) -> int:
    run_pipeline(args.recipe, force=args.force, dry_run=args.dry_run, workdir=args.workdir)
    return 0

