"""Weight-only INT4 quantization with Intel neural-compressor, written as a GPTQ checkpoint.

INC (3.x torch API: GPTQ, RTN or AWQ) computes the integers; tangquant writes
them in the layout of Qwen's own ``*-GPTQ-Int4`` releases (qweight, qzeros,
scales, g_idx; fp16 scales; embeddings and lm_head in fp16), copies the
tokenizer and chat template, and reports the fidelity against the source on
held-out text. Symmetric quantization is written as format v1 ("gptq");
asymmetric as v2 ("gptq_v2"), because v1 cannot store a zero point of 0.

Calibration (--calib) is the fine-tune's own data, rendered with the model's
chat template. GPTQ and AWQ need it; without it they fall back, with a warning,
to 16 samples of tangquant's built-in Tang poems (RTN needs none). Every 10th
document of --calib (after a seeded shuffle) is held out for the fidelity report
unless --eval-data is given.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass

from tangquant.errors import QuantizationError, TangquantError

logger = logging.getLogger(__name__)

HELP = "INT4 weight-only quantization with Intel neural-compressor, written as a GPTQ checkpoint"
ALGOS = ("gptq", "rtn", "awq", "autoround")
NEEDS_CALIB = ("gptq", "awq", "autoround")
BUILTIN_SAMPLES = 16  # samples drawn from the built-in poems when no --calib is given


@dataclass(frozen=True)
class QuantRecipe:
    algo: str = "gptq"
    bits: int = 4
    group_size: int = 128
    use_sym: bool = True
    act_order: bool = False
    percdamp: float = 0.01
    block_size: int = 128
    true_sequential: bool = True
    iters: int = 200
    calib: str | None = None
    num_samples: int = 128
    seq_len: int = 512
    seed: int = 42
    layer_wise: bool = False
    eval_data: str | None = None
    eval_samples: int = 8


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="full-precision (merged) model directory")
    parser.add_argument("--output", required=True, help="output directory for the GPTQ checkpoint")
    parser.add_argument("--recipe", help="flat YAML recipe (e.g. recipes/int4-gptq-g128.yaml)")
    parser.add_argument("--algo", choices=ALGOS, help="algorithm (default gptq)")
    parser.add_argument("--bits", type=int, help="bits per weight (default 4)")
    parser.add_argument("--group-size", type=int, help="inputs per scale group (default 128; -1: per channel)")
    sym = parser.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="use_sym", action="store_const", const=True, help="symmetric (default)")
    sym.add_argument("--asym", dest="use_sym", action="store_const", const=False, help="asymmetric")
    parser.add_argument("--act-order", action="store_const", const=True, help="GPTQ act-order (desc_act)")
    parser.add_argument("--percdamp", type=float, help="GPTQ Hessian dampening (default 0.01)")
    parser.add_argument("--block-size", type=int, help="GPTQ block size (default 128)")
    parser.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=None,
                        help="GPTQ: calibrate each group of linears (q/k/v, o, gate/up, down) with "
                        "the earlier groups already quantized (default on, Qwen's setting; it runs "
                        "layer by layer)")
    parser.add_argument("--iters", type=int, help="AutoRound: tuning steps per block (default 200)")
    parser.add_argument("--calib", help="calibration data (alpaca/ShareGPT/chinese-poetry JSON, JSONL, .txt)")
    parser.add_argument("--num-samples", type=int, help="calibration samples (default 128)")
    parser.add_argument("--seq-len", type=int, help="tokens per calibration sample (default 512)")
    parser.add_argument("--seed", type=int, help="seed for shuffling and splitting (default 42)")
    parser.add_argument("--layer-wise", action="store_const", const=True,
                        help="bounded memory: quantize and write one decoder layer at a time (gptq, rtn)")
    parser.add_argument("--eval-data", help="held-out data for the fidelity report "
                        "(default: every 10th document of --calib, not used for calibration)")
    parser.add_argument("--eval-samples", type=int, help="fidelity samples (default 8; 0 skips)")
    parser.add_argument("--export", choices=("openvino",), help="also write an OpenVINO IR in OUTPUT/openvino")
    parser.add_argument("--force", action="store_true", help="replace an existing output")


def run(args) -> int:
    result = quantize(args.model, args.output, algo=args.algo, recipe=args.recipe, bits=args.bits,
                      group_size=args.group_size, use_sym=args.use_sym, act_order=args.act_order,
                      percdamp=args.percdamp, block_size=args.block_size,
                      true_sequential=args.true_sequential, iters=args.iters, calib=args.calib,
                      num_samples=args.num_samples, seq_len=args.seq_len, layer_wise=args.layer_wise,
                      seed=args.seed, eval_data=args.eval_data, eval_samples=args.eval_samples,
                      export=args.export, force=args.force)
    print(result["summary"])
    return 0


def resolve_recipe(recipe=None, **overrides) -> QuantRecipe:
    from tangquant import recipe as recipe_mod

    return recipe_mod.load(QuantRecipe, recipe, overrides)


def check_recipe(r: QuantRecipe, config: dict) -> None:
    """Refuse settings the algorithm or the model's layer sizes cannot take."""
    from tangquant.quant.inc import ALGO_BITS, LAYER_WISE_ALGOS

    if r.algo not in ALGOS:
        raise QuantizationError(f"unknown algorithm {r.algo!r}; choose one of {', '.join(ALGOS)}")
    if r.bits not in ALGO_BITS[r.algo]:
        raise QuantizationError(f"{r.algo} supports {ALGO_BITS[r.algo]} bits, not {r.bits}")
    inputs = {"hidden_size": config.get("hidden_size"), "intermediate_size": config.get("intermediate_size")}
    if r.group_size != -1:
        if r.group_size < 1:
            raise QuantizationError(f"group size must be positive or -1, got {r.group_size}")
        bad = {k: v for k, v in inputs.items() if isinstance(v, int) and v % r.group_size}
        if bad:
            raise QuantizationError(f"group size {r.group_size} does not divide the layers' input size "
                                    + ", ".join(f"{k}={v}" for k, v in bad.items()))
    if not 0 < r.percdamp < 1:
        raise QuantizationError(f"percdamp must be in (0, 1), got {r.percdamp}")
    if r.act_order and r.algo != "gptq":
        raise QuantizationError("--act-order is a GPTQ option")
    if r.num_samples < 1 or r.seq_len < 2 or r.eval_samples < 0 or r.block_size < 1:
        raise QuantizationError("num_samples, seq_len and block_size must be positive, eval_samples >= 0")
    max_pos = config.get("max_position_embeddings")
    if isinstance(max_pos, int) and r.seq_len > max_pos:
        raise QuantizationError(f"--seq-len {r.seq_len} is longer than the model's context ({max_pos})")
    if r.layer_wise and r.algo not in LAYER_WISE_ALGOS:
        raise QuantizationError(f"--layer-wise works with {' and '.join(LAYER_WISE_ALGOS)}, "
                                f"not with {r.algo}")
    if r.iters < 0:
        raise QuantizationError(f"iters must be >= 0, got {r.iters}")
    if r.algo == "autoround":
        from tangquant.quant.autoround import check_available

        if not r.use_sym:
            raise QuantizationError("--algo autoround writes AutoGPTQ v1, which cannot hold an "
                                    "asymmetric zero point of 0; use --sym")
        check_available()


