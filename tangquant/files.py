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
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from tangquant import __version__, claim, host
from tangquant.errors import (ExportError, InputError, OutputError, OutputExistsError,
                              TangquantError, first_line)

logger = logging.getLogger(__name__)

MANIFEST = "tangquant.json"
# Where bench and tune append their records unless --results says otherwise: in the directory
# they run in, under a name that says whose they are.
RESULTS = "tangquant-results"
# Files a Hugging Face model directory needs beside its weights to be usable.
AUX_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "chat_template.jinja", "chat_template.json", "generation_config.json",
)
# JSON side files (config.json, indexes, manifests) are kilobytes; a bigger one is not what it claims.
MAX_JSON_BYTES = 64 << 20


def existing_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} {p} does not exist")
    if not p.is_dir():
        raise InputError(f"{what} {p} is not a directory")
    return p.resolve()


def read_bounded(path: Path, what: str, limit: int) -> bytes:
    """The bytes of ``path``, refused (before reading them) when larger than ``limit``."""
    with parsing(path, what), open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InputError(f"{what} {path} is larger than {human_size(limit)}, more than any {what} "
                         "should be; is it the right file?")
    return data


def read_json(path: Path, what: str, limit: int = MAX_JSON_BYTES) -> dict:
    data = read_bounded(path, what, limit)
    with parsing(path, what, fix="it must be UTF-8 JSON"):
        data = json.loads(data.decode("utf-8"))
    if not isinstance(data, dict):
        raise InputError(f"{what} {path} must hold a JSON object")
    return data


@contextlib.contextmanager
def parsing(path, what: str, fix: str = "", error: type[TangquantError] = InputError):
    """The one mapper of failures to parse foreign bytes: one line naming the file and the fix.

    Wrap only the parse call: everything it raises (the parser's own error types included,
    which is why this catches broadly) becomes ``error`` with the file's name.
    """
    try:
        yield
    except TangquantError:
        raise
    except FileNotFoundError:
        raise error(f"{what} {path} is missing") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a directory, not a file") from None
    except PermissionError:
        raise error(f"cannot read {what} {path}: permission denied") from None
    except RecursionError:
        raise error(f"{what} {path} is nested too deeply to be a {what}") from None
    except MemoryError:
        raise error(f"{what} {path} needs more memory to read than there is") from None
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text (byte {exc.start}); "
                    f"{fix or 'convert it to UTF-8'}") from None
    except Exception as exc:
        raise error(f"{what} {path} is not valid: {first_line(exc)}; "
                    f"{fix or 'it is corrupt or truncated: write or download it again'}") from None


def write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False, sort_keys=False)
        f.write("\n")


def check_output(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None],
                 force: bool) -> Path:
    """Refuse an output that overlaps an input, that exists without ``force``, or that
    cannot be created (a file in the way, a read-only file system)."""
    out = Path(output).resolve()
    _check_inputs(out, inputs)
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a directory")
    check_writable(out)
    return out


def check_output_file(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None],
                      force: bool, append: bool = False) -> Path:
    """The same rules for a file an option writes (``--json``, ``--plot``, a JSONL log): never an
    input or inside one, never replaced without ``force`` (``append``: added to instead), never a
    directory; checked before the work starts."""
    out = Path(output).resolve()
    _check_inputs(out, inputs)
    if out.is_dir():
        raise OutputExistsError(f"{out} is a directory; give a file name")
    if out.exists() and not (force or append):
        raise OutputExistsError(f"{out} already exists; pass --force to replace it")
    check_writable(out)
    return out


def _check_inputs(out: Path, inputs) -> None:
    for inp in inputs:
        if inp is None:
            continue
        src = Path(inp).resolve()
        if out == src or src in out.parents or _same_file(out, src):
            raise OutputExistsError(f"output {out} is the same as or inside the input {src}")
        if out in src.parents:
            raise OutputExistsError(f"output {out} contains the input {src}")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # a hard link or bind mount of an input
    except OSError:
        return False


def check_writable(out: Path) -> None:
    """Refuse an output whose nearest existing ancestor is a file or cannot be written."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot create {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        readonly = os.statvfs(parent).f_flag & os.ST_RDONLY
        raise OutputError(f"cannot create {out}: {parent} is on a read-only file system" if readonly
                          else f"cannot create {out}: no permission to write in {parent}")


@contextlib.contextmanager
def atomic_output_dir(output: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``output`` when the block succeeds.

    The output is claimed first (:mod:`tangquant.claim`): a second run to the same
    output is refused, leftovers of dead runs are removed, and an output that appeared
    since :func:`check_output` is not replaced unless ``force``.
    """
    with _claimed(output, force) as (output, tmp):
        with _mapped_os_errors(output):
            tmp.mkdir()
        try:
            with _mapped_os_errors(output):
                yield tmp
                _replace_dir(tmp, output)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextlib.contextmanager
