"""Export a GPTQ INT4 checkpoint to an OpenVINO IR or a GGUF file that keeps its exact integers.

``--format openvino``:
The checkpoint is dequantised into a temporary fp16 model, exported by
optimum-intel as a stateful text-generation IR and compressed by NNCF to INT4
with the checkpoint's group size (embeddings and lm_head INT8, or fp16); the
INT4 constants NNCF computed are then replaced by the checkpoint's integers,
scales and zero points. Before the directory is published it is read back,
every INT4 constant is compared with the checkpoint, and it is compiled and
made to generate a token with openvino-genai.

``--format gguf`` (llama.cpp, llama-server, ollama): a symmetric GPTQ checkpoint without
act-order is exactly Q4_0; its integers and fp16 scales are copied into Q4_0 blocks
(token embeddings ``--gguf-embeddings q8_0`` or ``f16``; the output head ``--gguf-head``, which a
tied table is; biases and norms f32), with Qwen2 metadata, the tokenizer and the chat template. Before the directory is
published the file is read back and every Q4_0 tensor must dequantise to exactly the
checkpoint's weights; then llama.cpp loads it and generates tokens.

``--format ortgenai`` (ONNX Runtime GenAI, ``pip install 'tangquant[ortgenai]'``): the checkpoint
through ONNX Runtime GenAI's own model builder (int4 MatMulNBits, CPU); before the directory is
published every int4 node is read back and must hold the checkpoint's integers, zero points and
scales (the builder's own int4 requantization of the fp16 lm_head is measured and reported), and
ONNX Runtime GenAI loads it and generates tokens.

Examples:
  tangquant export --model out/poet-gptq --output out/poet-ov --format openvino
  tangquant export --model out/poet-gptq --output out/poet-gguf --format gguf
  tangquant export --model out/poet-gptq --output out/poet-ort --format ortgenai
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tangquant import card, files, load, recipe
from tangquant.card import check_base_model_id
from tangquant.gptq import GPTQCheckpoint
from tangquant.recipe import param, require

logger = logging.getLogger(__name__)

HELP = ("export a GPTQ INT4 checkpoint to an OpenVINO IR, a GGUF or an ONNX Runtime GenAI model with its "
        "exact INT4 weights")
FORMATS = ("openvino", "gguf", "ortgenai")
EMBEDDINGS = ("int8", "fp16")
LM_HEADS = ("int8", "int4")
GGUF_EMBEDDINGS = ("q8_0", "f16")  # (tangquant.gguf.writer.EMBEDDINGS; not imported: that loads gguf)
GGUF_HEADS = ("q8_0", "q5_0", "q4_0", "f16")  # (tangquant.gguf.writer.HEADS)


@dataclass(frozen=True)
class ExportParams:
    format: str = param("openvino", "export format", choices=FORMATS)
    embeddings: str = param("int8", "precision of the embeddings and lm_head (openvino)", choices=EMBEDDINGS)
    lm_head: str = param("int8", "precision of the lm_head: int8 (the --embeddings precision, "
                         "NNCF) or int4 (group-wise RTN from the checkpoint's fp16 head)",
                         choices=LM_HEADS)
    lm_head_group_size: int = param(128, "group size of --lm-head int4")
    gguf_embeddings: str = param("q8_0", "type of the token embeddings of an untied model (gguf)",
                                 choices=GGUF_EMBEDDINGS)
    gguf_head: str = param("q5_0", "type of the output head, and of a tied model's one table (gguf): "
                           "round-to-nearest from the checkpoint's fp16 head by gguf-py's quantizers; q5_0 "
                           "reads fewer bytes than llama-quantize's Q6_K head at a lower KLD than its Q4_0 "
                           "file (docs/benchmarks.md)", choices=GGUF_HEADS)
    llama_check: bool = param(True, "load the GGUF in llama.cpp and generate before publishing (gguf); "
                              "--no-llama-check publishes a file whose tensors were checked exact, for a "
                              "machine whose llama.cpp cannot run")
    base_model_id: str | None = param(None, "Hub id of the base for the model card's base_model (e.g. "
                                      "Qwen/Qwen1.5-7B-Chat); default: the one the checkpoint's card names",
                                      metavar="ORG/NAME")
    check_template: bool = param(True, "render a system prompt and two turns through every chat form "
                                 "written (openvino-genai; llama.cpp and the ollama Modelfile) and refuse "
                                 "one that differs from the Hugging Face template")

    def __post_init__(self):
        require(self.format in FORMATS, f"unknown export format {self.format!r}; choose from "
                f"{', '.join(FORMATS)}")
        require(self.embeddings in EMBEDDINGS, f"embeddings must be one of {', '.join(EMBEDDINGS)}, "
                f"not {self.embeddings!r}")
        require(self.lm_head in LM_HEADS, f"lm_head must be one of {', '.join(LM_HEADS)}, not "
                f"{self.lm_head!r}")
        require(self.lm_head_group_size >= 8, f"--lm-head-group-size must be at least 8, got "
                f"{self.lm_head_group_size}")
        require(self.gguf_embeddings in GGUF_EMBEDDINGS, f"gguf_embeddings must be one of "
                f"{', '.join(GGUF_EMBEDDINGS)}, not {self.gguf_embeddings!r}")
        require(self.gguf_head in GGUF_HEADS, f"gguf_head must be one of {', '.join(GGUF_HEADS)}, not "
                f"{self.gguf_head!r}")
        check_base_model_id(self.base_model_id)


PARAMS = ExportParams


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="GPTQ INT4 checkpoint directory (tangquant quantize)")
    parser.add_argument("--output", required=True, help="output directory (the OpenVINO IR, or the GGUF "
                        "file with its Modelfile and card)")
    parser.add_argument("--force", action="store_true", help="replace an existing output")


def run(args) -> dict:
    return export(args.model, args.output, recipe.from_args(ExportParams, args), force=args.force)


def export(model, output, params: ExportParams | None = None, force: bool = False, **overrides) -> dict:
    """Export the GPTQ checkpoint ``model`` (a path or a GPTQCheckpoint) to ``output``; returns metrics."""
    p = recipe.resolve(ExportParams, params, overrides)
    ckpt = model if isinstance(model, GPTQCheckpoint) else GPTQCheckpoint.open(model)
    out = files.check_output(output, [ckpt.path], force)
    tokenizer = load.tokenizer(ckpt.path)  # opened once, handed to the builder
    if p.format == "gguf":
        return _export_gguf(ckpt, tokenizer, out, p, force)
    if p.format == "ortgenai":
        return _export_ortgenai(ckpt, tokenizer, out, p, force)
    from tangquant.ov import build  # the engine: OpenVINO, NNCF, optimum-intel

    build.check_exportable(ckpt, tokenizer)
    with files.atomic_output_dir(out, force) as tmp:
        metrics = build.write_ir_dir(ckpt, tmp, tokenizer, embeddings=p.embeddings,
                                     lineage=card.lineage(ckpt.path, p.base_model_id),
                                     lm_head=p.lm_head, lm_head_group_size=p.lm_head_group_size)
        check_chat_template(tmp, tokenizer, p.check_template, metrics)
    summary = (f"{out}  {files.human_size(metrics['size_bytes'])}  {metrics['int4_layers']} INT4 layers, "
               f"{metrics['int4_constants_checked']} constants equal to the checkpoint's; "
               f"{template_summary(metrics)}  ({metrics['seconds']:.0f} s)")
    return {"output": str(out), **metrics, "summary": summary}


def _export_gguf(ckpt: GPTQCheckpoint, tokenizer, out, p: ExportParams, force: bool) -> dict:
    from tangquant.gguf import build  # the engine: gguf (and llama-cpp-python for the check)

    build.check_exportable(ckpt)  # asymmetric or act-order: refused before anything is written
    with files.atomic_output_dir(out, force) as tmp:
        metrics = build.write_gguf_dir(ckpt, tmp, tokenizer, embeddings=p.gguf_embeddings,
                                       base_model_id=p.base_model_id, llama_check=p.llama_check,
                                       head=p.gguf_head)
        check_chat_template(tmp, tokenizer, p.check_template, metrics)
    summary = (f"{out / metrics['file']}  {files.human_size(metrics['size_bytes'])}  "
               f"{metrics['q4_0_tensors_exact']} Q4_0 tensors equal to the checkpoint's; "
               f"llama.cpp: {metrics['llama_cpp_check']}; {template_summary(metrics)}  "
               f"({metrics['seconds']:.0f} s)")
    return {"output": str(out), **metrics, "summary": summary}


def _export_ortgenai(ckpt: GPTQCheckpoint, tokenizer, out, p: ExportParams, force: bool) -> dict:
    from tangquant.ortgenai import build  # the engine: onnxruntime-genai's builder, onnx

    build.check_exportable(ckpt)  # not installed, not 4-bit, act-order: refused before anything is written
    with files.atomic_output_dir(out, force) as tmp:
        metrics = build.write_dir(ckpt, tmp, tokenizer, card.lineage(ckpt.path, p.base_model_id))
    head = ", ".join(f"{m} requantized int4 by the builder" for m in metrics["requantized"])
    summary = (f"{out}  {files.human_size(metrics['size_bytes'])}  {metrics['int4_layers_exact']} int4 nodes "
               f"equal to the checkpoint's{'; ' + head if head else ''}; onnxruntime-genai: "
               f"{metrics['ortgenai_check']}  ({metrics['seconds']:.0f} s)")
    return {"output": str(out), **metrics, "summary": summary}


def check_chat_template(out_dir, tokenizer, enabled: bool, metrics: dict) -> None:
    """Every chat form in ``out_dir`` against the HF template, before the directory is published;
    the verdicts go into the metrics and the manifest."""
    from tangquant.errors import ChatTemplateError
    from tangquant.measure import chat_forms

    if not enabled:
        metrics["chat_template"] = "not checked (--no-check-template)"
    else:
        report = chat_forms.compare(tokenizer, out_dir)
        bad = chat_forms.mismatches(report)
        if bad:
            raise ChatTemplateError(f"the chat template renders differently in {'; '.join(bad)}; nothing "
                                    "was written (--no-check-template writes it anyway)")
        metrics["chat_template"] = report or "no chat template"
    manifest = files.read_manifest(out_dir)
    if manifest is not None:
        manifest.setdefault("metrics", {})["chat_template"] = metrics["chat_template"]
        files.write_json(out_dir / files.MANIFEST, manifest)


def template_summary(metrics: dict) -> str:
    verdicts = metrics.get("chat_template")
    if not isinstance(verdicts, dict):
        return f"chat template {verdicts}"
    same = [form for form, v in verdicts.items() if v == "same"]
    skipped = [form for form, v in verdicts.items() if v != "same"]
    return ("chat template rendered alike by HF" + "".join(f", {f}" for f in same)
            + (f" ({', '.join(skipped)} skipped)" if skipped else ""))
