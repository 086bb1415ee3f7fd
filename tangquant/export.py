"""Export a GPTQ INT4 checkpoint to an OpenVINO IR that keeps its exact integers.

The checkpoint is dequantised into a temporary fp16 model, exported by
optimum-intel as a stateful text-generation IR and compressed by NNCF to INT4
with the checkpoint's group size (embeddings and lm_head INT8, or fp16); the
INT4 constants NNCF computed are then replaced by the checkpoint's integers,
scales and zero points (see ``ov_int4``). Before the directory is published it
is read back, every INT4 constant is compared with the checkpoint, and it is
compiled and made to generate a token with openvino-genai.

Example:
  tangquant export --model out/poet-gptq --output out/poet-ov --format openvino
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import time
from pathlib import Path

from tangquant.errors import ExportError, InputError

logger = logging.getLogger(__name__)

HELP = "export a GPTQ INT4 checkpoint to an OpenVINO IR with its exact INT4 weights"
FORMATS = ("openvino",)
EMBEDDINGS = ("int8", "fp16")
PHASES = ("dequantise", "trace", "compress", "hand-off", "verify")


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="GPTQ INT4 checkpoint directory (tangquant quantize)")
    parser.add_argument("--output", required=True, help="output directory for the OpenVINO IR")
    parser.add_argument("--format", default="openvino", choices=FORMATS, help="export format")
    parser.add_argument("--embeddings", default="int8", choices=EMBEDDINGS,
                        help="precision of the embeddings and lm_head (default int8)")
    parser.add_argument("--force", action="store_true", help="replace an existing output")


def run(args) -> int:
    metrics = export(args.model, args.output, format=args.format, embeddings=args.embeddings,
                     force=args.force)
    from tangquant.files import human_size

    print(f"{metrics['output']}  {human_size(metrics['size_bytes'])}  "
          f"{metrics['int4_layers']} INT4 layers, {metrics['int4_constants_checked']} constants "
          f"equal to the checkpoint's  ({metrics['seconds']:.0f} s)")
    return 0


def export(model, output, format: str = "openvino", embeddings: str = "int8",
           force: bool = False) -> dict:
    """Export the GPTQ checkpoint ``model`` to ``output``; returns the metrics."""
    from tangquant.files import atomic_output_dir, check_output, existing_dir

    if format not in FORMATS:
        raise InputError(f"unknown export format {format!r}; choose from {', '.join(FORMATS)}")
    src = existing_dir(model, "model directory")
    gptq_config(src)
    out = check_output(output, [src], force)
    with atomic_output_dir(out) as tmp:
        metrics = write_openvino_ir(src, tmp, embeddings=embeddings)
    metrics["output"] = str(out)
    return metrics


def gptq_config(model_dir: Path) -> tuple[int, int, int]:
    """(bits, group_size, format_version) of a 4-bit GPTQ checkpoint, or a clear InputError."""
    from tangquant.checkpoint import load_config, weight_files
    from tangquant.gptq import read_gptq_config

    bits, group_size, fmt = read_gptq_config(load_config(model_dir), model_dir)
    if bits != 4:
        raise InputError(f"{model_dir} is {bits}-bit GPTQ; the OpenVINO export keeps 4-bit GPTQ only")
    weight_files(model_dir)
    return bits, group_size, fmt


def write_openvino_ir(gptq_dir: Path, out_dir: Path, embeddings: str = "int8") -> dict:
    """Write the complete IR directory into the existing empty ``out_dir``; returns the metrics."""
    from tqdm import tqdm

    from tangquant.ov import int4 as ov_int4
    from tangquant.ov import ir as ov_ir
    from tangquant.files import dir_size, write_manifest

    if embeddings not in EMBEDDINGS:
        raise InputError(f"--embeddings must be one of {', '.join(EMBEDDINGS)}, not {embeddings!r}")
    gptq_dir, out_dir = Path(gptq_dir).resolve(), Path(out_dir)
    _, group_size, _ = gptq_config(gptq_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise ExportError(f"{out_dir} is not empty; the IR is written into an empty directory")
    start = time.perf_counter()
    staging = out_dir / ".staging"
    bar = tqdm(total=len(PHASES), desc="export", unit="phase", leave=False)
    try:
        bar.set_postfix_str(PHASES[0])
        sym = write_staging_model(gptq_dir, staging / "hf")
        bar.update()
        bar.set_postfix_str(PHASES[1])
        _trace(staging / "hf", staging / "ir")
        bar.update()
        bar.set_postfix_str(PHASES[2])
        ov_model = _compress(staging / "ir" / ov_ir.MODEL_XML, sym, group_size, embeddings)
        bar.update()
        bar.set_postfix_str(PHASES[3])
        layers = ov_int4.replace_constants(ov_model, gptq_dir)
        _save(ov_model, out_dir / ov_ir.MODEL_XML)
        del ov_model
        _copy_side_files(staging / "ir", gptq_dir, out_dir)
        bar.update()
        bar.set_postfix_str(PHASES[4])
        shutil.rmtree(staging)
        checked = verify_ir(out_dir, gptq_dir)
        bar.update()
    finally:
        bar.close()
        shutil.rmtree(staging, ignore_errors=True)
    metrics = {
        "int4_layers": layers, "int4_constants_checked": checked,
        "int4_mode": "symmetric i4 (q - 8)" if sym else "asymmetric u4 with u4 zero points",
        "group_size": group_size, "embeddings": embeddings,
        "seconds": round(time.perf_counter() - start, 1),
    }
    ov_ir.write_model_card(out_dir, gptq_dir, metrics, embeddings)
    metrics["size_bytes"] = dir_size(out_dir)
    write_manifest(out_dir, "export", {"format": "openvino", "embeddings": embeddings},
                   {"model": str(gptq_dir)}, metrics)
    return metrics


def write_staging_model(gptq_dir: Path, hf_dir: Path) -> bool:
    """The checkpoint dequantised to a plain fp16 HF model; returns whether every zero point is 8."""
    import torch

    from tangquant.checkpoint import ShardWriter, iter_tensors, load_config, weight_files
    from tangquant.files import copy_aux_files, write_json
    from tangquant.gptq import iter_quantized_layers

    hf_dir.mkdir(parents=True)
    writer = ShardWriter(hf_dir, max_shard_bytes=2 * 10**9)
    quantized, sym = set(), True
    for module, layer, bias in iter_quantized_layers(gptq_dir):
        _check_groups(module, layer)
        sym = sym and bool((layer.zeros == 8).all())
        writer.add(f"{module}.weight", layer.dequantize().to(torch.float16))
        if bias is not None:
            writer.add(f"{module}.bias", bias.to(torch.float16))
        quantized.add(module)
    if not quantized:
        raise InputError(f"{gptq_dir} holds no GPTQ layers (qweight/qzeros/scales/g_idx)")
    for path in weight_files(gptq_dir):
        for name, tensor in iter_tensors(path):
            if name.rpartition(".")[0] not in quantized:
                writer.add(name, tensor.to(torch.float16) if tensor.is_floating_point() else tensor)
    writer.close()
    config = load_config(gptq_dir)
    config.pop("quantization_config", None)
    config["torch_dtype"] = "float16"
    write_json(hf_dir / "config.json", config)
    copy_aux_files(gptq_dir, hf_dir)
    return sym


def _check_groups(module: str, layer) -> None:
    """OpenVINO groups consecutive inputs; GPTQ's act-order permutes them (g_idx)."""
    import torch

    n_in, n_groups = layer.q.shape[1], layer.scales.shape[0]
    if n_in % n_groups or not torch.equal(layer.g_idx.long(),
                                          torch.arange(n_in) // (n_in // n_groups)):
        raise InputError(f"{module}: the GPTQ groups are not consecutive input columns (act-order / "
                         "desc_act checkpoint); OpenVINO INT4 cannot hold them exactly")


def _trace(hf_dir: Path, ir_dir: Path) -> None:
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig

    # dtype "fp16" also stops optimum-intel from INT8-compressing models over 1B parameters,
    # which would leave nothing for the INT4 compression.
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the summary line
            main_export(str(hf_dir), ir_dir, task="text-generation-with-past",
                        ov_config=OVConfig(dtype="fp16"), stateful=True, convert_tokenizer=False,
                        local_files_only=True)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ExportError(f"optimum-intel could not export the model: {exc}") from None


def _compress(xml: Path, sym: bool, group_size: int, embeddings: str):
    import nncf
    import openvino as ov

    mode = nncf.CompressWeightsMode.INT4_SYM if sym else nncf.CompressWeightsMode.INT4_ASYM
    backup = nncf.BackupMode.INT8_ASYM if embeddings == "int8" else nncf.BackupMode.NONE
    # NNCF logs its statistics table to stdout at INFO; keep it to -v runs.
    nncf.set_log_level(logging.DEBUG if logger.isEnabledFor(logging.DEBUG) else logging.WARNING)
    model = ov.Core().read_model(str(xml))
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bar
        return nncf.compress_weights(model, mode=mode, group_size=group_size, ratio=1.0,
                                     all_layers=False, backup_mode=backup)


def _save(ov_model, xml: Path) -> None:
    import openvino as ov

    # Constants are already INT4/INT8/fp16; fp32 ones (none expected) stay fp32.
    ov.save_model(ov_model, str(xml), compress_to_fp16=False)


def _copy_side_files(ir_dir: Path, gptq_dir: Path, out_dir: Path) -> None:
    from tangquant.ov import ir as ov_ir
    from tangquant.files import copy_aux_files

    shutil.copy2(ir_dir / "config.json", out_dir / "config.json")
    copy_aux_files(gptq_dir, out_dir)
    ov_ir.fix_generation_config(gptq_dir, out_dir)
    ov_ir.write_tokenizers(gptq_dir, out_dir)


def verify_ir(ir_dir: Path, gptq_dir: Path) -> int:
    """Read the written IR back, compare its INT4 constants, generate a token; returns constants checked."""
    import openvino as ov

    from tangquant.ov import int4 as ov_int4
    from tangquant.ov import ir as ov_ir

    ov_ir.check_ir_files(ir_dir, error=ExportError)
    try:
        model = ov.Core().read_model(str(ir_dir / ov_ir.MODEL_XML))
    except RuntimeError as exc:
        raise ExportError(f"the written IR in {ir_dir} does not read back: "
                          f"{str(exc).strip().splitlines()[0]}") from None
    checked = ov_int4.verify_constants(model, gptq_dir)
    del model
    ov_ir.smoke_generate(ir_dir)
    return checked
