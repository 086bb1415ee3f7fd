"""Run a pipeline recipe stage by stage: merge → quantize → export → bench.

The recipe is flat YAML (see recipes/qwen1.5-7b-chat-tang.yaml); paths in it are
relative to the working directory. Each stage writes its own directory under
``workdir`` (merged, int4-gptq, int4-openvino, bench). A stage is skipped when
its output exists, its manifest (``tangquant.json``) names that stage, and the
stage's key (its parameters plus a fingerprint of each input: the input's own
manifest, or the names, sizes and times of its files) equals the key recorded
in ``workdir/pipeline.json`` when it was made. An output made from other inputs
is replaced only with ``--force``.

A ``draft:`` section (base, adapter, tokens, quant_recipe) adds a draft model for speculative
decoding: merged (when it has an adapter), quantized and exported under ``workdir/draft`` with
the target's settings, checked to share the target's tokenizer and chat template before any
stage runs, and benched beside the target as ``draft=…,draft_tokens=K``. Its keys are the
recipe keys ``draft_base``, ``draft_adapter``, ``draft_tokens`` and ``draft_quant_recipe``
(flags ``--draft-base`` …, which override the section); any other key in it is refused.

Example:
  tangquant run recipes/qwen1.5-7b-chat-tang.yaml
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import typing
from pathlib import Path

from tangquant import draft, files, recipe
from tangquant.bench import BenchRecipe, bench
from tangquant.errors import OutputExistsError, RecipeError
from tangquant.export import ExportParams, export
from tangquant.merge import MergeParams, merge
from tangquant.quant.recipe import QuantRecipe
from tangquant.quantize import quantize
from tangquant.recipe import param

logger = logging.getLogger(__name__)

HELP = "run a pipeline recipe (merge → quantize → export → bench), skipping up-to-date stages"
STAGES = ("merge", "quantize", "export", "draft-merge", "draft-quantize", "draft-export", "bench")
STAMPS = "pipeline.json"


# Each stage's keys in the pipeline recipe: its own parameters with a prefix, derived from the
# stage's dataclass (so a knob added to a stage is a pipeline key too). Quantization keys default
# to None: unset, they come from quant_recipe.
PREFIXED = (("merge_", MergeParams, False), ("quant_", QuantRecipe, True),
            ("export_", ExportParams, False), ("bench_", BenchRecipe, False))
_OWN = [("base", str, param("", "full-precision base model directory")),
        ("adapter", str, param("", "the LoRA adapter directory")),
        ("workdir", str, param("", "where the stages write merged/, int4-gptq/, int4-openvino/, bench/")),
        ("quant_recipe", str | None, param(None, "the quantization recipe file (quant_* keys override it)")),
        ("bench", bool, param(True, "run the bench stage")),
        ("bench_baseline", str | None, param(None, "the seed's GPTQ base, benched with the adapter "
                                                   "un-merged (torch-gptq+lora)")),
        # The draft: section's keys (see the module's docstring).
        ("draft_base", str | None, param(None, "draft: the draft model's full-precision base (same "
                                               "tokenizer and chat template as base)")),
        ("draft_adapter", str | None, param(None, "draft: its LoRA adapter (none: the base as it is)")),
        ("draft_tokens", int, param(draft.DEFAULT_TOKENS, "draft: tokens it proposes per step in the "
                                                          "bench")),
        ("draft_quant_recipe", str | None, param(None, "draft: its quantization recipe (default "
                                                       "quant_recipe; quant_* keys apply too)"))]
DRAFT_SECTION = ("base", "adapter", "tokens", "quant_recipe")


def _prefixed_fields():
    out = []
    for prefix, cls, unset in PREFIXED:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if prefix == "bench_" and f.name == "candidates":
                continue  # the pipeline names its own candidates
            kind = hints[f.name] | None if unset else hints[f.name]
            meta = dict(f.metadata)
            field = param(None if unset else f.default, f"{prefix[:-1]}: {meta.get('help', '')}")
            out.append((prefix + f.name, kind, field))
    return out


PipelineRecipe = dataclasses.make_dataclass("PipelineRecipe", _OWN + _prefixed_fields(), frozen=True)
PARAMS = PipelineRecipe
RECIPE_FLAG = False  # the recipe is the positional argument


def stage_params(r, prefix: str, cls, quant_recipe=None):
    """The stage's dataclass from the recipe's ``prefix`` keys (validated by the stage itself)."""
    values = {f.name: getattr(r, prefix + f.name) for f in dataclasses.fields(cls)
              if hasattr(r, prefix + f.name)}
    if cls is QuantRecipe:
        return recipe.resolve(QuantRecipe, quant_recipe or r.quant_recipe, values)
    return cls(**values)


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
        if manifest.get("stage") != stage.removeprefix("draft-"):
            return False
    stamp = stamps.get(stage) or {}
    return stamp.get("key") == key and stamp.get("output_sha256") == files.sha256_file(marker)


def plan(r) -> list[tuple[str, Path, object, dict]]:
    """(stage, output, parameters, inputs) for every stage the recipe asks for."""
    work = Path(r.workdir)
    merged, gptq, ir = work / "merged", work / "int4-gptq", work / "int4-openvino"
    quant = stage_params(r, "quant_", QuantRecipe)
    stages = [("merge", merged, stage_params(r, "merge_", MergeParams), {"base": r.base, "adapter": r.adapter}),
              ("quantize", gptq, quant, {"model": merged, "calib": quant.calib}),
              ("export", ir, stage_params(r, "export_", ExportParams), {"model": gptq})]
    stages += _draft_stages(r, work / "draft")
    if r.bench:
        bench_params = dataclasses.replace(stage_params(r, "bench_", BenchRecipe),
                                           candidates=tuple(_candidates(r, ir)))
        inputs = {"model": ir, "baseline": r.bench_baseline}
        if r.draft_base:
            inputs["draft"] = work / "draft" / "int4-openvino"
        stages.append(("bench", work / "bench", bench_params, inputs))
    return stages


def _draft_stages(r, root: Path) -> list:
    """The draft's merge (when it has an adapter), quantize and export, with the target's settings."""
    if not r.draft_base:
        return []
    quant = stage_params(r, "quant_", QuantRecipe, r.draft_quant_recipe)
    model = root / "merged" if r.draft_adapter else Path(r.draft_base)
    merge = [("draft-merge", model, stage_params(r, "merge_", MergeParams),
              {"base": r.draft_base, "adapter": r.draft_adapter})] if r.draft_adapter else []
    return merge + [("draft-quantize", root / "int4-gptq", quant, {"model": model, "calib": quant.calib}),
                    ("draft-export", root / "int4-openvino", stage_params(r, "export_", ExportParams),
                     {"model": root / "int4-gptq"})]


def _candidates(r, ir: Path) -> list[str]:
    out = [f"merged-int4=ov:{ir}"]
    if r.draft_base:
        draft_ir = Path(r.workdir) / "draft" / "int4-openvino"
        out.append(f"merged-int4+draft=ov:{ir},draft={draft_ir},draft_tokens={r.draft_tokens}")
    if r.bench_baseline:
        out.append(f"seed=torch-gptq+lora:{r.bench_baseline},adapter={r.adapter}")
    return out


def _run_stage(stage: str, out: Path, params, inputs: dict, r, force: bool) -> dict:
    kind = stage.removeprefix("draft-")  # the draft's stages are the target's, on its inputs
    if kind == "merge":
        return merge(inputs["base"], inputs["adapter"], out, params, force=force)
    if kind == "quantize":
        return quantize(inputs["model"], out, params, force=force)
    if kind == "export":
        return export(inputs["model"], out, params, force=force)
    if out.exists() and force:
        (out / "bench.jsonl").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return bench(params=params, results_dir=str(out))


# Keys of a LLaMA-Factory recipe (its export/merge YAML), which users hand to `run` by mistake.
LLAMAFACTORY_KEYS = ("model_name_or_path", "adapter_name_or_path", "export_dir", "finetuning_type",
                     "template", "stage")


def refuse_llamafactory(data: dict, path) -> None:
    """A LLaMA-Factory recipe gets what to run instead, with its own paths."""
    found = [k for k in LLAMAFACTORY_KEYS if k in data]
    if not found:
        return
    base = data.get("model_name_or_path", "BASE")
    adapter = data.get("adapter_name_or_path", "ADAPTER")
    out = data.get("export_dir", "MERGED")
    raise RecipeError(f"{path} is a LLaMA-Factory recipe ({', '.join(found)}), not a tangquant "
                      f"pipeline recipe; fold the adapter with `tangquant merge --model {base} "
                      f"--adapter {adapter} --output {out}`, or run the whole pipeline from a recipe "
                      f"with base: {base}, adapter: {adapter}, workdir: DIR "
                      "(recipes/qwen1.5-7b-chat-tang.yaml is one)")


def read_recipe(path) -> dict:
    """The recipe's keys, its ``draft:`` section flattened to ``draft_*`` keys (others refused)."""
    data = recipe.read_yaml(Path(path))
    section = data.pop("draft", None)
    if section is None:
        return data
    if not isinstance(section, dict):
        raise RecipeError(f"{path}: 'draft' must be a mapping with keys {', '.join(DRAFT_SECTION)}")
    unknown = sorted(str(k) for k in section if k not in DRAFT_SECTION)
    if unknown:
        raise RecipeError(f"{path}: unknown key(s) draft.{', draft.'.join(unknown)[:200]}; the draft "
                          f"section takes {', '.join(DRAFT_SECTION)}")
    for key, value in section.items():
        if f"draft_{key}" in data:
            raise RecipeError(f"{path}: draft.{key} and draft_{key} both given; keep one")
        data[f"draft_{key}"] = value
    return data