def _calibration(r: QuantRecipe, tokenizer):
    """(calibration Packed or None, held-out documents or None, note)."""
    from tangquant.calib import builtin_documents, load_documents, pack, split_documents

    held = load_documents(r.eval_data) if r.eval_data else None
    if r.calib is None:
        if r.algo not in NEEDS_CALIB:
            return None, held, "none (rtn needs no calibration)"
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


def _export_fn(export):
    if export is None:
        return None
    if export != "openvino":
        raise QuantizationError(f"unknown export format {export!r}; the only one is openvino")
    try:
        from tangquant.export import write_openvino_ir
    except ImportError:
        raise TangquantError("--export openvino needs `tangquant export`, which is not available "
                             "in this build yet; run `tangquant export` on the output later") from None
    return write_openvino_ir


def quantize(model, output, algo=None, recipe=None, bits=None, group_size=None, use_sym=None,
             act_order=None, percdamp=None, block_size=None, true_sequential=None, iters=None,
             calib=None, num_samples=None, seq_len=None, layer_wise=None, seed=None, eval_data=None,
             eval_samples=None, export=None, force=False) -> dict:
    """Quantize ``model`` into a GPTQ checkpoint at ``output``; return the manifest metrics."""
    from tangquant.calib import load_tokenizer
    from tangquant.checkpoint import load_config, refuse_quantized, weight_files
    from tangquant.files import check_output, existing_dir

    model_dir = existing_dir(model, "model directory")
    config = load_config(model_dir)
    refuse_quantized(config, model_dir, "quantize its full-precision (merged) model instead")
    r = resolve_recipe(recipe, algo=algo, bits=bits, group_size=group_size, use_sym=use_sym,
                       act_order=act_order, percdamp=percdamp, block_size=block_size,
                       true_sequential=true_sequential, iters=iters, calib=calib,
                       num_samples=num_samples, seq_len=seq_len, layer_wise=layer_wise, seed=seed,
                       eval_data=eval_data, eval_samples=eval_samples)
    check_recipe(r, config)
    out = check_output(output, [model_dir], force)
    weight_files(model_dir)
    write_ir = _export_fn(export)
    tokenizer = load_tokenizer(model_dir)
    packed, held, calib_note = _calibration(r, tokenizer)
    logger.info("calibration: %s", calib_note)
    return _build(model_dir, config, out, r, packed, held, calib_note, write_ir, tokenizer)


