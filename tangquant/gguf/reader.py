"""Read a GGUF back: its tensors dequantised with gguf's own numpy code, and its Qwen2 config.

This is both the export's check (every Q4_0 tensor must dequantise to exactly
the checkpoint's weights) and what lets ``tangquant eval`` score any Qwen2 GGUF
— tangquant's or llama-quantize's — as a plain fp32 torch model.

Nothing a file says is taken on its word: the counts in its header are bounded by
the bytes that follow them before gguf-py walks them (it builds one object per array
element, so a claimed length is memory), and the metadata must agree with the tensors
present (layers, embedding size, heads, vocabulary) before a config is built from it.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path

import gguf
import numpy as np

from tangquant import counts
from tangquant.errors import InputError, NumericalError, short
from tangquant.files import parsing
from tangquant.gguf.names import RANDOM, layout_digest, tensor_names

# The longest array a model's metadata holds is its vocabulary (Qwen's 151,936 tokens and
# 151,387 merges); gguf-py makes several Python objects per element, so more is refused.
MAX_ARRAY = 1 << 21
_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # type: bytes
_STRING, _ARRAY = 8, 9
FIX = "the file is corrupt or was not written for a qwen2 model: export or convert it again"


def open_reader(path) -> gguf.GGUFReader:
    check_header(path)
    with parsing(path, "GGUF file", "export it again"):
        return gguf.GGUFReader(str(path))


def check_header(path) -> None:
    """Refuse counts (key-values, tensors, array lengths, string lengths) that the file's bytes
    cannot hold, before gguf-py walks them."""
    with parsing(path, "GGUF file", "export it again"), open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 24:
            raise InputError(f"GGUF file {path} is {size} bytes, too short for a GGUF header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[:4] != b"GGUF":
                raise InputError(f"{path} is not a GGUF file (no GGUF magic)")
            (version,) = struct.unpack_from("<I", data, 4)
            if version not in (2, 3):
                raise InputError(f"GGUF file {path} is version {short(version)}; gguf reads 2 and 3")
            n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
            _bounded(n_tensors, (size - 24) // 24, "tensor count", path)
            _bounded(n_kv, (size - 24) // 12, "metadata count", path)
            offset = 24
            for _ in range(n_kv):
                offset = _skip_string(data, offset, size, path)
                (kind,) = _unpack("<I", data, offset, size, path)
                offset = _skip_value(data, offset + 4, kind, size, path, depth=0)


def _unpack(fmt: str, data, offset: int, size: int, path):
    if offset + struct.calcsize(fmt) > size:
        raise InputError(f"GGUF file {path} ends inside its metadata; {FIX}")
    return struct.unpack_from(fmt, data, offset)


def _bounded(count: int, most: int, what: str, path) -> None:
    if count > most:
        raise InputError(f"GGUF file {path} claims {count} as its {what}, more than its bytes (or "
                         f"any vocabulary, {MAX_ARRAY}) allow: at most {most}; {FIX}")


def _skip_string(data, offset: int, size: int, path) -> int:
    (n,) = _unpack("<Q", data, offset, size, path)
    _bounded(n, size - offset - 8, "string length", path)
    return offset + 8 + n


def _skip_value(data, offset: int, kind: int, size: int, path, depth: int) -> int:
    if kind in _SCALARS:
        return offset + _SCALARS[kind]
    if kind == _STRING:
        return _skip_string(data, offset, size, path)
    if kind != _ARRAY or depth > 2:
        raise InputError(f"GGUF file {path} holds a metadata value of unknown type {kind}; {FIX}")
    item, n = _unpack("<IQ", data, offset, size, path)
    offset += 12
    _bounded(n, min(MAX_ARRAY, (size - offset) // _SCALARS.get(item, 8)), "array length", path)
    if item in _SCALARS:
        return offset + n * _SCALARS[item]
    for _ in range(n):
        offset = _skip_value(data, offset, item, size, path, depth + 1)
    return offset


def field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.get_field(key)
    return default if f is None else f.contents()


def _count(reader: gguf.GGUFReader, key: str, where, default=None) -> int:
    """A positive integer of the metadata (a count or a size), or one line naming the key."""
    value = field(reader, key, default)
    if value is None:
        raise InputError(f"{where}: the GGUF has no {key}; {FIX}")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{where}: {key} must be a positive integer, got {short(value)}; {FIX}")
    return int(value)


def config(reader: gguf.GGUFReader, where) -> dict:
    """The Hugging Face ``config.json`` of a qwen2 GGUF, from its metadata checked against its
    tensors (see :func:`check_shapes`)."""
    arch = field(reader, "general.architecture")
    if arch != "qwen2":
        raise InputError(f"{where}: a {short(arch)} GGUF; tangquant reads qwen2 GGUFs")
    key = lambda k, d=None: _count(reader, f"qwen2.{k}", where, d)  # noqa: E731
    names = {t.name for t in reader.tensors}
    heads = key("attention.head_count")
    tokens = field(reader, "tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        raise InputError(f"{where}: the GGUF has no tokenizer.ggml.tokens list; {FIX}")
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
           "hidden_size": key("embedding_length"), "intermediate_size": key("feed_forward_length"),
           "num_hidden_layers": key("block_count"), "num_attention_heads": heads,
           "num_key_value_heads": key("attention.head_count_kv", heads),
           "max_position_embeddings": key("context_length"),
           "rope_theta": _real(reader, "qwen2.rope.freq_base", 10000.0, where),
           "rms_norm_eps": _real(reader, "qwen2.attention.layer_norm_rms_epsilon", 1e-6, where),
           "vocab_size": len(tokens), "tie_word_embeddings": "output.weight" not in names,
           "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
           "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
           "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id"), "use_cache": True,
           "tangquant_random_weights": field(reader, "general.description") == RANDOM}
    check_shapes(cfg, {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}, where)
    return cfg


def _real(reader, key: str, default: float, where) -> float:
    value = field(reader, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not (
            math.isfinite(value) and value > 0):
        raise InputError(f"{where}: {key} must be a positive number, got {short(value)}; {FIX}")
    return float(value)


def check_shapes(cfg: dict, shapes: dict[str, tuple[int, ...]], where) -> None:
    """The metadata against the tensors present, by the checks every config gets
    (:func:`tangquant.counts.check_counts`), under the tensors' Hugging Face names and
    [out, in] shapes (GGUF lists ne0, the row length, first)."""
    blocks = {n.split(".")[1] for n in shapes if n.startswith("blk.")}
    names = tensor_names(len(blocks))  # the blocks present, whatever block_count claims
    hf = {names.get(n, n): tuple(reversed(shape)) for n, shape in shapes.items()}
    counts.check_counts(cfg, hf, where, "the GGUF metadata", FIX)
    if "model.embed_tokens.weight" not in hf:
        raise InputError(f"{where}: the GGUF has no token_embd.weight; {FIX}")


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


# Quantized types whose blocks start with their fp16 scale (and the _1 types' fp16 minimum):
# a block is finite exactly when those are, so only they are read.
_LEADING_F16 = {gguf.GGMLQuantizationType.Q4_0: 1, gguf.GGMLQuantizationType.Q5_0: 1,
                gguf.GGMLQuantizationType.Q8_0: 1, gguf.GGMLQuantizationType.Q4_1: 2,
                gguf.GGMLQuantizationType.Q5_1: 2}
_CHUNK = 1 << 24  # bytes per step, so a 7B file is never held twice


def require_finite(path) -> None:
    """Refuse a GGUF with a NaN or Inf in any tensor (a norm, a bias, a block's scale), naming
    the tensor. llama.cpp quantizes activations to 8 bits with a max-abs scale that skips NaN,
    so one NaN weight can give finite, wrong logits: the bench must look at the weights."""
    for t in open_reader(path).tensors:
        if not _finite(t):
            raise NumericalError(f"{t.name} in {path} holds NaN or Inf values; the file is corrupt: "
                                 "export or convert it again")


def _finite(t: gguf.ReaderTensor) -> bool:
    kind, data = t.tensor_type, t.data
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                gguf.GGMLQuantizationType.F64):
        flat = data.reshape(-1)
        step = max(1, _CHUNK // flat.itemsize)
        return all(np.isfinite(flat[i:i + step]).all() for i in range(0, flat.size, step))
    raw = data.reshape(-1)
    block, size = gguf.GGML_QUANT_SIZES[kind]
    if kind in _LEADING_F16:
        blocks = raw.reshape(-1, size)
        step = max(1, _CHUNK // size)
        return all(np.isfinite(blocks[i:i + step, :2 * _LEADING_F16[kind]].copy().view(np.float16)).all()
                   for i in range(0, len(blocks), step))
    if kind in (gguf.GGMLQuantizationType.BF16,):
        half = raw.view(np.uint16)
        return not bool(((half & 0x7F80) == 0x7F80).any())  # exponent all ones: NaN or Inf
    if kind in (gguf.GGMLQuantizationType.I8, gguf.GGMLQuantizationType.I16,
                gguf.GGMLQuantizationType.I32, gguf.GGMLQuantizationType.I64):
        return True
    rows = raw.reshape(-1, size)  # any other quantization: gguf's own dequantiser, in chunks
    step = max(1, _CHUNK // size)
    return all(np.isfinite(gguf.quants.dequantize(rows[i:i + step].reshape(-1), kind)).all()
               for i in range(0, len(rows), step))


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
