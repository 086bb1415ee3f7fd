"""An ONNX Runtime GenAI model directory read without onnxruntime: its config, initializers, bytes.

The directory is what ONNX Runtime GenAI's model builder writes: ``genai_config.json`` (the
decoder's file name, its shape, the search defaults), the decoder ``model.onnx`` whose
initializers lie in an external data file, and the tokenizer files. Initializers are read one at
a time from the external file at their recorded offset (a 7B decoder is never held whole), and
every external location must lie inside the directory.
"""

from __future__ import annotations

from pathlib import Path

from tangquant import checkpoint
from tangquant.card import CARD, RANDOM_WEIGHTS
from tangquant.errors import InputError
from tangquant.files import parsing, read_json

GENAI_CONFIG = "genai_config.json"
KIND = "ortgenai"
NO_ONNX = "the onnx package is not installed: pip install 'tangquant[ortgenai]'"


def is_model_dir(path) -> bool:
    """A directory holding ``genai_config.json`` (and so not a Hugging Face or OpenVINO one)."""
    p = Path(path)
    return p.is_dir() and (p / GENAI_CONFIG).is_file()


def config(path) -> dict:
    """``genai_config.json`` checked, as the Hugging Face-style keys the bench and loader read."""
    path = checkpoint.open_dir(path, "ONNX Runtime GenAI model directory")
    raw = read_json(path / GENAI_CONFIG, "ONNX Runtime GenAI config")
    model = raw.get("model")
    decoder = model.get("decoder") if isinstance(model, dict) else None
    if not isinstance(decoder, dict) or not isinstance(model.get("vocab_size"), int):
        raise InputError(f"{path / GENAI_CONFIG} has no model.decoder or model.vocab_size; build the "
                         "directory again with `tangquant export --format ortgenai`")
    onnx_file = decoder_file(path, raw)
    if not onnx_file.is_file():
        raise InputError(f"{path} lacks its decoder {onnx_file.name} (named in {GENAI_CONFIG}); copy or "
                         "export it again")
    out = {"model_type": model.get("type"), "vocab_size": model["vocab_size"],
           "max_position_embeddings": model.get("context_length"), "decoder_file": onnx_file.name}
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_size"):
        if isinstance(decoder.get(key), int):
            out[key] = decoder[key]
    card = path / CARD
    if card.is_file() and RANDOM_WEIGHTS in card.read_text(encoding="utf-8", errors="replace"):
        out["tangquant_random_weights"] = True
    return out


def decoder_file(path: Path, raw: dict | None = None) -> Path:
    raw = raw if raw is not None else read_json(Path(path) / GENAI_CONFIG, "ONNX Runtime GenAI config")
    name = raw["model"]["decoder"].get("filename", "model.onnx")
    return checkpoint.inside(Path(path), name, GENAI_CONFIG)


def _onnx():
    try:
        import onnx
    except ImportError:
        raise InputError(NO_ONNX) from None
    return onnx


def graph(path):
    """The decoder's ONNX graph, its initializers' data left in their external file."""
    onnx = _onnx()
    f = decoder_file(Path(path))
    with parsing(f, "ONNX model", "build the directory again"):
        return onnx.load(str(f), load_external_data=False).graph


def _external(tensor) -> dict | None:
    from onnx import TensorProto

    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in tensor.external_data}


def nbytes(tensor) -> int:
    ext = _external(tensor)
    if ext is not None:
        return int(ext["length"])
    import numpy as np
    from onnx import helper

    if tensor.raw_data:
        return len(tensor.raw_data)
    count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def array(path: Path, tensor):
    """One initializer as numpy, read from its external file (inside ``path``) when it lies there."""
    import numpy as np
    from onnx import helper, numpy_helper

    ext = _external(tensor)
    if ext is None:
        return numpy_helper.to_array(tensor)
    f = checkpoint.inside(Path(path), ext["location"], f"{tensor.name}'s external data")
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    length, offset = int(ext["length"]), int(ext.get("offset", 0))
    with parsing(f, "ONNX external data", "build the directory again"):
        data = np.fromfile(f, dtype=np.uint8, count=length, offset=offset)
    if data.size != length:
        raise InputError(f"{f} is truncated: {tensor.name} needs bytes {offset}..{offset + length}")
    return data.view(dtype).reshape(tuple(tensor.dims))


def per_token(path: Path, options: dict) -> dict:
    """Weight bytes read per decoded token: every initializer, but one row of an embedding table
    only a Gather on ``input_ids`` reads (a table the lm_head shares is read in full). The rotary
    cos/sin caches are counted in full (a few MB at 7B)."""
    g = graph(path)
    sizes = {t.name: (nbytes(t), list(t.dims)) for t in g.initializer}
    readers: dict[str, set[str]] = {}
    for node in g.node:
        for i, name in enumerate(node.input):
            readers.setdefault(name, set()).add(node.op_type if i == 0 else "other")
    embed = [n for node in g.node if "input_ids" in node.input[1:] and node.op_type.startswith("Gather")
             for n in node.input[:1] if n in sizes and readers.get(n) == {node.op_type}]
    total = sum(b for b, _ in sizes.values())
    table = sum(sizes[n][0] for n in embed)
    row = sum(sizes[n][0] // max(1, sizes[n][1][0]) for n in embed if sizes[n][1])
    return {"bytes_per_token": total - table + row, "weights_bytes": total,
            "embedding_bytes_skipped": table - row, "adapter_bytes": 0}