def layer_by_layer(r: QuantRecipe) -> bool:
    """Whether tangquant's layer-by-layer driver runs INC (else INC runs on the whole model).

    Besides --layer-wise, true-sequential GPTQ always goes layer by layer: INC 3.10's
    whole-model true_sequential feeds each group of linears the block's output for the
    previous group instead of the block's input (demo poet: KLD 0.00473 against 0.00257
    without true_sequential, and 0.00270 with it done layer by layer).
    """
    return r.layer_wise or (r.algo == "gptq" and r.true_sequential)


def driver_name(r: QuantRecipe) -> str:
    if layer_by_layer(r):
        return "tangquant layer by layer"
    return "auto-round (through INC)" if r.algo == "autoround" else "INC whole model"


def _quantize_and_write(model_dir, tmp, r, packed, held, fmt, tokenizer):
    """(counts, fidelity or None, seconds): INC on the whole model, or the layer-by-layer driver.

    ``tmp`` already holds config.json and the tokenizer, so the written checkpoint
    can be evaluated; the layer-wise driver measures fidelity in its own pass instead.
    """
    import gc

    from tangquant.evaluate import evaluate, tokenize_samples
    from tangquant.quant.inc import run_inc
    from tangquant.quant.writer import write_checkpoint

    samples = packed.samples if packed else []
    want_eval = bool(held) and r.eval_samples > 0
    if layer_by_layer(r):
        from tangquant.quant.layer_by_layer import run_layer_wise

        held_ids = tokenize_samples(held, tokenizer, r.eval_samples, r.seq_len, r.seed) if want_eval else []
        t0 = time.perf_counter()
        counts, fidelity = run_layer_wise(model_dir, tmp, r, samples, held_ids, fmt)
        return counts, fidelity, time.perf_counter() - t0
    t0 = time.perf_counter()
    if r.algo == "autoround":
        from tangquant.quant.autoround import run_autoround

        counts = run_autoround(model_dir, tmp, r, samples, fmt)
    else:
        qmodel, layers = run_inc(model_dir, r, samples)
        counts = write_checkpoint(qmodel, layers, model_dir, tmp, r.bits, r.group_size, fmt)
        del qmodel
    seconds = time.perf_counter() - t0
    gc.collect()
    fidelity = (evaluate(tmp, model_dir, held, num_samples=r.eval_samples, seq_len=r.seq_len,
                         seed=r.seed) if want_eval else None)
    return counts, fidelity, seconds


def _build(model_dir, config, out, r, packed, held, calib_note, write_ir, tokenizer) -> dict:
    from tangquant.quant import card as quant_card
    from tangquant import recipe as recipe_mod
    from tangquant.files import atomic_output_dir, copy_aux_files, dir_size, human_size, peak_rss_bytes
    from tangquant.gptq import quantization_config
    from tangquant.quant.writer import write_config

    fmt = 1 if r.use_sym else 2
    t0 = time.perf_counter()
    with atomic_output_dir(out) as tmp:
        qc = quantization_config(r.bits, r.group_size, r.use_sym, r.act_order, r.percdamp, fmt)
        qc["true_sequential"] = r.true_sequential if r.algo == "gptq" else False
        qc["quantizer"] = f"intel-neural-compressor {r.algo}"
        write_config(config, tmp, qc)
        copy_aux_files(model_dir, tmp)
        recipe_mod.save(r, tmp / "recipe.yaml")
        counts, fidelity, t_quant = _quantize_and_write(model_dir, tmp, r, packed, held, fmt, tokenizer)
        if write_ir is not None:
            write_ir(tmp, tmp / "openvino", embeddings="int8")
        metrics = {"seconds_quantize": round(t_quant, 2),
                   "seconds_total": round(time.perf_counter() - t0, 2),
                   "peak_rss_bytes": peak_rss_bytes(), "calibration": calib_note,
                   "calibration_samples": len(packed.samples) if packed else 0,
                   "calibration_tokens": packed.tokens if packed else 0,
                   "checkpoint_format": qc["checkpoint_format"],
                   "driver": driver_name(r),
                   **{k: v for k, v in counts.items() if k != "files"}, "fidelity": fidelity,
                   "fidelity_data": (r.eval_data or "every 10th document of --calib (held out)")
                   if fidelity else None}
        quant_card.write_card(tmp, model_dir, r, metrics)
        quant_card.write_quant_manifest(tmp, model_dir, r, metrics)
        size = dir_size(tmp)
    kld = (f"KLD {fidelity['kld']:.5f}" if fidelity else "KLD skipped (--eval-samples 0)"
           if r.eval_samples == 0 else "KLD not measured (no held-out data: pass --eval-data)")
    metrics["summary"] = (f"{out}: {human_size(size)}, {r.algo} int{r.bits} g{r.group_size}, "
                          f"{counts['bits_per_weight']:.3f} bits/weight, {kld}")
    metrics["size_bytes"] = size
    return metrics
