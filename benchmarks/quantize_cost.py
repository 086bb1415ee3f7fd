"""GPTQ wall time and peak RSS on random-weight Qwen1.5 shapes — random weights, speed only.

Each measurement runs ``tangquant quantize --algo gptq`` (Qwen's GPTQ-Int4
settings: 4 bits, group 128, sym, no act-order, damp 0.01) in its own
subprocess on a model built by ``tangquant.poet.shapes``; the peak RSS is the
child's ``ru_maxrss``. Modes (``--modes``):

- ``inc-whole-model``: INC's GPTQ on the whole fp32 model (``--no-true-sequential``);
- ``layer-wise``: tangquant's layer-by-layer driver, same algorithm
  (``--layer-wise --no-true-sequential``), so the two compare directly;
- ``layer-wise-true-seq``: the driver with true-sequential groups, as the
  recipe asks (``--layer-wise --true-sequential``).

Records before 2026-11-30 name their modes ``full``/``layer-wise``: INC's whole
model with INC's buggy true_sequential, and INC's own ``use_layer_wise``.
Calibration text is read at run time from the chinese-poetry corpus (never
copied). Results are appended to ``benchmarks/results/quantize_cost.jsonl`` (file a run you
keep under ``benchmarks/results/<date>-<machine>-<topic>/``; the 2026-11-28/30 records are in
``benchmarks/results/2026-11-30-2core-epyc-quantize-cost/quantize_cost.jsonl``).

    python benchmarks/quantize_cost.py --shapes 0.5b 1.8b --work /tmp/qcost
    python benchmarks/quantize_cost.py --shapes 7b --modes layer-wise --num-samples 4
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's tangquant
CORPUS = Path("/work/shared/data/chinese-poetry/全唐诗/poet.tang.0.json")
MODES = {"inc-whole-model": ["--no-true-sequential"],
         "layer-wise": ["--layer-wise", "--no-true-sequential"],
         "layer-wise-true-seq": ["--layer-wise", "--true-sequential"]}


def _measure(argv: list[str], timeout: float) -> dict:
    """Run ``argv`` in a fresh child of a fresh child so ``RUSAGE_CHILDREN`` is its own peak."""
    code = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
            "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(json.dumps({'rc': p.returncode, 'wall_s': round(time.perf_counter() - t, 1), "
            "'peak_rss_bytes': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, "
            "'stdout': p.stdout[-400:], 'stderr_tail': p.stderr[-600:]}))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                         timeout=timeout)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_one(model: Path, out: Path, mode: str, args) -> dict:
    argv = [sys.executable, "-m", "tangquant", "-q", "quantize", "--model", str(model),
            "--output", str(out), "--recipe", str(HERE.parent / "recipes" / "int4-gptq-g128.yaml"),
            "--calib", str(args.calib), "--num-samples", str(args.num_samples),
            "--seq-len", str(args.seq_len), "--eval-samples", str(args.eval_samples), "--force",
            *MODES[mode]]
    load0 = os.getloadavg()
    result = _measure(argv, timeout=args.timeout)
    result["loadavg_start"], result["loadavg_end"] = load0, os.getloadavg()
    result["command"] = " ".join(argv[1:])
    manifest = out / "tangquant.json"
    if result["rc"] == 0 and manifest.is_file():
        m = json.loads(manifest.read_text())["metrics"]
        result.update({k: m.get(k) for k in ("seconds_quantize", "seconds_total", "bits_per_weight",
                                             "calibration_samples", "calibration_tokens", "driver",
                                             "fidelity")})
        result["output_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["0.5b"])
    parser.add_argument("--modes", nargs="+", default=["inc-whole-model", "layer-wise"], choices=tuple(MODES))
    parser.add_argument("--work", type=Path, default=Path("/tmp/quantize_cost"))
    parser.add_argument("--calib", type=Path, default=CORPUS)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=0, help="held-out samples for the KLD")
    parser.add_argument("--note", default="", help="conditions of the run (load, sharing), recorded")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--results", type=Path, default=Path("tangquant-results") / "quantize_cost.jsonl")
    args = parser.parse_args()

    import torch

    from tangquant.poet.shapes import build_shape
    from tangquant import host

    for shape in args.shapes:
        model = args.work / f"qwen1.5-{shape}"
        if not (model / "config.json").is_file():
            t = time.perf_counter()
            build_shape(shape, model)
            print(f"built {model} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        for mode in args.modes:
            res = run_one(model, args.work / f"gptq-{shape}-{mode}", mode, args)
            record = {"benchmark": "quantize_cost", "label": "random weights — speed only",
                      "shape": f"Qwen1.5-{shape.upper()}-Chat", "algo": "gptq", "mode": mode,
                      "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                      "host": host.record(), "torch_threads": torch.get_num_threads(),
                      "note": "random weights, speed only. " + args.note, **res}
            args.results.parent.mkdir(parents=True, exist_ok=True)
            with open(args.results, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            print(json.dumps({k: record.get(k) for k in ("shape", "mode", "rc", "wall_s",
                                                          "seconds_quantize", "peak_rss_bytes")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
