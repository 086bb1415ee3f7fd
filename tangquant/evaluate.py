"""Fidelity of a model against its reference: llama.cpp's KL statistics and lm-evaluation-harness.

With --data, both models score the same held-out text (any calibration format,
see ``tangquant.calib``) and eval prints what ``llama-perplexity
--kl-divergence`` prints, under the same names: PPL(Q) and PPL(base) with
their ratio, ln-ratio and difference, mean KLD ± its standard error and its
percentiles, Δp statistics and RMS, and how often both put the same token on
top (Q is --model, base is --reference; KL(reference ‖ model), nats/token).
Either model can be a full-precision Hugging Face directory (with
--reference-adapter: base + LoRA), a GPTQ checkpoint (exact fp32
dequantisation), a qwen2 GGUF (dequantised exactly by gguf's numpy code: the
weights' error, not llama.cpp's kernels) or an OpenVINO IR (fp32 inference, no
dynamic quantization).

With --tasks, lm-evaluation-harness runs the tasks on both models and prints
them side by side, with the difference and its paired standard error. The
tasks shipped with tangquant run offline (held-out Tang poems from
chinese-poetry, traditional and simplified script): tang_nextline (byte
perplexity of the next couplet) and tang_couplet (choose a couplet's second
half among four); `tangquant data --lm-eval-items N` rebuilds them from a
corpus at any size (--tasks-dir). With network access lm_eval's own tasks
work too, e.g. cmmlu_ancient_chinese, ceval-valid_chinese_language_and_literature
or the aclue_* tasks. An IR runs as deployed (OpenVINO's CPU defaults) unless
--tasks-exact.

Examples:
  tangquant eval --model out/int4-gptq/openvino --reference out/merged --data data/tang/tang_eval.json
  tangquant eval --model out/int4-gptq/openvino --reference Qwen1.5-7B-Chat --reference-adapter lora \\
      --tasks tang_couplet,tang_nextline --json eval.json
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from tangquant import files, lmtasks, load, recipe
from tangquant.calib import eval_samples
from tangquant.errors import InputError, ParameterError
from tangquant.files import existing_dir
from tangquant.host import package_versions
from tangquant.lmtasks import ASSET_DIR
from tangquant.recipe import param, require

logger = logging.getLogger(__name__)

HELP = "fidelity against the reference: llama.cpp's KL statistics, lm-evaluation-harness side by side"


@dataclass(frozen=True)
class EvalParams:
    num_samples: int = param(8, "samples of --data to evaluate")
    seq_len: int = param(512, "tokens per sample")
    seed: int = param(0, "shuffle seed")
    tasks: tuple[str, ...] = param((), "lm-evaluation-harness tasks or groups to run on both models "
                                   "(comma list), e.g. tang_couplet,tang_nextline")
    limit: int | None = param(None, "lm_eval: at most N documents per task", metavar="N")
    batch_size: int = param(1, "lm_eval batch size")
    tasks_exact: bool = param(False, "lm_eval: compile an IR in exact mode (f32, no dynamic "
                              "quantization) instead of with OpenVINO's CPU defaults, as deployed")
    trust_tasks_code: bool = param(False, "run a --tasks-dir that tangquant did not write: lm_eval "
                                   "imports its Python (!function hooks) and renders its Jinja "
                                   "templates, which can run any code; only for a folder you trust")

    def __post_init__(self):
        require(self.num_samples >= 1, f"num_samples must be at least 1, got {self.num_samples}")
        require(self.seq_len >= 2, f"seq_len must be at least 2, got {self.seq_len}")
        require(self.limit is None or self.limit >= 1, f"limit must be at least 1, got {self.limit}")
        require(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")
        require(all(t.strip() for t in self.tasks), "tasks must not hold an empty name")


PARAMS = EvalParams


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model to evaluate (HF dir, GPTQ dir or OpenVINO IR dir)")
    parser.add_argument("--reference", required=True, help="the full-precision model it came from")
    parser.add_argument("--reference-adapter", metavar="DIR",
                        help="a peft LoRA on top of the reference (base + LoRA as the fine-tune runs)")
    parser.add_argument("--data", help="held-out text in a calibration format: the KL statistics")
    parser.add_argument("--tasks-dir", metavar="DIR",
                        help="lm_eval task directory (default: the Tang-poem tasks shipped with tangquant)")
    parser.add_argument("--json", dest="json_out", help="also write every number to this JSON file")
    parser.add_argument("--force", action="store_true", help="replace an existing --json file")


def run(args) -> dict:
    params = recipe.from_args(EvalParams, args)
    if args.json_out:  # checked before anything is loaded: never an input, never clobbered
        inputs = [args.model, args.reference, args.data, args.reference_adapter]
        files.check_output_file(args.json_out, [i for i in inputs if i], args.force)
    metrics = evaluate(args.model, args.reference, args.data, params,
                       reference_adapter=args.reference_adapter, tasks_dir=args.tasks_dir)
    if args.json_out:
        with files.atomic_output_file(Path(args.json_out), args.force) as tmp:
            tmp.write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return {**metrics, "report": "\n".join(format_report(metrics))}


def format_report(m: dict) -> list[str]:
    from tangquant.measure.klstats import format_block

    lines = []
    if "kld" in m:
        lines += [f"Q = model, base = reference; {m['tokens']} tokens in {m['samples']} samples", "",
                  *format_block(m)]
    if m.get("lm_eval"):
        from tangquant.measure.harness import format_table  # imports lm_eval, as the run did

        lines += ([""] if lines else []) + format_table(m["lm_eval"])
    return lines


def _summary(m: dict) -> str:
    parts = []
    if "kld" in m:
        parts.append(f"KLD {m['kld']:.6f}, same top {100 * m['same_top']:.2f}%, "
                     f"PPL ratio {m['ppl_ratio']:.4f} over {m['tokens']} tokens")
    if m.get("lm_eval"):
        parts.append(f"lm_eval: {len(m['lm_eval']['rows'])} metrics on {len(m['lm_eval']['tasks'])} task(s)")
    return "eval: " + "; ".join(parts)


def evaluate(model, reference, data=None, params: EvalParams | None = None, tokenizer=None,
             reference_adapter=None, tasks_dir=None, **overrides) -> dict:
    """Compare ``model`` with ``reference`` (each a path or a loaded model).

    ``data`` (a file in a calibration format or a list of ``calib.Document``) gives the
    KL statistics, at the top level of the result; ``params.tasks`` the lm_eval table,
    under ``lm_eval``. Given paths, the reference is run and released before the model
    is loaded, so only one model is in memory at a time.
    """
    p = recipe.resolve(EvalParams, params, overrides)
    if data is None and not p.tasks:
        raise ParameterError("nothing to evaluate: give --data (KL statistics), --tasks (lm_eval) or both")
    paths = [m for m in (model, reference) if isinstance(m, (str, Path))]
    checked = {id(m): load.inspect(m, kinds=load.LOGIT_KINDS) for m in paths}  # refuse a wrong path before any heavy work
    for md in checked.values() if data is not None else ():
        context = load.context_length(md.config)
        if context is not None and p.seq_len > context:
            raise ParameterError(f"--seq-len {p.seq_len} is longer than the context of {md.path} "
                                 f"({context} tokens)")
    adapter = existing_dir(reference_adapter, "reference adapter") if reference_adapter else None
    task_dir = existing_dir(tasks_dir, "lm_eval task directory") if tasks_dir else ASSET_DIR
    foreign = lmtasks.foreign_code(task_dir) if p.tasks and not p.trust_tasks_code else []
    if foreign:  # code from a data folder never runs by default, like a pickle
        raise InputError(f"{task_dir}: lm_eval would run code tangquant did not write ({foreign[0].name}"
                         f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}: its task YAML "
                         "imports the folder's Python and renders Jinja templates); pass "
                         "--trust-tasks-code if you trust it")
    out: dict = {}
    if data is not None:
        out.update(_kl(model, reference, data, p, tokenizer, checked, adapter))
    if p.tasks:
        if len(checked) != 2:
            raise InputError("lm_eval tasks need both models as paths")
        if importlib.util.find_spec("lm_eval") is None:
            raise ParameterError("--tasks needs lm-evaluation-harness: pip install 'tangquant[eval]'")
        from tangquant.measure import harness  # the engine: lm_eval, torch, OpenVINO

        out["lm_eval"] = harness.side_by_side(checked[id(model)], checked[id(reference)], p.tasks,
                                              task_dir, p.limit, p.batch_size, p.tasks_exact, adapter)
        out["versions"] = package_versions(("lm-eval", "torch", "transformers", "optimum-intel", "openvino"))
    out["summary"] = _summary(out)
    return out


def _kl(model, reference, data, p: EvalParams, tokenizer, checked: dict, adapter) -> dict:
    from tangquant.measure.kl import fidelity  # the engine: torch

    if tokenizer is None:
        src = reference if isinstance(reference, (str, Path)) else model
        if not isinstance(src, (str, Path)):
            raise InputError("evaluate needs a tokenizer when neither model is given as a path")
        tokenizer = load.tokenizer(checked[id(src)])
    samples = eval_samples(data, tokenizer, p.num_samples, p.seq_len, p.seed)
    return fidelity(checked.get(id(model), model), checked.get(id(reference), reference), samples,
                    reference_adapter=adapter)