def atomic_output_file(output: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``output`` that replaces it when the block succeeds
    (claimed like a directory, so a second run writing the same file is refused)."""
    with _claimed(output, force) as (output, tmp):
        try:
            with _mapped_os_errors(output):
                yield tmp
                os.replace(tmp, output)
        finally:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _claimed(output: Path, force: bool) -> Iterator[tuple[Path, Path]]:
    """Hold the claim on ``output`` and yield it with a fresh temporary name beside it."""
    output = Path(output)
    with _mapped_os_errors(output):
        output.parent.mkdir(parents=True, exist_ok=True)
    with claim.claim(output):
        if output.exists() and not force:
            raise OutputExistsError(f"output {output} already exists (another run made it meanwhile); "
                                    "pass --force to replace it")
        yield output, claim.temporary_name(output, "tmp", uuid.uuid4().hex[:8])


def umask() -> int:
    """The process's umask, read without changing it (os.umask sets it, racing other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def readable_as_created(path: Path) -> None:
    """Give ``path`` the mode ``open()`` would have: safetensors 0.8 writes its files 0600, so a
    container built as root and run as another user could not read the weights."""
    os.chmod(path, 0o666 & ~umask())


def os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: itself, or the one safetensors' Rust writer reports as text."""
    if isinstance(exc, OSError):
        return exc
    m = re.search(r"os error (\d+)\)", str(exc)) if type(exc).__name__ == "SafetensorError" else None
    return OSError(int(m[1]), os.strerror(int(m[1]))) if m else None


# Errors that say the output cannot be written, whichever file raised them.
_WRITE_ERRNOS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded",
                 errno.EROFS: "the file system is read-only", errno.EFBIG: "the file is too large"}
# A library that writes through C++ streams (OpenVINO's serializer, behind optimum-intel too)
# reports a full disk as "basic_ios::clear: iostream error", without errno: when a write fails
# that way and the file system has less than this left, the disk is what failed.
FULL_DISK_BYTES = 64 << 20


@contextlib.contextmanager
def _mapped_os_errors(output: Path):
    try:
        yield
    except Exception as exc:
        err = os_error(exc)
        if err is None:
            if _library_write_error(exc) and host.free_bytes(output) < FULL_DISK_BYTES:
                raise OutputError(f"writing {output} failed: {host.no_space(output)}; nothing was "
                                  "written") from exc
            raise
        if err.errno not in _WRITE_ERRNOS and not (isinstance(exc, OSError) and _names_output(err, output)):
            raise  # e.g. an input that cannot be read: cli.main names its file
        # The full disk may be another one than the output's (a library's scratch in /tmp).
        elsewhere = getattr(err, "filename", None) and not _names_output(err, output)
        where = Path(err.filename) if elsewhere else output
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            reason = host.no_space(where).replace("no space left", _WRITE_ERRNOS[err.errno], 1)
        else:
            reason = _WRITE_ERRNOS.get(err.errno) or err.strerror or str(err)
        raise OutputError(f"writing {output} failed: {reason}; nothing was written") from exc


def _library_write_error(exc: Exception) -> bool:
    """An error a library raises when its write fails without an errno (C++ streams in OpenVINO,
    an export step that wrapped one)."""
    return isinstance(exc, (RuntimeError, ExportError)) or type(exc).__name__ == "SafetensorError"


def _names_output(err: OSError, output: Path) -> bool:
    name = getattr(err, "filename", None)
    if not name:
        return False
    return str(Path(name)).startswith(str(output.parent / f".{output.name}.")) or \
        Path(name) == output or output in Path(name).parents


def final_name(path: Path) -> str:
    """The name a directory will have once ``atomic_output_dir`` renames it into place."""
    name = Path(path).name
    if name.startswith(".") and ".tmp-" in name:
        return name[1:].rsplit(".tmp-", 1)[0]
    return name


def _replace_dir(tmp: Path, output: Path) -> None:
    if not output.exists():
        os.replace(tmp, output)
    elif claim.exchange(tmp, output):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old output
    else:
        old = claim.temporary_name(output, "old", uuid.uuid4().hex[:8])
        os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old, ignore_errors=True)


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


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python process that must import this tangquant, installed or
    not (the bench worker, the baseline's interpreter, the llama.cpp check): the checkout first
    on PYTHONPATH."""
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, **extra)


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
        "versions": host.package_versions(),
        "host": host.summary(),
    }
    write_json(Path(out_dir) / MANIFEST, manifest)
    return manifest


def read_manifest(model_dir: Path) -> dict | None:
    path = Path(model_dir) / MANIFEST
    return read_json(path, "manifest") if path.is_file() else None
