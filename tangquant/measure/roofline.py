"""Bytes read per decoded token, from a model's real weights, for the decode roofline.

Decoding one token reads every weight once, except the input embedding table,
of which only one row is read (a Gather); the lm_head is read in full. With
tied embeddings the one table is the lm_head too, so it is counted in full.
KV-cache reads (they grow with the context) are not counted.

Nothing is loaded: OpenVINO IRs are read from their ``.xml`` (each Constant's
byte size and the graph's edges), Hugging Face checkpoints from the
safetensors headers.

The roofline's bandwidth is :func:`read_bandwidth`, a read-only kernel: decode
reads weights and writes almost nothing, while STREAM copy and triad also write
(and a write costs a read for ownership too), so they understate what decode can reach.
"""

from __future__ import annotations

import json
import struct
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from tangquant.errors import BenchError

_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
             "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_FLOAT = ("F32", "F16", "BF16", "F64")
_LOAD_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_PASS_THROUGH = {"Convert", "Subtract", "Multiply", "Reshape", "Unsqueeze", "Squeeze",
                 "Constant", "Transpose"}


def _ir_graph(xml_path: Path):
    root = ET.parse(xml_path).getroot()
    layers = {}
    for layer in root.iter("layer"):
        data = layer.find("data")
        layers[layer.get("id")] = {"type": layer.get("type"), "name": layer.get("name"),
                                   "data": dict(data.attrib) if data is not None else {}}
    producers: dict[tuple[str, str], str] = {}  # (to_layer, to_port) -> from_layer
    consumers: dict[str, set[str]] = {}
    for edge in root.iter("edge"):
        src, dst = edge.get("from-layer"), edge.get("to-layer")
        producers[(dst, edge.get("to-port"))] = src
        consumers.setdefault(src, set()).add(dst)
    return layers, producers, consumers


def _inputs_of(layer_id: str, producers) -> list[str]:
    return [src for (dst, _), src in producers.items() if dst == layer_id]


def ir_weight_bytes(ir_dir: Path, xml_name: str = "openvino_model.xml") -> dict:
    """Total constant bytes of an IR and the bytes of its input-embedding table."""
    xml_path = Path(ir_dir) / xml_name
    if not xml_path.is_file():
        raise BenchError(f"{ir_dir} has no {xml_name}")
    layers, producers, consumers = _ir_graph(xml_path)
    total = sum(int(l["data"].get("size", 0)) for l in layers.values() if l["type"] == "Const")
    embed, rows = _ir_embedding(layers, producers, consumers)
    return {"weights_bytes": total, "embedding_bytes": embed, "embedding_rows": rows}


def _ir_embedding(layers, producers, consumers) -> tuple[int, int]:
    """(bytes, rows) of the constants feeding the Gather on input_ids, or (0, 0) if shared/absent."""
    ids = [i for i, l in layers.items() if l["type"] == "Parameter" and l["name"] == "input_ids"]
    frontier, seen = list(ids), set(ids)
    gather = None
    while frontier and gather is None:  # follow input_ids through Converts to the Gather
        for nxt in consumers.get(frontier.pop(), ()):
            if layers[nxt]["type"] == "Gather":
                gather = nxt
                break
            if layers[nxt]["type"] == "Convert" and nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    if gather is None:
        return 0, 0
    table = producers.get((gather, "0"))
    sub, stack = set(), [table]
    while stack:  # the decompression subgraph: Const -> Convert -> Subtract -> Multiply ...
        node = stack.pop()
        if node in sub or node is None or layers[node]["type"] not in _PASS_THROUGH | {"Const"}:
            continue
        sub.add(node)
        stack.extend(_inputs_of(node, producers))
    if any(c not in sub and c != gather for n in sub for c in consumers.get(n, ())):
        return 0, 0  # tied: the lm_head reads the same table in full
    consts = [layers[n] for n in sub if layers[n]["type"] == "Const"]
    big = max(consts, key=lambda l: int(l["data"].get("size", 0)))
    rows = int(big["data"].get("shape", "0").split(",")[0] or 0)
    return sum(int(l["data"].get("size", 0)) for l in consts), rows


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def checkpoint_weight_bytes(model_dir: Path, load_dtype: str | None = None) -> dict:
    """Weight bytes of a safetensors checkpoint as loaded (float tensors cast to ``load_dtype``)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise BenchError(f"{model_dir} holds no *.safetensors weights")
    total, embed, rows, names = 0, 0, 0, set()
    for f in files:
        for name, info in _safetensors_header(f).items():
            numel = 1
            for d in info["shape"]:
                numel *= d
            item = _ST_BYTES.get(info["dtype"], 4)
            if load_dtype and info["dtype"] in _FLOAT:
                item = _LOAD_BYTES[load_dtype]
            total += numel * item
            names.add(name)
            if name.endswith("embed_tokens.weight"):
                embed, rows = numel * item, info["shape"][0]
    if not any(n.endswith("lm_head.weight") or n.endswith("lm_head.qweight") for n in names):
        embed, rows = 0, 0  # tied: the table doubles as the lm_head, read in full
    return {"weights_bytes": total, "embedding_bytes": embed, "embedding_rows": rows}


def adapter_bytes(adapter_dir: Path | None, load_dtype: str | None = None) -> int:
    if not adapter_dir:
        return 0
    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise BenchError(f"{adapter_dir} has no adapter_model.safetensors")
    return checkpoint_weight_bytes(Path(adapter_dir), load_dtype)["weights_bytes"]


def _per_token(w: dict, extra: int) -> dict:
    row = w["embedding_bytes"] // w["embedding_rows"] if w["embedding_rows"] else 0
    per_token = w["weights_bytes"] - w["embedding_bytes"] + row + extra
    return {"bytes_per_token": per_token, "weights_bytes": w["weights_bytes"],
            "embedding_bytes_skipped": w["embedding_bytes"] - row, "adapter_bytes": extra}


def ir_per_token(path: Path, options: dict) -> dict:
    """An OpenVINO IR's weight bytes read per decoded token (+ a runtime adapter's)."""
    return _per_token(ir_weight_bytes(path), adapter_bytes(options.get("adapter")))


def checkpoint_per_token(path: Path, options: dict) -> dict:
    """A safetensors checkpoint's, as loaded: GPTQ integers stay packed, float parts are cast
    to the load dtype (``dtype``, bf16 by default)."""
    dtype = options.get("dtype", "bf16")
    return _per_token(checkpoint_weight_bytes(path, dtype), adapter_bytes(options.get("adapter"), dtype))


def bytes_per_token(kind: str, path: Path, options: dict) -> dict:
    """Weight bytes read per decoded token for one candidate, by its engine's own count."""
    from tangquant import engines

    return engines.entry(engines.get(kind).bytes_per_token)(Path(path), options)