def load_recipe(path, **overrides):
    """The pipeline recipe, every stage's parameters validated before any stage runs."""
    if isinstance(path, (str, Path)):
        data = read_recipe(path)  # flags override the recipe, its draft: section included
        refuse_llamafactory(data, path)
        data.update({k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items() if v is not None})
        r = recipe.from_dict(PipelineRecipe, data, source=str(path))
    else:
        r = recipe.resolve(PipelineRecipe, path, overrides)
    if isinstance(r.draft_tokens, bool) or r.draft_tokens < 1:
        raise RecipeError(f"{path}: draft.tokens must be an integer >= 1, got {r.draft_tokens}")
    missing = [k for k in ("base", "adapter", "workdir") if not getattr(r, k)]
    if missing:
        raise RecipeError(f"{path}: the pipeline recipe needs {', '.join(missing)}")
    plan(r)
    return r


def precheck(r) -> None:
    """What a later stage would refuse, refused before the first stage writes anything: the base's
    layer sizes and context against the quantization and bench settings, the calibration files."""
    from tangquant import calib, checkpoint, load
    from tangquant.quant.recipe import check_model

    base = files.existing_dir(r.base, "base model")
    files.existing_dir(r.adapter, "adapter")
    config = checkpoint.load_config(base)
    quant = stage_params(r, "quant_", QuantRecipe)
    check_model(quant, config)
    if quant.bits != 4 or quant.act_order:
        raise RecipeError(f"the export stage keeps 4-bit GPTQ without act-order; the recipe asks for "
                          f"{quant.bits} bits{' with act-order' if quant.act_order else ''}")
    for data in (quant.calib, quant.eval_data):
        if data:
            calib.load_documents(data)
    if r.draft_adapter and not r.draft_base:
        raise RecipeError("draft.adapter needs draft.base (the draft's full-precision model)")
    if r.draft_base:
        draft_base = files.existing_dir(r.draft_base, "draft base model")
        if r.draft_adapter:
            files.existing_dir(r.draft_adapter, "draft adapter")
        draft.check(base, draft_base)
        check_model(stage_params(r, "quant_", QuantRecipe, r.draft_quant_recipe),
                    checkpoint.load_config(draft_base))
    context = load.context_length(config)
    if r.bench and context and r.bench_prompt_tokens + r.bench_gen_tokens > context:
        raise RecipeError(f"bench_prompt_tokens + bench_gen_tokens ({r.bench_prompt_tokens} + "
                          f"{r.bench_gen_tokens}) run past the base's context of {context} tokens")


