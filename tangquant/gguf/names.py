"""The names a qwen2 GGUF and a Hugging Face Qwen2 checkpoint share, in one place for the writer,
the reader and the export's check (gguf-py keeps its own constants the same way, in one module).
"""

from __future__ import annotations

import hashlib

import gguf

from tangquant.card import RANDOM_WEIGHTS as RANDOM  # noqa: F401 (the reader checks it)
from tangquant.errors import InputError

ARCH = "qwen2"
HEADS = ("model.embed_tokens.weight", "lm_head.weight")
LAYER_TENSORS = ("self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
                 "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias",
                 "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                 "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")
TOP_TENSORS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def name_map(n_layers: int):
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, n_layers)


def gguf_name(tmap, hf_name: str) -> str:
    name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise InputError(f"tensor {hf_name} has no place in a qwen2 GGUF")
    return name


def tensor_names(n_layers: int) -> dict[str, str]:
    """GGUF name -> Hugging Face name of every tensor a qwen2 GGUF may hold."""
    tmap = name_map(n_layers)
    hf = list(TOP_TENSORS) + [f"model.layers.{i}.{t}" for i in range(n_layers) for t in LAYER_TENSORS]
    return {gguf_name(tmap, n): n for n in hf}


def layout_digest(layout: list[str], first: bytes) -> str:
    """SHA-256 of the tensors' ``name=TYPE`` lines, in file order, and the first quantized tensor's
    bytes: what the writer stamps and the reader recomputes."""
    return hashlib.sha256("\n".join(layout).encode() + hashlib.sha256(first).digest()).hexdigest()
