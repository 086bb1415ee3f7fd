"""Build an OpenVINO IR directory from a GPTQ checkpoint, keeping its exact INT4 integers.

The checkpoint is dequantised into a temporary fp16 model, exported by
optimum-intel as a stateful text-generation IR and compressed by NNCF to INT4
with the checkpoint's group size (embeddings and lm_head INT8, or fp16); the
INT4 constants NNCF computed are then replaced by the checkpoint's integers,
scales and zero points (:mod:`tangquant.ov.int4`). Before the directory is
handed back it is read back, every INT4 constant is compared with the
checkpoint, and openvino-genai generates a token.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import sys
import time
from pathlib import Path

import nncf
import openvino as ov
import openvino_genai
import torch
from openvino_tokenizers import convert_tokenizer
from optimum.exporters.openvino import main_export
from optimum.intel import OVConfig
from tqdm import tqdm

from tangquant import card, checkpoint, files
from tangquant.errors import ExportError, InputError, first_line
from tangquant.gptq import GPTQCheckpoint
from tangquant.ov import head, int4, ir, runtime

logger = logging.getLogger(__name__)

EMBEDDINGS = ("int8", "fp16")
LM_HEADS = ("int8", "int4")
PHASES = ("dequantise", "trace", "compress", "hand-off", "verify")


def check_exportable(ckpt: GPTQCheckpoint, tokenizer) -> None:
    check_settings(ckpt.bits, ckpt.desc_act, tokenizer, ckpt.path, ckpt.path)


def check_settings(bits: int, desc_act: bool, hf, tokenizer_dir: Path, where) -> None:
    """Everything the export needs that can be known before it starts (or before quantizing);
    ``hf``: the Hugging Face tokenizer of ``tokenizer_dir``."""
    if bits != 4:
        raise InputError(f"{where}: the OpenVINO export keeps 4-bit GPTQ only, not {bits}-bit")
    if desc_act:
        raise InputError(f"{where}: act-order (desc_act) GPTQ permutes the groups, which OpenVINO's "
                         "consecutive INT4 groups cannot hold exactly; quantize without --act-order")
    if not hf.chat_template:
        raise InputError(f"the tokenizer of {tokenizer_dir} has no chat template")
    im_end = hf.convert_tokens_to_ids(ir.IM_END)
    if im_end is None or im_end == hf.unk_token_id:
        raise InputError(f"the tokenizer in {tokenizer_dir} has no {ir.IM_END} token (not a ChatML chat model)")


def write_ir_dir(ckpt: GPTQCheckpoint, out_dir: Path, tokenizer, embeddings: str = "int8",
                 lineage: dict | None = None, lm_head: str = "int8",
                 lm_head_group_size: int = 128) -> dict:
    """The IR, its model card and manifest in the existing empty ``out_dir``; returns the metrics.

    ``tokenizer`` is the checkpoint's Hugging Face tokenizer, opened once by the caller; ``lineage``
    (``card.lineage``: base model, licence) defaults to what the checkpoint's card says.
    """
    metrics = write_ir(ckpt, out_dir, tokenizer, embeddings, lm_head, lm_head_group_size)
    ir.write_model_card(out_dir, ckpt.path, metrics, embeddings,
                        card.lineage(ckpt.path) if lineage is None else lineage)
    metrics["size_bytes"] = files.dir_size(out_dir)
    params = {"format": "openvino", "embeddings": embeddings, "lm_head": lm_head,
              "runtime_options": runtime.export_record()}
    if lm_head == "int4":
        params["lm_head_group_size"] = lm_head_group_size
    files.write_manifest(out_dir, "export", params,
                         {"model": str(ckpt.path)}, metrics)
    return metrics


def write_ir(ckpt: GPTQCheckpoint, out_dir: Path, tokenizer, embeddings: str = "int8",
             lm_head: str = "int8", lm_head_group_size: int = 128) -> dict:
    """Write the IR files into the existing empty ``out_dir``; returns the metrics.

    ``lm_head="int4"`` replaces the head NNCF compressed (INT8, or fp16 with ``embeddings="fp16"``)
    by a group-wise INT4 RTN copy (:mod:`tangquant.ov.head`)."""
    if embeddings not in EMBEDDINGS:
        raise InputError(f"--embeddings must be one of {', '.join(EMBEDDINGS)}, not {embeddings!r}")
    if lm_head not in LM_HEADS:
        raise InputError(f"--lm-head must be one of {', '.join(LM_HEADS)}, not {lm_head!r}")
    check_exportable(ckpt, tokenizer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise ExportError(f"{out_dir} is not empty; the IR is written into an empty directory")
    start = time.perf_counter()
    staging = out_dir / ".staging"
    bar = tqdm(total=len(PHASES), desc="export", unit="phase", leave=False)

    def phase(i: int):
        bar.update(i > 0)
        bar.set_postfix_str(PHASES[i])

    try:
        phase(0)
        sym = write_staging_model(ckpt, staging / "hf")
        phase(1)
        _trace(staging / "hf", staging / "ir")
        shutil.rmtree(staging / "hf")  # a 7B model's fp16 copy: 15 GB of disk the next phases need
        phase(2)
        ov_model = _compress(staging / "ir" / ir.MODEL_XML, sym, ckpt.group_size, embeddings)
        phase(3)
        layers = int4.replace_constants(ov_model, ckpt)
        head_metrics = (head.replace_head(ov_model, ckpt, lm_head_group_size) if lm_head == "int4"
                        else {"lm_head": embeddings})
        # Only the runtime options tangquant chooses: optimum-intel's f16 KV-cache pin is dropped.
        runtime.set_on_model(ov_model, runtime.export_options())
        _save(ov_model, out_dir / ir.MODEL_XML, compress_to_fp16=False)
        del ov_model
        _copy_side_files(staging / "ir", ckpt.path, out_dir, tokenizer)
        phase(4)
        shutil.rmtree(staging)
        checked = verify_ir(out_dir, ckpt)
        bar.update()
    finally:
        bar.close()
        shutil.rmtree(staging, ignore_errors=True)
    return {"int4_layers": layers, "int4_constants_checked": checked,
            "int4_mode": "symmetric i4 (q - 8)" if sym else "asymmetric u4 with u4 zero points",
            "group_size": ckpt.group_size, "embeddings": embeddings, **head_metrics,
            "seconds": round(time.perf_counter() - start, 1)}


def write_staging_model(ckpt: GPTQCheckpoint, hf_dir: Path) -> bool:
    """The checkpoint dequantised to a plain fp16 HF model; returns whether every zero point is 8."""
    hf_dir.mkdir(parents=True)
    writer = checkpoint.ShardWriter(hf_dir, max_shard_bytes=2 * 10**9)
    sym = True
    for module, layer, bias in ckpt.layers():
        _check_groups(module, layer)
        sym = sym and bool((layer.zeros == 8).all())
        writer.add(f"{module}.weight", layer.dequantize().to(torch.float16))
        if bias is not None:
            writer.add(f"{module}.bias", bias.to(torch.float16))
    for name, tensor in ckpt.tensors():
        writer.add(name, tensor.to(torch.float16) if tensor.is_floating_point() else tensor)
    writer.close()
    checkpoint.write_config(hf_dir, ckpt.config, "float16")
    files.copy_aux_files(ckpt.path, hf_dir)
    return sym


def _check_groups(module: str, layer) -> None:
    """OpenVINO groups consecutive inputs; GPTQ's act-order permutes them (g_idx)."""
    n_in, n_groups = layer.q.shape[1], layer.scales.shape[0]
    if n_in % n_groups or not torch.equal(layer.g_idx.long(),
                                          torch.arange(n_in) // (n_in // n_groups)):
        raise InputError(f"{module}: the GPTQ groups are not consecutive input columns (act-order / "
                         "desc_act checkpoint); OpenVINO INT4 cannot hold them exactly")


def _third_party_output():
    """Where what optimum and NNCF print goes: stderr with -v, nowhere otherwise (stdout
    carries only the summary line, stderr only tangquant's bars)."""
    if logger.isEnabledFor(logging.DEBUG):
        return contextlib.redirect_stdout(sys.stderr)
    return contextlib.redirect_stdout(io.StringIO())


def _trace(hf_dir: Path, ir_dir: Path) -> None:
    # dtype "fp16" also stops optimum-intel from INT8-compressing models over 1B parameters,
    # which would leave nothing for the INT4 compression.
    try:
        with _third_party_output():
            main_export(str(hf_dir), ir_dir, task="text-generation-with-past",
                        ov_config=OVConfig(dtype="fp16"), stateful=True, convert_tokenizer=False,
                        local_files_only=True)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ExportError(f"optimum-intel could not export the model: {exc}") from None


def _compress(xml: Path, sym: bool, group_size: int, embeddings: str):
    mode = nncf.CompressWeightsMode.INT4_SYM if sym else nncf.CompressWeightsMode.INT4_ASYM
    backup = nncf.BackupMode.INT8_ASYM if embeddings == "int8" else nncf.BackupMode.NONE
    # NNCF logs its statistics table to stdout at INFO; keep it to -v runs.
    nncf.set_log_level(logging.DEBUG if logger.isEnabledFor(logging.DEBUG) else logging.WARNING)
    model = ov.Core().read_model(str(xml))
    with _third_party_output():  # NNCF's progress bar
        return nncf.compress_weights(model, mode=mode, group_size=group_size, ratio=1.0,
                                     all_layers=False, backup_mode=backup)


def _copy_side_files(ir_dir: Path, gptq_dir: Path, out_dir: Path, hf) -> None:
    shutil.copy2(ir_dir / "config.json", out_dir / "config.json")
    files.copy_aux_files(gptq_dir, out_dir)
    fix_generation_config(hf, gptq_dir, out_dir)
    write_tokenizers(hf, out_dir)


def write_tokenizers(hf, out_dir: Path) -> None:
    """openvino_tokenizer/detokenizer.xml (with the chat template) from the HF tokenizer."""
    if not hf.chat_template:
        raise InputError(f"the tokenizer of {out_dir.name} has no chat template")
    tok, detok = convert_tokenizer(hf, with_detokenizer=True)
    _save(tok, out_dir / ir.TOKENIZER_XML)
    _save(detok, out_dir / ir.DETOKENIZER_XML)


def _save(ov_model, path: Path, **kwargs) -> None:
    """``ov.save_model``, its failure one line naming the file. OpenVINO's serializer reports a
    full disk as "basic_ios::clear: iostream error": ``files`` names the disk when it is full."""
    try:
        ov.save_model(ov_model, str(path), **kwargs)
    except RuntimeError as exc:
        raise ExportError(f"OpenVINO could not write {path}: {first_line(exc)}") from exc


def fix_generation_config(hf, src_dir: Path, out_dir: Path) -> list[int]:
    """generation_config.json whose eos ids include <|im_end|>; returns the eos ids."""
    im_end = hf.convert_tokens_to_ids(ir.IM_END)
    if im_end is None or im_end == hf.unk_token_id:
        raise InputError(f"the tokenizer in {src_dir} has no {ir.IM_END} token (not a ChatML chat model)")
    src = Path(src_dir) / "generation_config.json"
    config = files.read_json(src, "generation config") if src.is_file() else {}
    eos = config.get("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if im_end not in eos:
        eos.insert(0, im_end)
    config["eos_token_id"] = eos
    config.setdefault("pad_token_id", hf.pad_token_id)
    files.write_json(out_dir / "generation_config.json", config)
    return eos


def verify_ir(ir_dir: Path, ckpt) -> int:
    """Read the written IR back, compare its INT4 constants, generate a token; returns constants checked."""
    ir.check_ir_files(ir_dir, error=ExportError)
    try:
        model = ov.Core().read_model(str(ir_dir / ir.MODEL_XML))
    except RuntimeError as exc:
        raise ExportError(f"the written IR in {ir_dir} does not read back: "
                          f"{str(exc).strip().splitlines()[0]}") from None
    checked = int4.verify_constants(model, ckpt)
    del model
    smoke_generate(ir_dir)
    return checked


def smoke_generate(model_dir: Path, prompt: str = "写一首唐诗", max_new_tokens: int = 1) -> str:
    """Compile the IR with openvino-genai and generate; an ExportError if it does not run."""
    try:
        pipe = openvino_genai.LLMPipeline(str(model_dir), "CPU")
        config = pipe.get_generation_config()
        config.max_new_tokens = max_new_tokens
        config.do_sample = False
        return str(pipe.generate(prompt, config))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"the exported IR in {model_dir} does not run in openvino-genai: {first}") from None