def run_pipeline(path, force: bool = False, dry_run: bool = False, **overrides) -> dict:
    """Run (or, with ``dry_run``, only plan) every stage.

    Returns ``stages`` ({stage: "ran"|"skipped"|"planned"}), each stage's ``summary`` line
    in ``report`` and one ``summary`` line.
    """
    r = load_recipe(path, **overrides)
    precheck(r)
    work = Path(r.workdir)
    stamps_path = work / STAMPS
    stamps = files.read_json(stamps_path, "pipeline stamps") if stamps_path.is_file() else {}
    status, lines, t0, rebuilt = {}, [], time.time(), set()
    for stage, out, params, inputs in plan(r):
        key = stage_key(stage, dataclasses.asdict(params), inputs)
        # Once a stage is (to be) rebuilt, every stage that reads its output is too.
        stale = any(str(v) in rebuilt for v in inputs.values() if v is not None)
        if not stale and up_to_date(stage, out, key, stamps):
            status[stage] = "skipped"
            lines.append(f"{stage}: {out} is up to date; skipped")
            continue
        rebuilt.add(str(out))
        if dry_run:
            status[stage] = "planned"
            continue
        if out.exists() and not force:
            raise OutputExistsError(f"{stage}: {out} exists but was not made from these inputs "
                                    "and settings; pass --force to rebuild it")
        logger.info("%s → %s", stage, out)
        result = _run_stage(stage, out, params, inputs, r, force=out.exists())
        lines += [result["report"]] if result.get("report") else []
        lines.append(f"{stage}: {result['summary']}")
        stamps[stage] = {"key": key,
                         "output_sha256": files.sha256_file(_output_file(stage, out)),
                         "made": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        work.mkdir(parents=True, exist_ok=True)
        files.write_json(stamps_path, stamps)
        status[stage] = "ran"
    summary = ", ".join(f"{s} {v}" for s, v in status.items())
    return {"stages": status, "report": "\n".join(lines),
            "summary": f"{work}: {summary} ({time.time() - t0:.0f} s)"}


def add_arguments(parser) -> None:
    parser.add_argument("recipe", metavar="RECIPE", help="pipeline recipe (flat YAML)")
    parser.add_argument("--dry-run", action="store_true", help="only say which stages would run")
    parser.add_argument("--force", action="store_true", help="rebuild stale stage outputs")


def run(args) -> dict:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(PipelineRecipe)}
    return run_pipeline(args.recipe, force=args.force, dry_run=args.dry_run, **overrides)
