"""Claiming an output: one run at a time per output name, and what dead runs left behind.

A run that writes ``DIR/name`` holds an exclusive ``flock`` on ``DIR/.name.lock``
for as long as it builds ``DIR/.name.tmp-PID-XXXX``. The kernel drops the lock
when the process dies, however it dies (``kill -9`` included), so a lock that can
be taken proves that nobody is building that name: every ``.name.tmp-*`` and
``.name.old-*`` beside it is then a leftover and is removed. A second run to
the same output finds the lock held and is refused with one line.

Standard library only (``files`` uses it before any heavy import).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

from tangquant.errors import OutputExistsError

logger = logging.getLogger(__name__)

# .NAME.tmp-PID-HEX (this version), .NAME.old-PID-HEX, .NAME.lock
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")
_LOCK = re.compile(r"^\.(?P<name>.+)\.lock$")
# A cleaner takes another name's lock for a moment; a run that meets it waits this long.
_BUSY_WAIT_S = 1.0


def lock_path(output: Path) -> Path:
    return output.parent / f".{output.name}.lock"


def temporary_name(output: Path, kind: str, token: str) -> Path:
    return output.parent / f".{output.name}.{kind}-{os.getpid()}-{token}"


def _try_lock(path: Path, create: bool = True) -> int | None:
    """An fd holding the exclusive lock on ``path`` (created if missing), or None if taken.

    With ``create`` False a missing lock file is not made: -1 is returned (nobody holds it).
    """
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o644)
        except FileNotFoundError:
            return -1
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        # Locked: make sure the name still points at the file we locked (a releasing holder
        # unlinks it, and a third run may have created a new one meanwhile).
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        pid = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return "another run"
    return f"another run (pid {pid})" if pid.isdigit() else "another run"


def _release(path: Path, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # while still locked, so no one locks a file that is about to vanish
    os.close(fd)


@contextlib.contextmanager
def claim(output: Path) -> Iterator[None]:
    """Hold the exclusive right to build ``output``; refuse with one line if another run has it."""
    output = Path(output)
    path = lock_path(output)
    deadline = time.monotonic() + _BUSY_WAIT_S
    while (fd := _try_lock(path)) is None:
        if time.monotonic() > deadline:
            raise OutputExistsError(f"{_holder(path)} is writing {output} right now; wait for it to "
                                    "finish, or choose another output")
        time.sleep(0.05)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        remove_leftovers(output.parent, only=output.name)
        yield
    finally:
        _release(path, fd)


def leftovers(parent: Path) -> dict[str, list[Path]]:
    """Temporary entries in ``parent`` by the output name they belong to (in use or not)."""
    found: dict[str, list[Path]] = {}
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return found
    for entry in entries:
        m = _LEFTOVER.match(entry.name) or _LOCK.match(entry.name)
        if m:
            found.setdefault(m["name"], []).append(entry)
    return found


def remove_leftovers(parent: Path, only: str | None = None, dry_run: bool = False,
                     prefix: str = "") -> list[Path]:
    """Remove what dead runs left in ``parent`` (of the output ``only``, or of every name that
    starts with ``prefix``).

    The caller holds the lock of ``only``; other names are locked for the moment of the check,
    so nothing a live run is building is touched. Returns what was (or would be) removed.
    """
    removed = []
    for name, entries in leftovers(parent).items():
        if not name.startswith(prefix):
            continue
        if only is not None:
            if name == only:
                removed += _remove(Path(parent) / name, [e for e in entries if not _LOCK.match(e.name)],
                                   dry_run)
            continue
        lock = Path(parent) / f".{name}.lock"
        fd = _try_lock(lock, create=False)
        if fd is None:
            continue  # a live run holds it
        try:
            removed += _remove(Path(parent) / name, [e for e in entries if e != lock], dry_run)
            removed += [lock] if fd >= 0 else []
        finally:
            if fd >= 0 and not dry_run:
                _release(lock, fd)
            elif fd >= 0:
                os.close(fd)
    return removed


def _remove(output: Path, entries: list[Path], dry_run: bool) -> list[Path]:
    olds = [e for e in entries if ".old-" in e.name]
    if not output.exists() and len(olds) == 1 and not dry_run:
        # Killed between moving the old output aside and moving the new one in: put it back.
        os.replace(olds[0], output)
        logger.warning("restored %s, which an interrupted run had moved aside", output)
        entries = [e for e in entries if e != olds[0]]
    for entry in entries:
        m = _LEFTOVER.match(entry.name)
        logger.info("removing %s, left by an interrupted run (pid %s)", entry, m["pid"] if m else "?")
        if not dry_run:
            shutil.rmtree(entry, ignore_errors=True)
    return entries


@contextlib.contextmanager
def scratch_dir(prefix: str, parent: Path | None = None) -> Iterator[Path]:
    """A private working directory of this run (in the system's temporary directory), made and
    claimed like an output: removed when the run ends, however it ends but ``kill -9``; what a
    killed run left is removed by the next call with the same ``prefix`` (or ``tangquant clean``)."""
    parent = Path(parent or tempfile.gettempdir())
    remove_leftovers(parent, prefix=prefix)
    name = parent / f"{prefix}-{uuid.uuid4().hex[:8]}"
    with claim(name):
        path = temporary_name(name, "tmp", uuid.uuid4().hex[:8])
        path.mkdir(mode=0o700)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)


def exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False  # the kernel or the file system cannot: fall back to two renames
    raise OSError(err, os.strerror(err), str(b))
