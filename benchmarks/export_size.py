"""IR size of `tangquant export` vs NNCF's own INT4 export — random weights, speed only.

Builds a random-weight model of a real Qwen1.5-Chat shape (``tangquant.poet.shapes``),
quantizes it with ``tangquant quantize --algo rtn`` (round-to-nearest: the IR's
size and speed do not depend on whether GPTQ or RTN chose the integers, only on
the layout, and RTN takes seconds), then exports it twice, each in its own process:

- ``tangquant export --format openvino`` (the checkpoint's exact INT4 integers,
  embeddings/lm_head INT8);
- optimum-intel + NNCF from the full-precision model with
  ``OVWeightQuantizationConfig(bits=4, sym=True, group_size=128)`` (NNCF's own integers).

It records both directory sizes (and the model's .xml+.bin alone), wall times,
peak RSS (``os.wait4``), and runs ``openvino_genai.LLMPipeline(OUT_DIR, "CPU")
.generate("写一首唐诗", max_new_tokens=16)`` on tangquant's IR. One JSON line per run
goes to ``benchmarks/results/export_size.jsonl`` (file a run you keep under
``benchmarks/results/<date>-<machine>-<topic>/``; the 2026-11-28 records are in
``benchmarks/results/2026-11-28-2core-epyc-export-size-logits/export_size.jsonl``).

    python benchmarks/export_size.py --shape 0.5b [--workdir /tmp/es] [--keep]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's tangquant
from tangquant.poet import shapes  # noqa: E402

RESULTS = Path("tangquant-results") / "export_size.jsonl"  # file a kept run under results/<date>-<machine>-<topic>/
NNCF_EXPORT = """
import sys
from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig
src, out = sys.argv[1:3]
q = OVWeightQuantizationConfig(bits=4, sym=True, group_size=128)
model = OVModelForCausalLM.from_pretrained(src, export=True, quantization_config=q, compile=False)
model.save_pretrained(out)
"""
GENERATE = """
import sys, time, openvino_genai
pipe = openvino_genai.LLMPipeline(sys.argv[1], "CPU")
config = pipe.get_generation_config()
config.max_new_tokens = 16
config.do_sample = False
t = time.perf_counter()
text = pipe.generate("写一首唐诗", config)
seconds = time.perf_counter() - t
# A random-weight shape model writes ids its small benchmark tokenizer may not decode: count ids too.
ids = pipe.generate(pipe.get_tokenizer().encode("写一首唐诗"), config).tokens[0]
print(f"text {text!r}")
print(f"new_tokens {len(ids)} seconds {seconds:.3f}")
"""


def _run_child(cmd: list[str]) -> dict:
    """Run one child; its wall time, exit code, own peak RSS and output tail."""
    import tempfile

    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        _, status, usage = os.wait4(proc.pid, 0)
        log.seek(0)
        tail = log.read().decode("utf-8", "replace")[-1500:]
    return {"rc": os.waitstatus_to_exitcode(status), "wall_s": round(time.perf_counter() - start, 1),
            "peak_rss_bytes": usage.ru_maxrss * 1024, "output_tail": tail}


def _sizes(out: Path) -> dict:
    files = [p for p in out.rglob("*") if p.is_file()]
    model = [p for p in files if p.name in ("openvino_model.xml", "openvino_model.bin")]
    return {"dir_bytes": sum(p.stat().st_size for p in files),
            "model_bytes": sum(p.stat().st_size for p in model)}


def main(argv=None) -> int:
    from tangquant import host

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="0.5b", choices=shapes.SHAPES)
    parser.add_argument("--workdir", default="/tmp/tangquant-export-size")
    parser.add_argument("--keep", action="store_true", help="keep the built models")
    parser.add_argument("--generate-only", metavar="IR_DIR", help="only run the LLMPipeline check on IR_DIR")
    args = parser.parse_args(argv)
    if args.generate_only:
        record = {"benchmark": "export_size/generate", "ir": args.generate_only,
                  "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "host": host.record(), "command": " ".join([sys.executable, *sys.argv]), "loadavg_start": list(os.getloadavg()),
                  "genai_generate": _run_child([sys.executable, "-c", GENERATE, args.generate_only])}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with open(RESULTS, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(record["genai_generate"]["output_tail"])
        return record["genai_generate"]["rc"]
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    record = {"shape": f"Qwen1.5-{args.shape.upper()}-Chat", "benchmark": "export_size",
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "host": host.record(), "command": " ".join([sys.executable, *sys.argv]),
              "loadavg_start": list(os.getloadavg()),
              "note": "random weights, speed only; integers from RTN (size and speed depend only on the "
                      "layout, not on GPTQ vs RTN); the 2-core machine was shared with other engineers' "
                      "parallel work, so wall times were taken under load"}
    t = time.perf_counter()
    base = shapes.build_shape(args.shape, work / "base")
    record["build_s"] = round(time.perf_counter() - t, 1)
    tq = [sys.executable, "-m", "tangquant"]
    record["quantize_rtn"] = _run_child(tq + ["-q", "quantize", "--model", str(base), "--output",
                                              str(work / "rtn"), "--algo", "rtn", "--eval-samples", "0"])
    record["tangquant_export"] = _run_child(tq + ["export", "--model", str(work / "rtn"), "--output",
                                                  str(work / "ov-tangquant"), "--format", "openvino"])
    if record["tangquant_export"]["rc"] == 0:
        record["tangquant_export"].update(_sizes(work / "ov-tangquant"))
        manifest = json.loads((work / "ov-tangquant" / "tangquant.json").read_text())
        record["tangquant_export"]["metrics"] = manifest["metrics"]
        record["genai_generate"] = _run_child([sys.executable, "-c", GENERATE, str(work / "ov-tangquant")])
    record["nncf_export"] = _run_child([sys.executable, "-c", NNCF_EXPORT, str(base), str(work / "ov-nncf")])
    if record["nncf_export"]["rc"] == 0:
        record["nncf_export"].update(_sizes(work / "ov-nncf"))
    record["loadavg_end"] = list(os.getloadavg())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
    for name in ("quantize_rtn", "tangquant_export", "nncf_export", "genai_generate"):
        r = record.get(name, {})
        print(f"{name:18} rc={r.get('rc')} wall={r.get('wall_s')} s  "
              f"peak RSS={r.get('peak_rss_bytes', 0) / 1e9:.2f} GB"
              f"  dir={r.get('dir_bytes', 0) / 1e6:.1f} MB  model={r.get('model_bytes', 0) / 1e6:.1f} MB")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(record.get(k, {}).get("rc") == 0 for k in ("tangquant_export", "nncf_export")) else 1


if __name__ == "__main__":
    sys.exit(main())
