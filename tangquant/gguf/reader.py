"""Read a GGUF back: its tensors dequantised with gguf's own numpy code, and its Qwen2 config.

This is both the export's check (every Q4_0 tensor must dequantise to exactly
the checkpoint's weights) and what lets ``tangquant eval`` score any Qwen2 GGUF
— tangquant's or llama-quantize's — as a plain fp32 torch model.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from tangquant.errors import InputError
from tangquant.files import parsing
from tangquant.gguf.names import RANDOM, layout_digest, tensor_names


def open_reader(path) -> gguf.GGUFReader:
    with parsing(path, "GGUF file", "export it again"):
        return gguf.GGUFReader(str(path))


def field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.get_field(key)
    return default if f is None else f.contents()


def config(reader: gguf.GGUFReader, where) -> dict:
    """The Hugging Face ``config.json`` of a qwen2 GGUF, from its metadata."""
    arch = field(reader, "general.architecture")
    if arch != "qwen2":
        raise InputError(f"{where}: a {arch!r} GGUF; tangquant reads qwen2 GGUFs")
    key = lambda k, d=None: field(reader, f"qwen2.{k}", d)  # noqa: E731
    names = {t.name for t in reader.tensors}
    heads = int(key("attention.head_count"))
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
            "hidden_size": int(key("embedding_length")), "intermediate_size": int(key("feed_forward_length")),
            "num_hidden_layers": int(key("block_count")), "num_attention_heads": heads,
            "num_key_value_heads": int(key("attention.head_count_kv", heads)),
            "max_position_embeddings": int(key("context_length")),
            "rope_theta": float(key("rope.freq_base", 10000.0)),
            "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
            "vocab_size": len(field(reader, "tokenizer.ggml.tokens")),
            "tie_word_embeddings": "output.weight" not in names,
            "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
            "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id"), "use_cache": True,
            "tangquant_random_weights": field(reader, "general.description") == RANDOM}


def dequantized(tensor: gguf.ReaderTensor) -> np.ndarray:
    """One tensor in fp32, [rows, cols] as in PyTorch, by gguf's dequantiser."""
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists ne0 (the row length) first
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(shape)


def state_dict(path) -> tuple[dict, dict]:
    """(config, {HF name: fp32 torch tensor}) of a qwen2 GGUF."""
    import torch

    reader = open_reader(path)
    cfg = config(reader, path)
    names = tensor_names(cfg["num_hidden_layers"])
    state = {}
    for t in reader.tensors:
        if t.name not in names:
            raise InputError(f"{path}: tensor {t.name} has no place in a qwen2 model")
        state[names[t.name]] = torch.from_numpy(dequantized(t).copy())
    return cfg, state


def bytes_per_token(path) -> dict:
    """Weight bytes read per decoded token, counted as ``measure.roofline`` counts them: every
    tensor once, but one row of token_embd when an output head is separate (tied, it is the head)."""
    tensors = {t.name: t for t in open_reader(path).tensors}
    total = sum(int(t.n_bytes) for t in tensors.values())
    emb = tensors.get("token_embd.weight")
    skipped = 0
    if emb is not None and "output.weight" in tensors:
        skipped = int(emb.n_bytes) - int(emb.n_bytes) // int(emb.shape[1])  # shape[1]: rows (ne1)
    return {"bytes_per_token": total - skipped, "weights_bytes": total, "embedding_bytes_skipped": skipped,
            "adapter_bytes": 0}


def origin(path) -> dict:
    """Who made the GGUF at ``path``: ``{"origin": "tangquant", "by": ...}`` when tangquant's writer
    stamped it and its stamped tensor still has the stamped bytes; ``llama-quantize`` when a
    stamped file's tensor was re-quantized (llama.cpp's quantizer copies every metadata key, not
    the tensors it changes: the anchors, ``tangquant.measure.anchor``); otherwise the outside tool as far as the
    metadata names it (``general.quantized_by``), else ``outside``."""
    r = open_reader(path)
    by, digest = field(r, "tangquant.origin"), field(r, "tangquant.digest")
    if not by or not digest or ":" not in str(digest):
        named = field(r, "general.quantized_by")
        return {"origin": str(named) if named else "outside", "by": "no tangquant stamp"}
    name, _, want = str(digest).rpartition(":")
    tensor = next((t for t in r.tensors if t.name == name), None)
    layout = [f"{t.name}={t.tensor_type.name}" for t in r.tensors]
    same = tensor is not None and layout_digest(layout, np.asarray(tensor.data).tobytes()) == want
    if same:
        return {"origin": "tangquant", "by": str(by)}
    return {"origin": "llama-quantize", "by": f"re-quantized from a file written by {by}"}


def find(path) -> Path:
    """The GGUF file of ``path``: the file itself, or the one ``*.gguf`` in a directory."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return p.resolve()
    found = sorted(p.glob("*.gguf")) if p.is_dir() else []
    if len(found) != 1:
        raise InputError(f"{p} is not a .gguf file nor a directory holding exactly one"
                         + (f" (it holds {len(found)})" if found else ""))
    return found[0].resolve()
