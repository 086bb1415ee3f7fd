"""GPTQ layer by layer on a cut of a Qwen1.5 shape, under torch's profiler: which operators a layer's
time goes to, where the phase clock's split (calibration forwards, Hessian updates, solve, advance) is
not enough to act on — on a lent Xeon, say. Random weights, speed only.

    python benchmarks/gptq_profile.py --out DIR [--shape 7b] [--layers 1] [--num-samples 128]
        [--compute-dtype bf16] [--calib FILE]

Writes DIR/model (the cut, made once), DIR/quantized, DIR/profile.txt (operators by self CPU time, and
by input shapes), DIR/profile.json (the run's metrics, each phase's top operators — the clock marks its
phases for the profiler —, the top operators overall, the host).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from tangquant.cli import main as tangquant
from tangquant.poet import shapes

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "int4-gptq-g128-layerwise.yaml"


def _rows(events, n: int) -> list[dict]:
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [{"op": e.key, "shapes": str(getattr(e, "input_shapes", "")), "calls": e.count,
             "self_s": round(e.self_cpu_time_total / 1e6, 3), "total_s": round(e.cpu_time_total / 1e6, 3)}
            for e in rows]


def _phase_of(event) -> str:
    """The innermost phase of the layer driver's clock (``record_function("phase:…")``) around an op."""
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith("phase:"):
        parent = parent.cpu_parent
    return parent.name[len("phase:"):] if parent is not None else "outside the phases"


def _by_phase(events, n: int) -> dict:
    """{phase: its top operators by self CPU seconds}: the ops of a phase, end phase apart."""
    table: dict[str, Counter] = {}
    for e in events:
        if e.name.startswith("phase:"):
            continue
        table.setdefault(_phase_of(e), Counter())[e.name] += e.self_cpu_time_total / 1e6
    return {phase: {"self_s": round(sum(ops.values()), 2),
                    "ops": {k: round(v, 3) for k, v in ops.most_common(n)}} for phase, ops in table.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--shape", default="7b", choices=shapes.SHAPES)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--compute-dtype", default="bf16", choices=("fp32", "bf16"))
    ap.add_argument("--calib", help="calibration text (default: the demo's, tangquant/assets/demo/calib.json)")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args(argv)
    model = args.out / "model"
    if not (model / "config.json").exists():
        shapes.build_shape(args.shape, model, layers=args.layers)
    calib = args.calib or str(Path(shapes.__file__).resolve().parent.parent / "assets" / "demo" / "calib.json")
    cmd = ["--json", "quantize", "--model", str(model), "--output", str(args.out / "quantized"), "--recipe",
           str(RECIPE), "--calib", calib, "--num-samples", str(args.num_samples), "--eval-samples", "2",
           "--compute-dtype", args.compute_dtype, "--force"]
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        rc = tangquant(cmd)
    wall = time.perf_counter() - t0
    by_op = prof.key_averages()
    by_shape = prof.key_averages(group_by_input_shape=True)
    (args.out / "profile.txt").write_text(
        by_op.table(sort_by="self_cpu_time_total", row_limit=args.top) + "\n\n"
        + by_shape.table(sort_by="self_cpu_time_total", row_limit=args.top), encoding="utf-8")
    metrics = json.loads((args.out / "quantized" / "tangquant.json").read_text())["metrics"] if rc == 0 else {}
    record = {"command": ["tangquant", *cmd], "rc": rc, "wall_s": round(wall, 1), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "phase_seconds": metrics.get("phase_seconds"), "layer_seconds": metrics.get("layer_seconds"),
              "by_phase": _by_phase(prof.events(), 12),
              "top_ops": _rows(by_op, args.top), "top_ops_by_shape": _rows(by_shape, args.top)}
    (args.out / "profile.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    print(f"{args.out}: rc {rc}, {wall:.0f} s under the profiler; profile.txt, profile.json")
    return rc


if __name__ == "__main__":
    sys.exit(main())