def gguf_per_token(path: Path, options: dict) -> dict:
    """A GGUF's (its tensors' own byte sizes; see :func:`tangquant.gguf.reader.bytes_per_token`)."""
    from tangquant.gguf.reader import bytes_per_token  # gguf and numpy, only for a GGUF

    return bytes_per_token(path)


def read_bandwidth(nbytes: int, trials: int = 6) -> float:
    """The roofline's bandwidth: the best of :func:`read_kernels`, in GB/s."""
    return max(read_kernels(nbytes, trials).values())


def read_kernels(nbytes: int, trials: int = 6) -> dict[str, float]:
    """Best GB/s of two read-only kernels over one fp32 array of ``nbytes`` (torch's threads: the
    caller sets them): a max-reduction (one vector op per load), and a matrix-vector product over
    the same bytes (decode's own access pattern, BLAS-tuned). Neither alone reaches the copy
    bandwidth on every CPU; at 2 threads torch's float sum, a cascade, is compute-bound.

    The array is written once before timing, so its pages are resident; the kernels write nothing
    of its size. Each result is checked: a kernel that skipped data is wrong, not fast.
    """
    import torch

    cols = 4096
    rows = max(1, int(nbytes) // 4 // cols)
    a = torch.ones(rows, cols)
    a[-1, -1] = 2.0  # the max lies in the last element
    x = torch.ones(cols)
    kernels = {"max": (lambda: float(a.amax()), 2.0),
               "gemv": (lambda: float(torch.mv(a, x)[-1]), cols + 1.0)}
    best = {}
    for name, (kernel, want) in kernels.items():
        best[name] = 0.0
        for _ in range(trials):
            t0 = time.perf_counter()
            got = kernel()
            best[name] = max(best[name], a.numel() * 4 / (time.perf_counter() - t0) / 1e9)
            if got != want:
                raise BenchError(f"read kernel {name} returned {got}, expected {want}")
    return best


# --- STREAM-style DRAM bandwidth, in the bench worker ----------------------------------------

def bandwidth(spec: dict) -> dict:
    """Copy (2 arrays), triad (3 arrays) and the read-only kernels on >= 1 GB fp32 tensors; best
    of several, in GB/s."""
    import torch

    torch.set_num_threads(spec["threads"])
    n = int(spec.get("bytes", 2**30)) // 4
    a, b, c = torch.empty(n), torch.ones(n), torch.full((n,), 2.0)
    a.zero_()
    best = {"copy": 0.0, "triad": 0.0}
    for _ in range(int(spec.get("trials", 6))):
        t0 = time.perf_counter()
        a.copy_(b)
        t1 = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        t2 = time.perf_counter()
        best["copy"] = max(best["copy"], 2 * 4 * n / (t1 - t0) / 1e9)
        best["triad"] = max(best["triad"], 3 * 4 * n / (t2 - t1) / 1e9)
    if float(a[n // 2]) != 7.0:
        raise RuntimeError("triad gave a wrong result")
    del a, b, c
    reads = read_kernels(4 * n, int(spec.get("trials", 6)))
    return {"copy_gbs": best["copy"], "triad_gbs": best["triad"], "array_bytes": 4 * n,
            "read_gbs": max(reads.values()), "read_kernels_gbs": reads, "torch": torch.__version__}
