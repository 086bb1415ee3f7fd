"""Helpers for the hostile-input suite: corrupted copies of the tiny fixtures, built at run time,
and the one assertion every refusal must pass (exit 2, one error line naming the culprit,
nothing left behind, every input byte-identical)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

from conftest import tree_digest

from tangquant.cli import main

LEFTOVER_MARKS = (".tmp-", ".old-", ".lock", ".partial", ".staging")


def leftovers(*dirs: Path) -> list[str]:
    """Temporary entries (a run's or a claim's) in ``dirs``."""
    found = []
    for d in dirs:
        if Path(d).is_dir():
            found += [p.name for p in Path(d).iterdir() if any(m in p.name for m in LEFTOVER_MARKS)]
    return found


def _digest(path: Path) -> str:
    path = Path(path)
    return tree_digest(path) if path.is_dir() else path.read_bytes().hex() if path.exists() else ""


def refused(capsys, argv: list[str], *needles: str, inputs=(), outputs=(), rc: int = 2) -> str:
    """Run ``tangquant argv`` in-process and check the refusal; return its error line."""
    before = {str(p): _digest(p) for p in inputs}
    capsys.readouterr()  # only what this run prints
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("tangquant:")]
    assert code == rc and len(lines) == 1 and lines[0].startswith("tangquant: error: "), (code, err)
    line = lines[0]
    for needle in needles:
        assert needle in line, (needle, line)
    for out in outputs:
        assert not Path(out).exists(), f"{out} was written"
        assert not leftovers(Path(out).parent), leftovers(Path(out).parent)
    for path, digest in before.items():
        assert _digest(Path(path)) == digest, f"the input {path} changed"
    return line


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def shard_of(model_dir: Path, tensor: str) -> Path:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return model_dir / json.loads(index.read_text())["weight_map"][tensor]
    return next(model_dir.glob("*.safetensors"))


def set_tensor(model_dir: Path, name: str, change) -> Path:
    """Rewrite the shard holding ``name`` with ``change(tensor)`` applied; returns the shard."""
    from safetensors.torch import load_file, save_file

    shard = shard_of(model_dir, name)
    tensors = load_file(shard)
    tensors[name] = change(tensors[name].clone())
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard


def header(shard: Path) -> tuple[dict, bytes]:
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def with_header(shard: Path, head: dict, data: bytes) -> None:
    text = json.dumps(head).encode()
    text += b" " * (-len(text) % 8)
    shard.write_bytes(struct.pack("<Q", len(text)) + text + data)


def corrupt_shard(shard: Path, how: str) -> None:
    """Damage a safetensors file the ways a broken copy or a hostile file does."""
    raw = shard.read_bytes()
    head, data = header(shard)
    names = [k for k in head if k != "__metadata__"]
    if how == "truncated":
        shard.write_bytes(raw[:len(raw) // 2])
    elif how == "bad-header-json":
        shard.write_bytes(raw[:8] + b"x" + raw[9:])
    elif how == "header-length-beyond-file":
        shard.write_bytes(struct.pack("<Q", 4 * len(raw)) + raw[8:])
    elif how == "overlapping-offsets":
        head[names[1]]["data_offsets"] = head[names[0]]["data_offsets"]
        with_header(shard, head, data)
    elif how == "unknown-dtype":
        head[names[0]]["dtype"] = "Q7"
        with_header(shard, head, data)
    elif how == "empty":
        shard.write_bytes(b"")
    else:
        raise ValueError(how)


def rewrite_gguf(src: Path, dst: Path, set_: dict | None = None, drop: tuple = ()) -> Path:
    """A copy of the GGUF ``src`` at ``dst`` with metadata keys replaced (``set_``: key -> value,
    of the key's own type) or dropped, its tensors unchanged (gguf-py's own copy, as its
    gguf_new_metadata script does it)."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), str(reader.get_field("general.architecture").contents()))
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF.") or field.name in drop:
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = (set_ or {}).get(field.name, field.contents())
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data)
    writer.close()
    return dst


def gguf_value_offset(path: Path, key: str) -> int:
    """The byte offset of ``key``'s value in a GGUF (after its type; an array's item type)."""
    import gguf

    f = gguf.GGUFReader(str(path)).get_field(key)
    return f.offset + 8 + len(key.encode()) + 4


def fill_gguf_tensor(path: Path, name: str, value: float, count: int = 1) -> None:
    """Write ``value`` over the first ``count`` elements of the f32 tensor ``name``, in place."""
    import gguf
    import numpy as np

    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)
    assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.tensor_type
    with open(path, "r+b") as f:
        f.seek(t.data_offset)
        f.write(np.full(count, value, np.float32).tobytes())


def nan_in_ir(ir: Path, name_part: str) -> str:
    """Write NaN over the first element of the first f32/f16 constant of the IR whose name holds
    ``name_part`` (in place, in its .bin); returns the constant's name."""
    import re

    import numpy as np

    xml = (ir / "openvino_model.xml").read_text(encoding="utf-8")
    for m in re.finditer(r'<layer id="\d+" name="([^"]*)" type="Const"[^>]*>\s*<data element_type="(f32|f16)"'
                         r' shape="[^"]*" offset="(\d+)"', xml):
        if name_part in m[1]:
            with open(ir / "openvino_model.bin", "r+b") as f:
                f.seek(int(m[3]))
                f.write(np.array([np.nan], np.float32 if m[2] == "f32" else np.float16).tobytes())
            return m[1]
    raise AssertionError(f"no f32/f16 constant named like {name_part} in {ir}")
