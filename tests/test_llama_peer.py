"""llama.cpp as the peer at its best: the AMX check, the rows' buffer types and origin, the GGUF head
types and the KV-cache / flash-attention options."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tangquant.gguf import amx

ROOT = Path(__file__).resolve().parents[1]
NO_LLAMA = "llama-cpp-python is not installed (pip install 'tangquant[llamacpp]')"
# The lines llama.cpp 0c1e570 logs at load (llama-model.cpp, ggml-cpu/repack.cpp, ggml-cpu/amx/amx.cpp).
AMX_LOG = ("ggml_backend_amx_buffer_set_tensor: amx repack tensor blk.0.attn_q.weight of type q4_0\n"
           "ggml_backend_amx_buffer_set_tensor: amx repack tensor blk.0.ffn_up.weight of type q4_0\n"
           "load_tensors:          AMX model buffer size =  3722.06 MiB\n"
           "load_tensors:   CPU_Mapped model buffer size =   564.08 MiB\n")
REPACK_LOG = ("ggml_backend_cpu_repack_buffer_set_tensor: repack tensor blk.0.attn_q.weight with q4_0_8x8\n"
              "load_tensors:   CPU_REPACK model buffer size =   100.00 MiB\n"
              "load_tensors:   CPU_Mapped model buffer size =    20.50 MiB\n")


@pytest.mark.fast
def test_amx_verdict_follows_cpu_build_and_kernel():
    """Which path llama.cpp takes, from the three facts; a CPU with AMX that llama.cpp will not use is
    never a quiet row: it says why and that the peer is not at its best."""
    cpuinfo = "processor : 0\nflags : fpu avx512f amx_bf16 amx_tile amx_int8\nprocessor : 1\n"
    assert amx.cpu_flags(cpuinfo) == ["amx_tile", "amx_int8", "amx_bf16"]
    assert amx.cpu_flags("flags : fpu avx512f\n") == []
    granted, refused = {"granted": True}, {"granted": False, "error": "Operation not supported (errno 95)"}
    info = "CPU : SSE3 = 1 | AVX512 = 1 | AMX_INT8 = 1 | OPENMP = 1 |"
    assert amx.build_has_amx(info) and not amx.build_has_amx(info.replace("AMX_INT8 = 1", "AVX512_BF16 = 1"))
    flags = amx.cpu_flags(cpuinfo)
    assert amx.verdict(flags, granted, True)["expected"] == "AMX"
    no_build = amx.verdict(flags, granted, False)
    assert no_build["expected"] != "AMX" and not no_build["peer_at_best"] and "built without" in no_build["reason"]
    no_perm = amx.verdict(flags, refused, True)
    assert not no_perm["peer_at_best"] and "errno 95" in no_perm["reason"] and "not ready" in no_perm["reason"]
    plain = amx.verdict([], refused, True)
    assert plain["peer_at_best"] and plain["expected"] == "CPU_REPACK or plain"


@pytest.mark.fast
def test_buffer_types_are_read_from_the_load_log():
    """The AMX row of 2026-12-06 said repacked_tensors: {}: the AMX buffer's lines are read now."""
    got = amx.buffers(AMX_LOG)
    assert got["weights_path"] == "AMX" and got["buffer_types"] == {"AMX": 3722.06, "CPU_Mapped": 564.08}
    assert got["repacked_tensors"] == {"amx:q4_0": 2}
    got = amx.buffers(REPACK_LOG)
    assert got["weights_path"] == "CPU_REPACK" and got["repacked_tensors"] == {"q4_0_8x8": 1}
    assert amx.buffers("load_tensors:   CPU_Mapped model buffer size = 1.00 MiB\n")["weights_path"] == "plain CPU"


@pytest.mark.fast
def test_the_xtiledata_request_is_the_kernels_answer():
    """The same arch_prctl ggml makes, for real: refused where the CPU has no AMX (this machine's
    EPYC: EOPNOTSUPP), and where granted the permitted mask holds XTILEDATA (bit 18)."""
    got = amx.request_xtiledata()
    if got["granted"]:
        assert int(got["permitted_mask"], 16) & (1 << amx.XFEATURE_XTILEDATA)
    else:
        assert "arch_prctl" in got.get("error", "") or "not x86-64" in got.get("error", "")
        assert "amx_tile" not in amx.cpu_flags() or "errno" in got["error"]


