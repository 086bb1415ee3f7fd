"""A Qwen2 GGUF file, as llama.cpp's ``convert_hf_to_gguf.py`` lays one out.

Architecture ``qwen2``: context length, embedding and feed-forward sizes, block
count, heads, KV heads, rope theta and RMS-norm epsilon from ``config.json``;
tensors named by gguf's own Qwen2 tensor map (``blk.N.attn_q.weight``...). GPTQ
layers become Q4_0 (:mod:`tangquant.gguf.q4`), the embeddings and an untied
output head ``q8_0`` or ``f16``, biases and norms f32. A tied head is not
written: llama.cpp reads ``token_embd`` as the output then, as for Qwen's own files.
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
from tangquant.gguf.names import HEADS, RANDOM, gguf_name, name_map
from tangquant.gptq import GPTQCheckpoint, QuantizedLinear

logger = logging.getLogger(__name__)

EMBEDDINGS = ("q8_0", "f16")
TYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "f16": gguf.GGMLQuantizationType.F16,
         "f32": gguf.GGMLQuantizationType.F32}


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


def add_metadata(w: gguf.GGUFWriter, config: dict, name: str, file_type: int) -> None:
    heads = config["num_attention_heads"]
    w.add_name(name)
    if config.get("tangquant_random_weights"):
        w.add_description(RANDOM)
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


def encode(hf_name: str, value, embeddings: str) -> tuple[np.ndarray, object]:
    """(array, raw dtype) of one tensor: Q4_0 for GPTQ layers, q8_0/f16 heads, f32 vectors, and
    f16 for any other float matrix (a full-precision model's linears, for the f16 anchor)."""
    if isinstance(value, QuantizedLinear):
        return q4.pack(hf_name.rpartition(".")[0], value), gguf.GGMLQuantizationType.Q4_0
    data = value.detach().to(torch.float32).numpy()
    if data.ndim == 1:
        return data, TYPES["f32"]
    kind = embeddings if hf_name in HEADS else "f16"
    if kind == "f16":
        return data.astype(np.float16), TYPES["f16"]
    return gguf.quants.quantize(data, TYPES[kind]), TYPES[kind]


def checkpoint_tensors(ckpt: GPTQCheckpoint) -> Iterator[tuple[str, object]]:
    """(HF name, QuantizedLinear or float tensor) for every tensor of a GPTQ checkpoint."""
    for module, layer, bias in ckpt.layers():
        yield f"{module}.weight", layer
        if bias is not None:
            yield f"{module}.bias", bias
    yield from ckpt.tensors()


def write(path: Path, config: dict, tokenizer, tokenizer_dir: Path, tensors: Iterable[tuple[str, object]],
          embeddings: str = "q8_0", file_type: int = gguf.LlamaFileType.MOSTLY_Q4_0,
          name: str = "model") -> dict:
    """Write the GGUF at ``path`` (``tokenizer``: the Hugging Face tokenizer of ``tokenizer_dir``, whose
    tokenizer.json and special tokens gguf-py reads); returns {tensors: {type: count}, tokenizer metrics}."""
    check_config(config, tokenizer_dir)
    tmap = name_map(config["num_hidden_layers"])
    w = gguf.GGUFWriter(str(path), "qwen2", use_temp_file=True)
    add_metadata(w, config, name, file_type)
    tok = vocab.add_tokenizer(w, tokenizer, Path(tokenizer_dir), config["vocab_size"])
    tied = bool(config.get("tie_word_embeddings"))
    counts: dict[str, int] = {}
    seen = set()
    for hf_name, value in tensors:
        if hf_name == "lm_head.weight" and tied:
            continue  # the same table as token_embd, which llama.cpp reads as the output
        data, raw = encode(hf_name, value, embeddings)
        w.add_tensor(gguf_name(tmap, hf_name), data, raw_dtype=raw)
        counts[raw.name] = counts.get(raw.name, 0) + 1
        seen.add(hf_name)
    if not tied and "lm_head.weight" not in seen:
        raise InputError(f"{tokenizer_dir}: the model's head is untied but there is no lm_head.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"tensor_types": counts, "tensor_count": sum(counts.values()), "tokenizer": tok}
