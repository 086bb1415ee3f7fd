"""Fidelity of a model against its reference on held-out text.

Reports the perplexity of both models, the mean KL divergence
KL(reference || model) of the next-token distributions and the top-1
agreement, on text in the calibration formats (see ``tangquant.calib``).
Either model can be a full-precision Hugging Face directory, a GPTQ checkpoint
(exact fp32 dequantisation) or an OpenVINO IR directory (compiled with fp32
inference precision and no dynamic quantization).

Example:
  tangquant eval --model out/int4-gptq --reference out/merged --data data/tang/tang_eval.json
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from tangquant import files, load, recipe
from tangquant.calib import eval_samples
from tangquant.errors import InputError, ParameterError
from tangquant.recipe import param, require

logger = logging.getLogger(__name__)

HELP = "fidelity of a (quantized) model against its reference: perplexity, KL divergence, top-1"


@dataclass(frozen=True)
class EvalParams:
    num_samples: int = param(8, "samples to evaluate")
    seq_len: int = param(512, "tokens per sample")
    seed: int = param(0, "shuffle seed")

    def __post_init__(self):
        require(self.num_samples >= 1, f"num_samples must be at least 1, got {self.num_samples}")
        require(self.seq_len >= 2, f"seq_len must be at least 2, got {self.seq_len}")


PARAMS = EvalParams


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model to evaluate (HF dir, GPTQ dir or OpenVINO IR dir)")
    parser.add_argument("--reference", required=True, help="the full-precision model it came from")
    parser.add_argument("--data", required=True, help="held-out text in a calibration format")
    parser.add_argument("--json", dest="json_out", help="also write the metrics to this JSON file")
    parser.add_argument("--force", action="store_true", help="replace an existing --json file")


def run(args) -> dict:
    params = recipe.from_args(EvalParams, args)
    if args.json_out:  # checked before anything is loaded: never an input, never clobbered
        files.check_output_file(args.json_out, [args.model, args.reference, args.data], args.force)
    metrics = evaluate(args.model, args.reference, args.data, params)
    if args.json_out:
        with files.atomic_output_file(Path(args.json_out), args.force) as tmp:
            tmp.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return {**metrics, "report": "\n".join(format_report(metrics))}


def format_report(m: dict) -> list[str]:
    return [f"perplexity: model {m['ppl_model']:.4f}, reference {m['ppl_reference']:.4f}",
            f"KL(reference || model): {m['kld']:.6f} nats/token (max {m['kld_max']:.4f})",
            f"top-1 agreement: {100 * m['top1_agreement']:.2f}% over {m['tokens']} tokens "
            f"in {m['samples']} samples"]


def evaluate(model, reference, data, params: EvalParams | None = None, tokenizer=None,
             **overrides) -> dict:
    """Compare ``model`` with ``reference`` (each a path or a loaded model) on ``data``.

    ``data`` is a file in a calibration format or a list of ``calib.Document``.
    Given paths, the reference is run and released before the model is loaded,
    so only one model is in memory at a time.
    """
    from tangquant.measure.kl import fidelity  # the engine: torch

    p = recipe.resolve(EvalParams, params, overrides)
    paths = [m for m in (model, reference) if isinstance(m, (str, Path))]
    checked = {id(m): load.inspect(m) for m in paths}  # refuse a wrong path before any heavy work
    for md in checked.values():
        context = load.context_length(md.config)
        if context is not None and p.seq_len > context:
            raise ParameterError(f"--seq-len {p.seq_len} is longer than the context of {md.path} "
                                 f"({context} tokens)")
    if tokenizer is None:
        src = reference if isinstance(reference, (str, Path)) else model
        if not isinstance(src, (str, Path)):
            raise InputError("evaluate needs a tokenizer when neither model is given as a path")
        tokenizer = load.tokenizer(checked[id(src)])
    samples = eval_samples(data, tokenizer, p.num_samples, p.seq_len, p.seed)
    return fidelity(checked.get(id(model), model), checked.get(id(reference), reference), samples)
