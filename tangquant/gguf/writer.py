"""A Qwen2 GGUF file, as llama.cpp's ``convert_hf_to_gguf.py`` lays one out.

Architecture ``qwen2``: context length, embedding and feed-forward sizes, block
count, heads, KV heads, rope theta and RMS-norm epsilon from ``config.json``;
tensors named by gguf's own Qwen2 tensor map (``blk.N.attn_q.weight``...). GPTQ
layers become Q4_0 (:mod:`tangquant.gguf.q4`), the token embeddings ``q8_0`` or
``f16``, the output head one of :data:`HEADS` (round-to-nearest from its fp16
weights by gguf-py's own quantizers, llama.cpp's reference ones), biases and norms
f32. A tied head is not written: llama.cpp reads ``token_embd`` as the output then,
as for Qwen's own files, so that one table is the head and takes the head's type
(as llama-quantize gives a tied table its output type, Q6_K). gguf-py 0.19 can
dequantize Q6_K but not quantize it, so the 6-bit step llama-quantize takes is not
offered; Q5_0 (5.5 bits per weight against Q6_K's 6.56) is the nearest it writes.

Every file carries who wrote it (:data:`ORIGIN_KEY`) and a digest of its layout (every
tensor's name and type) and of its first quantized tensor's bytes (:data:`DIGEST_KEY`):
llama-quantize copies every metadata key into the file it makes, but re-quantizes the
tensors whose type it changes, so a reader can tell tangquant's file from one an outside
tool re-quantized (:func:`tangquant.gguf.reader.origin`); a tensor it only copies
(same type) keeps tangquant's bytes, and a file where all did is tangquant's weights.
Tensors are spooled to a temporary file as they are added, so at most one
layer is held in memory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Iterator

import gguf
import numpy as np
import torch

from tangquant.errors import InputError
from tangquant.gguf import q4, vocab
from tangquant.gguf.names import HEADS as TABLES, RANDOM, gguf_name, layout_digest, name_map
from tangquant.gptq import GPTQCheckpoint, QuantizedLinear

logger = logging.getLogger(__name__)

EMBEDDINGS = ("q8_0", "f16")
HEADS = ("q8_0", "q5_0", "q4_0", "f16")  # what gguf-py 0.19 quantizes (no K-quants: Q6_K is read-only there)
TYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "f16": gguf.GGMLQuantizationType.F16,
         "f32": gguf.GGMLQuantizationType.F32, "q5_0": gguf.GGMLQuantizationType.Q5_0,
         "q4_0": gguf.GGMLQuantizationType.Q4_0}
ORIGIN_KEY = "tangquant.origin"          # e.g. "tangquant export", "tangquant.measure.anchor F16"
DIGEST_KEY = "tangquant.digest"          # "<first quantized tensor>:<sha256>" (see layout_digest)



def check_config(config: dict, where) -> None:
    """Refuse what llama.cpp's qwen2 graph does not compute (before anything is written)."""
    if config.get("model_type") != "qwen2":
        raise InputError(f"{where}: the GGUF export writes Qwen2 models (Qwen1.5 / Qwen2 chat), not "
                         f"model_type {config.get('model_type')!r}")
    if config.get("use_sliding_window"):
        raise InputError(f"{where}: sliding-window attention has no place in llama.cpp's qwen2 graph")
    if config.get("rope_scaling"):
        raise InputError(f"{where}: rope_scaling {config['rope_scaling']} is not written to GGUF by "
                         "tangquant; export a model without it")


def parameter_count(config: dict) -> int:
    """Weights a qwen2 GGUF of ``config`` holds (a tied head counted once), as gguf-py counts the
    tensors it writes: the size label's source."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = (config.get("num_key_value_heads") or heads) * (h // heads)
    per_layer = 2 * h * h + h + 2 * (h * kv + kv) + 3 * h * inter + 2 * h
    head = 0 if config.get("tie_word_embeddings") else config["vocab_size"] * h
    return layers * per_layer + config["vocab_size"] * h + h + head


def model_metadata(config: dict, name: str, model_dir=None) -> gguf.Metadata:
    """The file's general.* metadata as gguf-py reads it from the model card tangquant wrote (base
    model, licence, tags, sampling defaults), as llama.cpp's convert_hf_to_gguf.py does: basename,
    version and finetune from the base model's Hub id (the fine-tune named after ``name``), the
    size label from the parameter count."""
    total = parameter_count(config)
    folder = Path(model_dir) if model_dir is not None else None
    meta = gguf.Metadata.load(model_path=folder, total_params=total)
    card = gguf.Metadata.load_model_card(folder)
    meta.name = card.get("model_name") or card.get("name") or name
    base = card.get("base_model")
    base = base[0] if isinstance(base, list) and base else base
    if isinstance(base, str) and "/" in base:
        full, _, basename, finetune, version, _ = gguf.Metadata.get_model_id_components(base, total)
        meta.basename = meta.basename or basename
        meta.version = meta.version or version
        meta.finetune = meta.finetune or "-".join(p for p in (finetune, name) if p)
        if not (card.get("model_name") or card.get("name")):
            meta.name = f"{full} {name}"
    meta.size_label = meta.size_label or (gguf.size_label(total, 0, 0, 0) if total > 0 else None)
    if config.get("tangquant_random_weights"):
        meta.description = RANDOM
    return meta


def file_name(meta: gguf.Metadata, output_type: str) -> str:
    """gguf-py's naming convention (``<basename>-<size>-<finetune>-<version>-<type>.gguf``)."""
    return gguf.naming_convention(meta.name, meta.basename, meta.finetune, meta.version,
                                  meta.size_label, output_type) + ".gguf"


