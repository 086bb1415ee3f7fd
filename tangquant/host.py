"""The machine a figure was measured on: one record for manifests, bench, tune, the server and scripts.

Standard library only: the bench worker imports it in the seed baseline's Python, where
tangquant's dependencies are not installed, and benchmark scripts call it before any heavy import.
Absolute speeds are only comparable on one host, so every record of a speed carries
:func:`record` — CPU model and model number, L3, the instruction-set flags that decide which
kernels run (AMX, AVX-512, VNNI), cores, load, and the versions of the libraries that ran.
Its disks too: the free space and the device of a path, for the one "no space left" line.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import resource
from importlib import metadata
from pathlib import Path
from typing import Iterable

# The libraries whose versions decide a result (a missing one is left out of the record).
PACKAGES = (
    "torch", "transformers", "peft", "safetensors", "neural-compressor-pt", "optimum", "optimum-intel",
    "nncf", "openvino", "openvino-genai", "openvino-tokenizers", "auto-round", "gptqmodel",
    "llama-cpp-python", "ik-llama-cpp-python", "onnxruntime", "onnxruntime-genai", "gguf",
)
# The flags that pick kernels in OpenVINO, llama.cpp and ONNX Runtime on x86.
KERNEL_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "amx_fp16")
CPUINFO = Path("/proc/cpuinfo")
MOUNTINFO = Path("/proc/self/mountinfo")


def _cpuinfo() -> list[str]:
    try:
        return CPUINFO.read_text().splitlines()
    except OSError:
        return []


def _first(key: str) -> str | None:
    for line in _cpuinfo():
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip()
    return None


def cpu_model() -> str:
    return _first("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    return set((_first("flags") or "").split())


def physical_cores() -> int:
    """Cores, not hyper-threads (unique (physical id, core id) pairs), else the logical count."""
    pairs, phys = set(), "0"
    for line in _cpuinfo():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            phys = value.strip()
        elif key.strip() == "core id":
            pairs.add((phys, value.strip()))
    return len(pairs) or os.cpu_count() or 1


def l3_bytes() -> int | None:
    """The L3 of one CPU as the kernel reports it (sysfs), None when it does not."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(base.glob("index*")):
        try:
            if (index / "level").read_text().strip() != "3":
                continue
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident set (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str]:
    from tangquant import __version__

    versions = {"python": platform.python_version(), "tangquant": __version__}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def summary() -> dict:
    """The host without versions or load: what a model's manifest keeps."""
    flags = cpu_flags()
    return {"cpu": cpu_model(), "cpu_family": _first("cpu family"), "cpu_model_number": _first("model"),
            "cores": os.cpu_count(), "physical_cores": physical_cores(), "l3_bytes": l3_bytes(),
            "kernel_flags": [f for f in KERNEL_FLAGS if f in flags], "platform": platform.platform()}


def record(names: Iterable[str] = PACKAGES) -> dict:
    """Everything a speed needs beside it: :func:`summary`, the date, the load and the versions."""
    return {**summary(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "loadavg": list(os.getloadavg()), "versions": package_versions(names)}


def _existing(path: Path) -> Path:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Bytes this process may still write on the file system of ``path`` (or of its nearest
    existing ancestor); a large number when it cannot be told."""
    try:
        st = os.statvfs(_existing(path))
    except OSError:
        return 1 << 62
    blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail  # root may use the reserved blocks
    return blocks * st.f_frsize


def no_space(path: Path) -> str:
    """The one wording of a full disk, from every writer: "no space left on DEVICE (PATH)"."""
    return f"no space left on {device_of(path)} ({path})"


def device_of(path: Path) -> str:
    """The device that holds ``path``: its mount's source (``/dev/vda1``), or the source and the
    mount point when the source is no device file (``tmpfs at /tmp``); from /proc/self/mountinfo."""
    try:
        real = _existing(path).resolve()
        dev = os.stat(real).st_dev
        lines = MOUNTINFO.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "the disk"
    mounts = []  # (mount point, source) of every mount of this device
    for line in lines:
        fields, _, tail = line.partition(" - ")
        fields, tail = fields.split(), tail.split()
        if len(fields) >= 5 and len(tail) >= 2 and fields[2] == f"{os.major(dev)}:{os.minor(dev)}":
            mounts.append((_unescape(fields[4]), _unescape(tail[1])))
    inside = [m for m in mounts if real == Path(m[0]) or Path(m[0]) in real.parents]
    if not (inside or mounts):
        return "the disk"
    point, source = max(inside, key=lambda m: len(m[0])) if inside else mounts[0]
    return source if source.startswith("/dev/") else f"{source} at {point}"


def _unescape(field: str) -> str:
    """mountinfo writes a space in a path as \\040."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)