@pytest.mark.fast
def test_cmake_args_build_natively_and_refuse_a_compiler_that_drops_the_tile_config(tmp_path):
    """Native everywhere; on an AMX CPU, AMX only with a compiler whose _tile_loadconfig reads the
    whole config (GCC 12.2's asm reads 8 bytes: its stores are dropped), said on stderr."""
    script = ROOT / ".ci" / "llama-cmake-args"
    plain = tmp_path / "cpuinfo-plain"
    plain.write_text("flags : fpu avx avx2 avx512f\n")
    amx_cpu = tmp_path / "cpuinfo-amx"
    amx_cpu.write_text("flags : fpu avx avx2 fma avx512f avx512_vnni amx_tile amx_int8 amx_bf16\n")
    good = tmp_path / "good-cxx"  # a compiler whose header has the builtin (GCC >= the fix, clang)
    good.write_text("#!/bin/sh\necho '_tile_loadconfig (const void *__config)'\n"
                    "echo '{ __builtin_ia32_ldtilecfg (__config); }'\n")
    bad = tmp_path / "bad-cxx"   # GCC 12.2's text, verbatim
    bad.write_text("#!/bin/sh\necho '_tile_loadconfig (const void *__config)'\n"
                   "echo '{ __asm__ volatile (\"ldtilecfg %X0\" :: \"m\" (*((const void **)__config))); }'\n")
    for f in (good, bad):
        f.chmod(0o755)

    def args(cpuinfo, cxx):
        env = {**os.environ, "LLAMA_CPUINFO": str(cpuinfo), "CXX": str(cxx), "PATH": "/usr/bin:/bin"}
        proc = subprocess.run(["sh", str(script)], capture_output=True, text=True, env=env, timeout=60)
        return proc.stdout.split(), proc.stderr

    assert args(plain, bad) == (["-DLLAVA_BUILD=OFF", "-DGGML_NATIVE=ON"], "")
    assert args(amx_cpu, good) == (["-DLLAVA_BUILD=OFF", "-DGGML_NATIVE=ON"], "")
    out, err = args(amx_cpu, bad)
    if "-DCMAKE_CXX_COMPILER=clang++" in out:  # clang installed here: its header is right
        assert "-DGGML_NATIVE=ON" in out and "building with clang" in err
    else:
        assert {"-DGGML_NATIVE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AVX512_VNNI=ON", "-DLLAVA_BUILD=OFF"} <= set(out)
        assert "_tile_loadconfig" in err and "WITHOUT AMX" in err


def test_the_bench_build_reports_amx_where_the_cpu_has_it():
    """The llama.cpp the bench runs is the peer at its best: on an AMX CPU its build has AMX."""
    pytest.importorskip("llama_cpp", reason=NO_LLAMA)
    flags = amx.cpu_flags()
    if "amx_int8" not in flags:
        pytest.skip("this CPU has no AMX (no amx_int8 in /proc/cpuinfo): nothing to report")
    from tangquant.gguf.runtime import system_info

    assert amx.build_has_amx(system_info()), f"AMX CPU, but llama.cpp's system info is {system_info()}"


@pytest.mark.fast
def test_bad_llamacpp_options_are_refused_before_any_run():
    from tangquant.engines import get
    from tangquant.errors import EngineError

    row = get("llamacpp")
    assert row.check_options({"ctk": "Q8_0", "ctv": "q4_0", "fa": "1", "repack": "0"}) == {
        "ctk": "q8_0", "ctv": "q4_0", "fa": "1", "repack": "0"}
    for bad in ({"ctk": "q3_k"}, {"ctv": ""}, {"fa": "2"}, {"fa": "yes"}, {"kv": "f16"}):
        with pytest.raises(EngineError):
            row.check_options(bad)
