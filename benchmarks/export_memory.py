"""Peak memory of each phase of ``tangquant export --format openvino``: anonymous and file-backed.

A process's peak RSS counts the pages of memory-mapped files it touched (safetensors shards, the
fp16 IR's .bin that NNCF reads) as well as its own allocations; the kernel can drop the former under
pressure, not the latter, so what a machine must hold is the anonymous peak. A thread samples
``/proc/self/status`` every 0.1 s; each phase function of :mod:`tangquant.ov.build` is wrapped to
report its own peaks (our own functions, wrapped here only: the export itself is unchanged).

Usage: python benchmarks/export_memory.py GPTQ_DIR OUT_DIR [--results FILE.jsonl]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import threading
import time

from tangquant.export import export
from tangquant.ov import build, int4

PHASES = [(build, "write_staging_model", "dequantise"), (build, "_trace", "trace"),
          (build, "_compress", "compress"), (int4, "replace_constants", "hand-off"),
          (build, "verify_ir", "verify")]


class Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0.0, "RssFile": 0.0}

    def reset(self) -> dict:
        peak, self.peak = self.peak, {"RssAnon": 0.0, "RssFile": 0.0}
        return {k: round(v / 2**20, 2) for k, v in peak.items()}

    def run(self):
        while True:
            with open("/proc/self/status") as f:
                for line in f:
                    key = line.split(":")[0]
                    if key in self.peak:
                        self.peak[key] = max(self.peak[key], float(line.split()[1]))
            time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gptq")
    ap.add_argument("output")
    ap.add_argument("--results", help="append one JSON line here")
    a = ap.parse_args()
    sampler, rows = Sampler(), []
    sampler.start()
    for module, name, label in PHASES:
        def timed(*args, _f=getattr(module, name), _label=label, **kw):
            sampler.reset()
            t0 = time.perf_counter()
            out = _f(*args, **kw)
            peak = sampler.reset()
            rows.append({"phase": _label, "seconds": round(time.perf_counter() - t0, 1),
                         "peak_anon_gb": peak["RssAnon"], "peak_file_gb": peak["RssFile"]})
            return out
        setattr(module, name, functools.wraps(getattr(module, name))(timed))
    t0 = time.perf_counter()
    export(a.gptq, a.output, format="openvino", force=True)
    rec = {"what": "export --format openvino, peak memory per phase", "model": a.gptq,
           "seconds": round(time.perf_counter() - t0, 1), "phases": rows, "cpu_count": os.cpu_count(),
           "machine": platform.node(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(json.dumps(rec))
    if a.results:
        with open(a.results, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
