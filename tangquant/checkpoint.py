"""Reading and writing Hugging Face model directories without loading a model.

Weights are read through memory-mapped safetensors, one file at a time, and
written through :class:`ShardWriter`, so no stage ever holds a whole model.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Iterator

from safetensors import safe_open

from tangquant.errors import (InputError, NumericalError, PickleRefusedError, QuantizedModelError,
                              short)
from tangquant.files import existing_dir, final_name, parsing, read_json, write_json

logger = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
MAX_DIR_ENTRIES = 10_000  # a model directory holds tens of files; refuse to walk a whole disk
SAFETENSORS_FIX = "the file is corrupt or truncated: copy, download or write it again"
PICKLE_FIX = ("torch.load(weights_only=True) accepts tensors only, even with --allow-pickle: "
              "convert the weights to safetensors with the tool that made them")


def open_dir(path, what: str) -> Path:
    """An existing directory (or a Hub id's snapshot in the local cache) whose every entry
    (symlinks followed) lies inside it."""
    path = existing_dir(resolve_model(path, what), what)
    check_contained(path, what)
    return path


def resolve_model(path, what: str = "model directory") -> Path:
    """``path``, or, when no such path exists and it reads as a Hub id (``Qwen/Qwen1.5-7B-Chat``), the
    snapshot the local Hugging Face cache holds for it, found offline (``local_files_only``):
    nothing is ever downloaded."""
    from tangquant.card import is_hub_id

    if not is_hub_id(str(path)):
        return Path(path)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(path), local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise InputError(f"{what} {path} is not a directory, and the local Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}) holds no snapshot of the Hub repository {path}; "
                         f"tangquant downloads nothing: fetch it first (`hf download {path}`)") from None


def allowed_roots(model_dir: Path) -> tuple[Path, ...]:
    """Where a model directory's files may lie: itself and, for a Hugging Face cache snapshot
    (``models--org--name/snapshots/REV``, whose files are links into ``../../blobs``), its blobs."""
    root = Path(model_dir).resolve()
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        return root, root.parent.parent / "blobs"
    return (root,)


def check_contained(model_dir: Path, what: str = "model directory") -> None:
    """Refuse a directory with an entry (a symlink, at any depth) that resolves outside it."""
    root = Path(model_dir).resolve()
    seen = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            seen += 1
            entry = Path(dirpath) / name
            if entry.is_symlink() and not any(r in entry.resolve().parents for r in allowed_roots(root)):
                raise InputError(f"{entry} is a link to {entry.resolve()}, which lies outside {root}; "
                                 "refusing to read it (copy the file in instead)")
        if seen > MAX_DIR_ENTRIES:
            raise InputError(f"{what} {root} holds more than {MAX_DIR_ENTRIES} files; "
                             "is it really a model directory?")


def load_config(model_dir: Path) -> dict:
    model_dir = open_dir(model_dir, "model directory")
    if (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file():
        raise InputError(f"{model_dir} is a LoRA adapter directory, not a model; "
                         "merge it into its base first with `tangquant merge`")
    return read_json(model_dir / "config.json", "model config")


def refuse_quantized(config: dict, model_dir: Path, fix: str) -> None:
    qc = config.get("quantization_config")
    if qc:
        method = qc.get("quant_method", "unknown") if isinstance(qc, dict) else "unknown"
        raise QuantizedModelError(f"{model_dir} is already quantized ({method}); {fix}")


def weight_files(model_dir: Path, allow_pickle: bool = False) -> list[Path]:
    """The model's weight files: safetensors shards, or pickles only when allowed."""
    model_dir = Path(model_dir)
    index = model_dir / SAFE_INDEX
    if index.is_file():
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index} has no weight_map")
        files = sorted({inside(model_dir, name, index.name) for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise InputError(f"{model_dir} is missing shards named in its index: {', '.join(missing)[:200]}")
        return files
    safes = sorted(inside(model_dir, p.name, p.name) for p in model_dir.glob("*.safetensors"))
    if safes:
        return safes
    pickles = sorted(inside(model_dir, p.name, p.name) for p in model_dir.iterdir()
                     if p.suffix in PICKLE_SUFFIXES and not p.name.startswith("openvino_"))
    if not pickles and (model_dir / "openvino_model.bin").is_file():
        raise InputError(f"{model_dir} holds openvino_model.bin but no openvino_model.xml: an incomplete "
                         "OpenVINO IR; copy or export it again")
    if pickles and not allow_pickle:
        raise PickleRefusedError(
            f"{model_dir} holds only pickle weights ({pickles[0].name}); loading a pickle can run "
            "arbitrary code: convert it to safetensors, or pass --allow-pickle if you trust it")
    if pickles:
        return pickles
    raise InputError(f"{model_dir} holds no model weights (*.safetensors)")


def inside(model_dir: Path, name, referrer: str) -> Path:
    """``model_dir / name``, refused unless it stays inside ``model_dir`` (after symlinks).

    The one resolver for every file a model, adapter or checkpoint directory refers to (index
    entries, weights, tokenizer files, symlinks): see :func:`allowed_roots`.
    """
    if not isinstance(name, str) or not name or "\0" in name:
        raise InputError(f"{model_dir}/{referrer} names a file that is not a usable name: {short(name)}")
    roots = allowed_roots(model_dir)
    path = (roots[0] / name).resolve()
    if not any(root in path.parents for root in roots):
        raise InputError(f"{model_dir}/{referrer} refers to {short(name)}, which lies outside "
                         f"{model_dir}; refusing to read it")
    # Keep the name a link has (a cache blob is named by its hash); ".." only in resolved form.
    return path if ".." in Path(name).parts else roots[0] / name


def require_finite(tensor, name: str, where, fix: str = "the file is corrupt: make it again "
                   "from its source") -> None:
    """The one finite-check of every reader and writer: NaN or Inf in a float tensor is an error."""
    import torch

    if not tensor.is_floating_point() or tensor.numel() == 0 or _all_finite(tensor):
        return
    exact = tensor if tensor.dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16) else tensor.float()
    bad = int(tensor.numel() - torch.isfinite(exact).sum())
    raise NumericalError(f"{name} in {where} holds {bad} NaN or Inf value(s); {fix}")


def _all_finite(tensor) -> bool:
    """Whether every value is finite, from the tensor's least and greatest (NaN propagates to both,
    an infinity is one of them): one reduction, where ``isfinite(t).all()`` builds several
    tensor-sized temporaries — every weight of every model read or written passes here."""
    import torch

    try:
        low, high = torch.aminmax(tensor)
    except (RuntimeError, NotImplementedError):  # a dtype aminmax lacks (float8): its values in fp32
        low, high = torch.aminmax(tensor.float())
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def write_config(out_dir: Path, config: dict, dtype: str, quantization_config: dict | None = None,
                 **changes) -> dict:
    """The one ``config.json`` writer: ``torch_dtype`` (and transformers 5's ``dtype``), the
    ``quantization_config`` (dropped when None) and any other key ``changes`` sets."""
    config = {**config, **changes, "torch_dtype": dtype}
    if "dtype" in config:
        config["dtype"] = dtype
    config.pop("quantization_config", None)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    write_json(Path(out_dir) / "config.json", config)
    return config


def iter_tensors(path: Path) -> Iterator[tuple[str, "object"]]:
    """Yield (name, tensor) from one weight file, memory-mapped where possible."""
    if path.suffix == ".safetensors":
        with parsing(path, "safetensors file", SAFETENSORS_FIX):
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        return
    yield from _load_pickle(path).items()


def _load_pickle(path: Path) -> dict:
    import torch

    # weights_only=True refuses arbitrary objects even when pickles are allowed.
    with parsing(path, "pickle weight file", PICKLE_FIX):
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, dict):
        raise InputError(f"{path} holds a {type(state).__name__}, not a dict of tensors")
    return state


