"""A deployment: which engine runs the model on this machine, from which file, with which settings.

``tangquant tune --model IR --gguf GGUF --apply`` measures the IR in OpenVINO and the GGUF of the
same integers in llama.cpp, and writes :data:`FILE` into a directory (by default the one that
holds the IR): for each workload it measured (``pp512+tg128``: prefill-heavy, ``pp32+tg256``:
short in, long out, a Tang poem request) the engine that won it, the model it reads (a path
relative to the deployment, so the directory can move), the engine's options as its row in
:mod:`tangquant.engines` takes them, and the thread count; ``use`` names the workload whose
winner ``chat``, ``serve`` and ``bench`` run when given the directory.

Standard library only (commands read it before any engine loads). Every value is checked when
the file is read: an unknown engine, an option its row does not take, a missing model or a
``use`` that names no workload is one line naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tangquant import engines, files
from tangquant.errors import EngineError, InputError

FILE = "tangquant.deploy.json"
VERSION = 1
THREADS = "threads"


@dataclass(frozen=True)
class Choice:
    """One workload's winner: the engine row's name, its model, its options and threads."""

    workload: str
    engine: str
    model: Path
    options: dict
    threads: int | None

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in sorted(self.options.items())) or "defaults"
        threads = f", {self.threads} threads" if self.threads else ""
        return f"{self.engine} ({engines.get(self.engine).runtime}) on {self.model.name}: {opts}{threads}"


@dataclass(frozen=True)
class Deployment:
    path: Path                  # the directory holding FILE
    use: str
    choices: dict[str, Choice]
    record: dict

    @property
    def chosen(self) -> Choice:
        return self.choices[self.use]


def find(path) -> Path | None:
    """``path``'s deployment file, if ``path`` is one or a directory holding one."""
    p = Path(path)
    if p.is_file() and p.name == FILE:
        return p
    return p / FILE if p.is_dir() and (p / FILE).is_file() else None


def read(path) -> Deployment:
    f = find(path)
    if f is None:
        raise InputError(f"{path} holds no {FILE} (tangquant tune --apply writes one)")
    data = files.read_json(f, "deployment")
    bad = _problem(data)
    if bad:
        raise InputError(f"{f}: {bad}")
    choices = {w: _choice(f, w, c) for w, c in data["workloads"].items()}
    return Deployment(f.parent, data["use"], choices, data)


def _problem(data) -> str | None:
    if not isinstance(data, dict) or data.get("version") != VERSION:
        return f"not a version-{VERSION} deployment file"
    workloads = data.get("workloads")
    if not isinstance(workloads, dict) or not workloads or not all(isinstance(c, dict) for c in workloads.values()):
        return "'workloads' must map each workload to its engine, model and settings"
    if data.get("use") not in workloads:
        return f"'use' must name one of the workloads ({', '.join(workloads)})"
    return None


def _choice(f: Path, workload: str, c: dict) -> Choice:
    where = f"{f}: workload {workload}"
    try:
        row = engines.get(str(c.get("engine")))
        options = row.check_options(dict(c.get("options") or {}))
    except EngineError as exc:
        raise InputError(f"{where}: {exc}") from None
    threads = c.get(THREADS)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InputError(f"{where}: threads must be a positive integer, got {threads!r}")
    model = c.get("model")
    if not isinstance(model, str) or not model or os.path.isabs(model):
        raise InputError(f"{where}: model must be a path relative to the deployment, got {model!r}")
    target = (f.parent / model).resolve()
    if not target.exists():
        raise InputError(f"{where}: its model {target} does not exist")
    return Choice(workload, row.name, target, options, threads)


def entry(root: Path, engine: str, model: Path, options: dict, threads: int | None, **measured) -> dict:
    """One workload's record, its model relative to ``root`` (the deployment directory)."""
    return {"engine": engine, "model": os.path.relpath(Path(model).resolve(), Path(root).resolve()),
            "options": dict(options), THREADS: threads, **measured}


def check_directory(root: Path, given: bool = True) -> None:
    """A deployment goes beside models, not inside one (a model directory would read as both)."""
    root = Path(root)
    model = any((root / m).exists() for m in ("config.json", "openvino_model.xml")) or (
        root.is_dir() and any(root.glob("*.gguf")))
    if model:
        where = f"--deploy {root}" if given else f"{root} (the directory holding the IR)"
        raise InputError(f"{where} is a model directory; a deployment goes beside the models: "
                         "pass --deploy DIR (their parent, or a new directory)")


def write(root: Path, data: dict, force: bool = False) -> Path:
    """Write the deployment file atomically (temporary file, then rename)."""
    out = Path(root) / FILE
    with files.atomic_output_file(out, force=force) as tmp:
        files.write_json(tmp, {"version": VERSION, **data})
    return out