def add_metadata(w: gguf.GGUFWriter, config: dict, name: str, file_type: int, model_dir=None) -> None:
    heads = config["num_attention_heads"]
    model_metadata(config, name, model_dir).set_gguf_meta_model(w)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(config.get("num_key_value_heads") or heads)
    w.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def table_type(hf_name: str, embeddings: str, head: str, tied: bool) -> str:
    """The type of a table: the output head's (``lm_head``, or a tied ``embed_tokens``, which
    llama.cpp reads as the head), the embeddings' for an untied ``embed_tokens``, else f16."""
    if hf_name == "lm_head.weight" or (tied and hf_name == "model.embed_tokens.weight"):
        return head
    return embeddings if hf_name in TABLES else "f16"


def encode(hf_name: str, value, embeddings: str, head: str | None = None,
           tied: bool = False) -> tuple[np.ndarray, object]:
    """(array, raw dtype) of one tensor: Q4_0 for GPTQ layers, the tables as :func:`table_type`
    says (``head`` None: the embeddings' type), f32 vectors, and f16 for any other float matrix
    (a full-precision model's linears, for the f16 anchor)."""
    if isinstance(value, QuantizedLinear):
        return q4.pack(hf_name.rpartition(".")[0], value), gguf.GGMLQuantizationType.Q4_0
    data = value.detach().to(torch.float32).numpy()
    if data.ndim == 1:
        return data, TYPES["f32"]
    kind = table_type(hf_name, embeddings, head or embeddings, tied)
    if kind == "f16":
        return data.astype(np.float16), TYPES["f16"]
    # Round-to-nearest from the fp16 weights (the checkpoint keeps its head and table in fp16).
    return gguf.quants.quantize(data.astype(np.float16).astype(np.float32), TYPES[kind]), TYPES[kind]


def checkpoint_tensors(ckpt: GPTQCheckpoint) -> Iterator[tuple[str, object]]:
    """(HF name, QuantizedLinear or float tensor) for every tensor of a GPTQ checkpoint."""
    for module, layer, bias in ckpt.layers():
        yield f"{module}.weight", layer
        if bias is not None:
            yield f"{module}.bias", bias
    yield from ckpt.tensors()


def write(path: Path, config: dict, tokenizer, tokenizer_dir: Path, tensors: Iterable[tuple[str, object]],
          embeddings: str = "q8_0", file_type: int = gguf.LlamaFileType.MOSTLY_Q4_0,
          name: str = "model", head: str | None = None, origin: str = "tangquant export") -> dict:
    """Write the GGUF at ``path`` (``tokenizer``: the Hugging Face tokenizer of ``tokenizer_dir``, whose
    tokenizer.json and special tokens gguf-py reads); returns {tensors: {type: count}, tokenizer metrics}.
    ``head``: the output head's type (default: the embeddings'); ``origin``: who wrote the file."""
    check_config(config, tokenizer_dir)
    tmap = name_map(config["num_hidden_layers"])
    w = gguf.GGUFWriter(str(path), "qwen2", use_temp_file=True)
    add_metadata(w, config, name, file_type, model_dir=tokenizer_dir)
    tok = vocab.add_tokenizer(w, tokenizer, Path(tokenizer_dir), config["vocab_size"])
    tied = bool(config.get("tie_word_embeddings"))
    counts: dict[str, int] = {}
    seen = set()
    layout, first = [], None
    for hf_name, value in tensors:
        if hf_name == "lm_head.weight" and tied:
            continue  # the same table as token_embd, which llama.cpp reads as the output
        data, raw = encode(hf_name, value, embeddings, head, tied)
        name = gguf_name(tmap, hf_name)
        w.add_tensor(name, data, raw_dtype=raw)
        layout.append(f"{name}={raw.name}")
        if first is None and raw != TYPES["f32"]:
            first = (name, np.ascontiguousarray(data).tobytes())
        counts[raw.name] = counts.get(raw.name, 0) + 1
        seen.add(hf_name)
    if not tied and "lm_head.weight" not in seen:
        raise InputError(f"{tokenizer_dir}: the model's head is untied but there is no lm_head.weight")
    w.add_string(ORIGIN_KEY, origin)
    if first:
        w.add_string(DIGEST_KEY, f"{first[0]}:{layout_digest(layout, first[1])}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"tensor_types": counts, "tensor_count": sum(counts.values()), "tokenizer": tok}
