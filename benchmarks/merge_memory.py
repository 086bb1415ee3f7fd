"""Peak memory and wall time of `tangquant merge` vs peft `merge_and_unload` — random weights, speed only.

Builds a random-weight model of a real Qwen1.5-Chat shape with a random r=8
alpha=16 q_proj/v_proj adapter (``tangquant.poet.shapes``), then merges it twice, each in
its own process: through ``tangquant merge`` (streaming) and through peft
(load the base in bf16, ``PeftModel.from_pretrained``, ``merge_and_unload``,
``save_pretrained``). The peak RSS of each child comes from ``os.wait4``
(the child's own ``ru_maxrss``). Both merged checkpoints are compared tensor
by tensor. One JSON line per shape goes to
``tangquant-results/merge_memory.jsonl`` in the working directory (file a run you keep under
``benchmarks/results/<date>-<machine>-<topic>/``; the 2026-11-28 records are in
``benchmarks/results/2026-11-28-2core-epyc-merge-memory/merge_memory.jsonl``); a table is printed.

    python benchmarks/merge_memory.py --shape 1.8b [--workdir /tmp/mm] [--skip-peft] [--keep]
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

RESULTS = Path("tangquant-results") / "merge_memory.jsonl"
PEFT_MERGE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, safe_serialization=True)
AutoTokenizer.from_pretrained(base).save_pretrained(out)
"""


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def _run_child(cmd: list[str], min_available: int = 0) -> dict:
    """Run one child; return its wall time, exit code and own peak RSS (ru_maxrss, KiB on Linux).

    The machine is shared: if the host's available memory falls below
    ``min_available`` the child is killed (and the record says so) rather than
    pushing other people's work into the OOM killer.
    """
    import tempfile

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    start, guarded = time.time(), False
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if min_available and not guarded and _available_bytes() < min_available:
                proc.kill()
                guarded = True
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        tail = log.read()[-600:]
    return {"rc": proc.returncode, "wall_s": round(time.time() - start, 1),
            "peak_rss_bytes": usage.ru_maxrss * 1024, "killed_by_memory_guard": guarded,
            "output_tail": tail}


def _compare(a: Path, b: Path) -> dict:
    """Max |difference| over every tensor of two checkpoints (same names expected)."""
    from safetensors import safe_open

    def index(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    ia, ib = index(a), index(b)
    worst, names, bitwise = 0.0, 0, 0
    for name in sorted(set(ia) & set(ib)):
        with safe_open(str(ia[name]), "pt") as fa, safe_open(str(ib[name]), "pt") as fb:
            ta, tb = fa.get_tensor(name), fb.get_tensor(name)
        worst = max(worst, float((ta.float() - tb.float()).abs().max()))
        names += 1
        bitwise += bool(ta.equal(tb))
    return {"tensors_compared": names, "tensors_bitwise_equal": bitwise, "max_abs_diff": worst,
            "only_in_tangquant": sorted(set(ia) - set(ib))[:5], "only_in_peft": sorted(set(ib) - set(ia))[:5]}


def _environment() -> dict:
    import torch

    sys.path.insert(0, str(HERE.parent))
    from tangquant import host

    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "host": host.record(), "torch_threads": torch.get_num_threads(),
            "note": "random weights, speed only; the 2-core machine was shared with other "
                    "engineers' parallel work, so wall times were taken under load"}


def bench_shape(shape: str, work: Path, skip_peft: bool, min_available: int = 0) -> dict:
    base, adapter = work / f"base-{shape}", work / f"lora-{shape}"
    record = {"shape": f"Qwen1.5-{shape.upper()}-Chat", "benchmark": "merge_memory", **_environment()}
    t = time.time()
    shapes.build_shape(shape, base)
    shapes.build_adapter(base, adapter)
    record["build_s"] = round(time.time() - t, 1)
    sizes = [p.stat().st_size for p in base.glob("*.safetensors")]
    record.update(base_bytes=sum(sizes), largest_shard_bytes=max(sizes), shards=len(sizes))
    record["goal_peak_rss_bytes"] = max(sizes) + 2 * 10**9
    cli = [sys.executable, "-m", "tangquant", "merge", "--model", str(base), "--adapter", str(adapter)]
    record["tangquant"] = _run_child(cli + ["--output", str(work / "tq")], min_available)
    record["goal_met"] = (record["tangquant"]["rc"] == 0
                          and record["tangquant"]["peak_rss_bytes"] <= record["goal_peak_rss_bytes"])
    if not skip_peft:
        record["peft"] = _run_child([sys.executable, "-c", PEFT_MERGE, str(base), str(adapter),
                                     str(work / "peft")], min_available)
        if record["peft"]["rc"] == 0 and record["tangquant"]["rc"] == 0:
            record["tangquant_vs_peft"] = _compare(work / "tq", work / "peft")
    record["loadavg_end"] = os.getloadavg()
    return record


def _table(rec: dict) -> str:
    gb = 1e9
    rows = [f"{rec['shape']} (random weights, speed only), largest shard "
            f"{rec['largest_shard_bytes'] / gb:.2f} GB, goal ≤ {rec['goal_peak_rss_bytes'] / gb:.2f} GB",
            f"{'method':<26}{'peak RSS':>12}{'wall':>10}{'rc':>5}"]
    for key, label in (("tangquant", "tangquant merge"), ("peft", "peft merge_and_unload")):
        if key in rec:
            r = rec[key]
            note = "  (killed: host memory ran low)" if r.get("killed_by_memory_guard") else ""
            rows.append(f"{label:<26}{r['peak_rss_bytes'] / gb:>9.2f} GB{r['wall_s']:>8.1f} s{r['rc']:>5}{note}")
    if "tangquant_vs_peft" in rec:
        c = rec["tangquant_vs_peft"]
        rows.append(f"outputs: {c['tensors_bitwise_equal']}/{c['tensors_compared']} tensors bitwise equal, "
                    f"max |diff| {c['max_abs_diff']:.3g}")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", choices=shapes.SHAPES,
                        help="shape(s) to run (default 1.8b); repeat for several")
    parser.add_argument("--workdir", default="/tmp/tangquant-merge-memory")
    parser.add_argument("--skip-peft", action="store_true", help="only tangquant (e.g. 7B on 24 GB)")
    parser.add_argument("--min-available-gb", type=float, default=1.5,
                        help="kill a child when the host's available memory falls below this")
    parser.add_argument("--keep", action="store_true", help="keep the built models and outputs")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    for shape in args.shape or ["1.8b"]:
        work = Path(args.workdir) / shape
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        try:
            rec = bench_shape(shape, work, args.skip_peft, int(args.min_available_gb * 1e9))
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        rec["command"] = " ".join([Path(sys.executable).name, *sys.argv])
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        print(_table(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
