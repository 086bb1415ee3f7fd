"""Can llama.cpp's AMX path run here? Asked of the CPU, the kernel and the build, without AMX code.

ggml's AMX path (``ggml/src/ggml-cpu/amx``) is compiled in when the compiler targets
AMX (``GGML_NATIVE`` on a Sapphire Rapids or later Xeon), and used when the kernel
grants the process the XTILEDATA state: ``ggml_amx_init`` calls
``syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`` and, refused,
prints "AMX is not ready to be used!" to stderr and keeps the weights on the other
paths (CPU_REPACK, plain) — a change of engine nobody sees in a bench row. This module
makes the same request through ctypes, reads the CPU's flags and the build's system
info, and says in one record which path llama.cpp will take and why; then
:func:`buffers` reads from llama.cpp's load log which buffer types it really used.

Standard library only: the bench worker and tests call it without llama.cpp loaded.
The permission is process-wide (Linux keeps it on the thread-group leader), and
asking for it again is what ggml does anyway, so asking first changes nothing.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
from pathlib import Path

SYS_ARCH_PRCTL = 158          # x86_64 (asm/unistd_64.h)
ARCH_GET_XCOMP_PERM = 0x1022  # asm/prctl.h, as ggml's amx.cpp defines them
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
AMX_FLAGS = ("amx_tile", "amx_int8", "amx_bf16")
_BUFFER = re.compile(r"(\S+) model buffer size\s*=\s*([\d.]+) MiB")
_CPU_REPACK = re.compile(r"repack tensor (\S+) with (\S+)")
_AMX_REPACK = re.compile(r"amx repack tensor (\S+) of type (\S+)")


def cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """The AMX flags of the first CPU in ``/proc/cpuinfo`` (or the given text)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return []
    line = next((l for l in cpuinfo.splitlines() if l.startswith("flags")), "")
    words = set(line.partition(":")[2].split())
    return [f for f in AMX_FLAGS if f in words]


def request_xtiledata() -> dict:
    """Ask the kernel for the XTILEDATA permission exactly as ggml does; the answer, and the
    permitted feature mask after it (``ARCH_GET_XCOMP_PERM``)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return {"granted": False, "error": f"not x86-64 Linux ({platform.system()} {platform.machine()})"}
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(ctypes.c_long(SYS_ARCH_PRCTL), ctypes.c_long(ARCH_REQ_XCOMP_PERM),
                      ctypes.c_long(XFEATURE_XTILEDATA))
    err = ctypes.get_errno()
    mask = ctypes.c_uint64(0)
    got = libc.syscall(ctypes.c_long(SYS_ARCH_PRCTL), ctypes.c_long(ARCH_GET_XCOMP_PERM), ctypes.byref(mask))
    out = {"granted": rc == 0, "permitted_mask": hex(mask.value) if got == 0 else None}
    if rc != 0:
        out["error"] = f"arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) failed: {os.strerror(err)} (errno {err})"
    return out


def build_has_amx(system_info: str) -> bool:
    """Whether the llama.cpp build compiled its AMX path in (``AMX_INT8 = 1`` in its system info)."""
    return re.search(r"AMX_INT8\s*=\s*1", system_info or "") is not None


def verdict(flags: list[str], permission: dict, build_amx: bool) -> dict:
    """Which weight path llama.cpp takes, and why, from the three facts (pure: tested on its own).

    ``expected``: ``AMX`` (the build has it, the CPU has it, the kernel granted it), otherwise
    ``CPU_REPACK or plain`` with the reason AMX is not taken; ``peer_at_best`` is False where the
    CPU has AMX but this llama.cpp will not use it (the row then does not show llama.cpp's best)."""
    cpu = "amx_int8" in flags and "amx_tile" in flags
    out = {"cpu_flags": flags, "build_amx": build_amx, "kernel": permission}
    if not cpu:
        return {**out, "expected": "CPU_REPACK or plain", "peer_at_best": True,
                "reason": "this CPU has no AMX"}
    if not build_amx:
        return {**out, "expected": "CPU_REPACK or plain", "peer_at_best": False,
                "reason": "this CPU has AMX but this llama.cpp was built without it (.ci/llama-cmake-args "
                          "builds it natively, AMX included, with a compiler that compiles it right)"}
    if not permission.get("granted"):
        return {**out, "expected": "CPU_REPACK or plain", "peer_at_best": False,
                "reason": f"the kernel refused AMX to this process ({permission.get('error')}), so ggml "
                          "prints 'AMX is not ready to be used!' and repacks for AVX-512 instead"}
    return {**out, "expected": "AMX", "peer_at_best": True, "reason": "AMX build, AMX CPU, XTILEDATA granted"}


def check(system_info: str, cpuinfo: str | None = None) -> dict:
    """:func:`verdict` of this machine: its CPU flags, the kernel's answer now, and the build."""
    flags = cpu_flags(cpuinfo)
    permission = request_xtiledata() if "amx_tile" in flags else {"granted": False,
                                                                  "error": "not asked: no amx_tile flag"}
    return verdict(flags, permission, build_has_amx(system_info))


def buffers(load_log: str) -> dict:
    """What llama.cpp's load log says it did with the weights: each buffer type's MiB (``AMX``,
    ``CPU_REPACK``, ``CPU_Mapped``, ``CPU``), and the tensors repacked, by layout (CPU_REPACK,
    e.g. ``q4_0_8x8``) or as ``amx:<type>`` (the AMX buffer)."""
    sizes: dict[str, float] = {}
    for name, mib in _BUFFER.findall(load_log or ""):
        sizes[name] = round(sizes.get(name, 0.0) + float(mib), 2)
    repacked: dict[str, int] = {}
    for _, layout in _CPU_REPACK.findall(load_log or ""):
        repacked[layout] = repacked.get(layout, 0) + 1
    for _, kind in _AMX_REPACK.findall(load_log or ""):
        repacked[f"amx:{kind}"] = repacked.get(f"amx:{kind}", 0) + 1
    used = "AMX" if "AMX" in sizes else "CPU_REPACK" if "CPU_REPACK" in sizes else "plain CPU"
    return {"buffer_types": sizes, "repacked_tensors": repacked, "weights_path": used}
