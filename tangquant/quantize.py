"""Weight-only INT4 quantization with Intel neural-compressor, written as a GPTQ checkpoint.

INC (3.x torch API: GPTQ, RTN, AWQ or AutoRound) computes the integers;
tangquant writes them in the layout of Qwen's own ``*-GPTQ-Int4`` releases
(qweight, qzeros, scales, g_idx; fp16 scales; embeddings and lm_head in fp16),
copies the tokenizer and chat template, and reports the fidelity against the
source on held-out text. Symmetric quantization is written as format v1
("gptq"); asymmetric as v2 ("gptq_v2"), because v1 cannot store a zero point of 0.

Calibration (--calib) is the fine-tune's own data, rendered with the model's
chat template. GPTQ and AWQ need it; without it they fall back, with a warning,
to 16 samples of tangquant's built-in Tang poems (RTN needs none). Every 10th
document of --calib (after a seeded shuffle) is held out for the fidelity report
unless --eval-data is given.

example:
  tangquant quantize --model merged --output int4 --recipe recipes/int4-gptq-g128.yaml \\
      --calib data/tang/tang_calib.json --export openvino
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tangquant import card as hub_card
from tangquant import checkpoint, files, host, load, recipe
from tangquant.calib import builtin_documents, load_documents, pack, split_documents
from tangquant.errors import ParameterError
from tangquant.gptq import GPTQCheckpoint, quantization_config
from tangquant.quant import card
from tangquant.quant.recipe import BUILTIN_SAMPLES, QuantRecipe, check_model, quantization_metadata

logger = logging.getLogger(__name__)

HELP = "INT4 weight-only quantization with Intel neural-compressor, written as a GPTQ checkpoint"
PARAMS = QuantRecipe
RECIPE_HELP = "flat YAML recipe with INC's parameter names (e.g. recipes/int4-gptq-g128.yaml); flags override it"
EXPORTS = ("openvino",)


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="full-precision (merged) model directory")
    parser.add_argument("--output", required=True, help="output directory for the GPTQ checkpoint")
    parser.add_argument("--export", choices=EXPORTS, help="also write an OpenVINO IR in OUTPUT/openvino")
    parser.add_argument("--tune", action="store_true", help="with --export: then `tangquant tune "
                        "--apply` the IR on this machine (records in OUTPUT/tune.jsonl)")
    parser.add_argument("--tune-budget", default="5m", metavar="DURATION",
                        help="the tune's --budget (default 5m)")
    parser.add_argument("--force", action="store_true", help="replace an existing output")


def run(args) -> dict:
    if args.tune and args.export != "openvino":
        raise ParameterError("--tune tunes the OpenVINO IR: give it with --export openvino")
    result = quantize(args.model, args.output, recipe.from_args(QuantRecipe, args), export=args.export,
                      force=args.force)
    if args.tune:
        from tangquant.tune import tune

        tuned = tune(Path(result["output"]) / "openvino", apply=True,
                     results=str(Path(result["output"]) / "tune.jsonl"), budget=args.tune_budget)
        result["summary"] += "\n" + tuned["summary"]
        result["report"] = tuned["report"]
    return result


def quantize(model, output, params: QuantRecipe | str | Path | None = None, export: str | None = None,
             force: bool = False, **overrides) -> dict:
    """Quantize ``model`` into a GPTQ checkpoint at ``output``; return the manifest metrics.

    ``params`` is a QuantRecipe or a recipe file (keyword ``overrides`` go on top). The
    result holds ``checkpoint``, the written :class:`GPTQCheckpoint`, for the next stage.
    """
    from tangquant.quant import driver  # the engines: torch, INC

    r = recipe.resolve(QuantRecipe, params, overrides)
    src = load.inspect(model, kinds=("hf",))
    check_model(r, src.config)
    if export is not None and export not in EXPORTS:
        raise ParameterError(f"unknown export format {export!r}; the only one is openvino")
    out = files.check_output(output, [src.path], force)
    tokenizer = load.tokenizer(src)
    if export is not None:  # what the export will refuse, refused before quantizing
        from tangquant.ov import build

        build.check_settings(r.bits, r.act_order, tokenizer, src.path, f"--bits {r.bits} --export {export}")
    packed, held, calib_note = _calibration(r, tokenizer)
    lineage = hub_card.lineage(src.path, r.base_model_id)  # after the checks: it may log why there is none
    logger.info("calibration: %s", calib_note)
    t0 = time.perf_counter()
    with files.atomic_output_dir(out, force) as tmp:
        qc = quantization_config(r.bits, r.group_size, r.use_sym, r.act_order, r.percdamp, r.format_version)
        qc.update(quantization_metadata(r))
        checkpoint.write_config(tmp, src.config, "float16", qc)
        files.copy_aux_files(src.path, tmp)
        recipe.save(r, tmp / "recipe.yaml")
        counts, fidelity, t_quant = driver.quantize_and_write(src.path, tmp, r, packed, held, tokenizer)
        if export is not None:
            from tangquant.ov import build

            build.write_ir_dir(GPTQCheckpoint.open(tmp), tmp / "openvino", tokenizer, embeddings="int8",
                               lineage=lineage)
        metrics = _metrics(r, counts, fidelity, t_quant, time.perf_counter() - t0, packed, calib_note,
                           qc["checkpoint_format"])
        card.write_card(tmp, src.path, r, metrics, lineage)
        card.write_quant_manifest(tmp, src.path, r, metrics)
        size = files.dir_size(tmp)
    metrics.update(size_bytes=size, output=str(out), checkpoint=GPTQCheckpoint.open(out),
                   summary=_summary(out, r, counts, fidelity, size))
    return metrics


def _calibration(r: QuantRecipe, tokenizer):
    """(calibration Packed or None, held-out documents or None, note)."""
    held = load_documents(r.eval_data) if r.eval_data else None
    if r.calib is None:
        if not r.algorithm.needs_calib:
            return None, held, f"none ({r.algo} needs no calibration)"
        logger.warning("no --calib given: calibrating %s on tangquant's %d built-in Tang poems; "
                       "pass the fine-tune's own data for a faithful model", r.algo, BUILTIN_SAMPLES)
        packed = pack(builtin_documents(), tokenizer, r.seq_len, min(r.num_samples, BUILTIN_SAMPLES),
                      r.seed, what="built-in calibration poems")
        return packed, held, (f"built-in Tang poems (no --calib): {len(packed.samples)} samples, "
                              f"{packed.tokens} tokens")
    docs = load_documents(r.calib)
    if held is None:
        docs, held = split_documents(docs, r.seed)
    packed = pack(docs, tokenizer, r.seq_len, r.num_samples, r.seed)
    return packed, held or None, (f"{len(packed.samples)} samples, {packed.tokens} tokens "
                                  f"from {packed.documents} documents of {r.calib}")


def _metrics(r: QuantRecipe, counts, fidelity, t_quant, t_total, packed, calib_note, fmt) -> dict:
    return {"seconds_quantize": round(t_quant, 2), "seconds_total": round(t_total, 2),
            "peak_rss_bytes": host.peak_rss_bytes(), "calibration": calib_note,
            "calibration_samples": len(packed.samples) if packed else 0,
            "calibration_tokens": packed.tokens if packed else 0,
            "checkpoint_format": fmt, "driver": r.driver,
            **{k: v for k, v in counts.items() if k != "files"}, "fidelity": fidelity,
            "fidelity_data": (r.eval_data or "every 10th document of --calib (held out)")
            if fidelity else None}


def _summary(out: Path, r: QuantRecipe, counts, fidelity, size: int) -> str:
    kld = (f"KLD {fidelity['kld']:.5f}" if fidelity else "KLD skipped (--eval-samples 0)"
           if r.eval_samples == 0 else "KLD not measured (no held-out data: pass --eval-data)")
    return (f"{out}: {files.human_size(size)}, {r.algo} int{r.bits} g{r.group_size}, "
            f"{counts['bits_per_weight']:.3f} bits/weight, {kld}")