def tensor_names(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        with parsing(path, "safetensors file", SAFETENSORS_FIX):
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
    return list(_load_pickle(path))


def tensor_shapes(shards: list[Path]) -> dict:
    """name -> (shape, dtype, shard) from safetensors headers, without loading any tensor."""
    shapes = {}
    for path in shards:
        if path.suffix == ".safetensors":
            with parsing(path, "safetensors file", SAFETENSORS_FIX):
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        shapes[name] = (tuple(sl.get_shape()), sl.get_dtype(), path)
        else:
            for name, t in _load_pickle(path).items():
                shapes[name] = (tuple(t.shape), t.dtype, path)
    return shapes


class ShardWriter:
    """Write tensors into safetensors shards of bounded size plus an index.

    Tensors are flushed as soon as a shard is full, so memory stays near one
    shard. Shards get their final ``model-0000i-of-0000N`` names in ``close``.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int = 4 * 10**9,
                 metadata: dict | None = None):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor) -> None:
        require_finite(tensor, name, f"the output {final_name(self.out_dir)}", fix="nothing was written")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self._pending:
            return
        from safetensors.torch import save_file

        from tangquant.files import os_error, readable_as_created

        path = self.out_dir / f".shard-{len(self._shards):05d}.safetensors"
        try:
            save_file(self._pending, str(path), metadata=self.metadata)
        except Exception as exc:  # safetensors reports a full disk as SafetensorError, not OSError
            err = os_error(exc)
            if err is None:
                raise
            err.filename = str(path)
            raise err from exc
        readable_as_created(path)
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        self.flush()
        n = len(self._shards)
        if n == 1:
            final = self.out_dir / "model.safetensors"
            os.replace(self._shards[0][0], final)
            return [final]
        weight_map, finals = {}, []
        for i, (path, names) in enumerate(self._shards, 1):
            final = self.out_dir / f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(path, final)
            finals.append(final)
            weight_map.update({name: final.name for name in names})
        write_json(self.out_dir / SAFE_INDEX,
                   {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        return finals


def safetensors_dtypes() -> dict:
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
            "U8": torch.uint8, "BOOL": torch.bool}


def read_tensors_unmapped(path: Path):
    """Yield (name, tensor) of one shard through plain reads, one tensor at a time.

    A memory map would leave every page of the shard resident (and counted in
    RSS) until the file is closed; reading each tensor into its own buffer keeps
    the merge's footprint near its largest tensor instead of its largest shard.
    """
    if path.suffix != ".safetensors":
        yield from iter_tensors(path)
        return

    import torch

    st = safetensors_dtypes()
    names = tensor_names(path)  # the order tensor_shapes gave the merge's header; safetensors checks it
    with parsing(path, "safetensors file", SAFETENSORS_FIX), open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        for name in names:
            info = header[name]
            start, end = info["data_offsets"]
            buf = torch.empty(end - start, dtype=torch.uint8)
            f.seek(8 + size + start)
            if f.readinto(buf.numpy()) != end - start:
                raise InputError(f"{path} is truncated at tensor {name}; {SAFETENSORS_FIX}")
            yield name, buf.view(st[info["dtype"]]).reshape(info["shape"])


class TensorReader:
    """Tensors of a model directory by name, read from its safetensors on demand.

    Each read opens and closes the file: a handle kept open keeps every page it
    has touched mapped, and the peak RSS would grow to the size of the model.
    """

    def __init__(self, model_dir: Path):
        self.where = {name: path for name, (_, _, path) in tensor_shapes(weight_files(model_dir)).items()}

    def get(self, name: str):
        with parsing(self.where[name], "safetensors file", SAFETENSORS_FIX):
            with safe_open(str(self.where[name]), framework="pt") as f:
                tensor = f.get_tensor(name)
        require_finite(tensor, name, self.where[name])
        return tensor

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.where if n.startswith(prefix)]
