"""Does this machine's llama-cpp-python run a GGUF at all? A tiny random one, in child processes.

On the lent Xeon (2026-12-02) llama.cpp 0c1e570 built there segfaulted loading every GGUF, a file
that runs elsewhere too, so a build is probed before minutes go into exporting and benching 7B files.
Writes a 2-layer random INT4 GPTQ checkpoint and its GGUF (``tangquant export --format gguf
--no-llama-check``) under WORK, then loads the file with repacking on and off, each in its own
process (``python -m tangquant.gguf.runtime``), and prints one JSON line with both results, the
llama.cpp system info and the libraries ``libllama.so`` binds to (also in WORK/probe.json). Exit
status 0 if either path runs.

Usage: python benchmarks/llama_probe.py WORK
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's tangquant

from tangquant.poet import shapes  # noqa: E402

from tangquant.export import export  # noqa: E402
from tangquant.gguf.build import _run_smoke  # noqa: E402  (the export's own check)

TINY = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": 2048}


def linked_libraries() -> list[str]:
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib" / "libllama.so"
    try:
        return subprocess.run(["ldd", str(lib)], capture_output=True, text=True, timeout=30).stdout.split("\n")
    except OSError as exc:
        return [str(exc)]


def main(argv=None) -> int:
    work = Path((argv or sys.argv[1:])[0])
    work.mkdir(parents=True, exist_ok=True)
    gptq = shapes.build_gptq({**shapes.qwen_config("0.5b"), **TINY}, work / "probe-gptq")
    res = export(gptq, work / "probe-gguf", format="gguf", llama_check=False, force=True)
    path = work / "probe-gguf" / res["file"]
    out = {"file": str(path), "repack": _run_smoke(path, "hello", 2, repack=True),
           "no_repack": _run_smoke(path, "hello", 2, repack=False),
           "libllama": [line.strip() for line in linked_libraries() if line.strip()]}
    (work / "probe.json").write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(out, ensure_ascii=False))
    return 0 if out["repack"].get("ok") or out["no_repack"].get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
