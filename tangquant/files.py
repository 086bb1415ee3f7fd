"""Safe outputs, manifests and small file helpers shared by every stage.

Outputs are built in a hidden temporary directory beside the target and
renamed into place only once complete, so an interrupt, an error or a full
disk never leaves a partial output behind and never touches the inputs.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import platform
import resource
import shutil
import sys
import uuid
from importlib import metadata
from pathlib import Path
from typing import Iterable, Iterator

from tangquant import __version__
from tangquant.errors import InputError, OutputExistsError, TangquantError

logger = logging.getLogger(__name__)

MANIFEST = "tangquant.json"
# Files a Hugging Face model directory needs beside its weights to be usable.
AUX_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "chat_template.jinja", "chat_template.json", "generation_config.json",
)
VERSIONED_PACKAGES = (
    "torch", "transformers", "peft", "safetensors", "neural-compressor-pt",
    "openvino", "openvino-genai", "openvino-tokenizers", "optimum-intel", "nncf", "auto-round",
)


def existing_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} {p} does not exist")
    if not p.is_dir():
        raise InputError(f"{what} {p} is not a directory")
    return p.resolve()


def read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{what} {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"{what} {path} must hold a JSON object")
    return data


def write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False, sort_keys=False)
        f.write("\n")


def check_output(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None],
                 force: bool) -> Path:
    """Refuse an output that overlaps an input, or that exists without ``force``."""
    out = Path(output).resolve()
    for inp in inputs:
        if inp is None:
            continue
        src = Path(inp).resolve()
        if out == src or src in out.parents:
            raise OutputExistsError(f"output {out} is the same as or inside the input {src}")
        if out in src.parents:
            raise OutputExistsError(f"output {out} contains the input {src}")
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a directory")
    return out


@contextlib.contextmanager
def atomic_output_dir(output: Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``output`` when the block succeeds."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _replace_dir(tmp, output)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, TangquantError):
            reason = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
            raise TangquantError(f"writing {output} failed ({reason}); nothing was written") from exc
        raise


def final_name(path: Path) -> str:
    """The name a directory will have once ``atomic_output_dir`` renames it into place."""
    name = Path(path).name
    if name.startswith(".") and ".tmp-" in name:
        return name[1:].rsplit(".tmp-", 1)[0]
    return name


def _replace_dir(tmp: Path, output: Path) -> None:
    if output.exists():
        old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, output)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def copy_aux_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer, chat template and generation config; return what was copied."""
    copied = []
    for name in AUX_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def package_versions(names: Iterable[str] = VERSIONED_PACKAGES) -> dict[str, str]:
    versions = {"python": platform.python_version(), "tangquant": __version__}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_manifest(out_dir: Path, stage: str, parameters: dict, inputs: dict,
                   metrics: dict | None = None) -> dict:
    """Write ``tangquant.json``: what was made, from what, with which versions."""
    manifest = {
        "tangquant_version": __version__,
        "stage": stage,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "parameters": parameters,
        "inputs": inputs,
        "metrics": metrics or {},
        "versions": package_versions(),
        "host": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()},
    }
    write_json(Path(out_dir) / MANIFEST, manifest)
    return manifest


def read_manifest(model_dir: Path) -> dict | None:
    path = Path(model_dir) / MANIFEST
    return read_json(path, "manifest") if path.is_file() else None
