"""The fidelity gate of `tangquant tune` on the demo poet: OpenVINO's defaults and llama.cpp's settings.

Builds the shipped poet as `tangquant demo` does (merge -> GPTQ g128 -> IR and GGUF of the same
integers) into --work (reused when there), makes tune's reference (the IR in exact mode: f32, no
dynamic quantization, f32 KV cache, greedy, on the first --prompts held-out demo prompts), then runs
each candidate's gate worker exactly as tune does: its greedy tokens against the reference's, and
its teacher-forced mean KL(exact || candidate) per token. Deterministic: no timing.

  python benchmarks/tune_gate.py --work /tmp/poet --out benchmarks/results/DIR/tune_gate.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tangquant.measure.runner import environment, run_worker
from tangquant.tune import _held_out

CANDIDATES = [("ov", {}), ("ov", {"KV_CACHE_PRECISION": "f16"}), ("llamacpp", {}), ("llamacpp", {"repack": "0"}),
              ("llamacpp", {"ctk": "q8_0", "ctv": "q8_0"}), ("llamacpp", {"ctk": "q4_0", "ctv": "q4_0"})]
GATES = {"ov": "tangquant.ov.gate:run", "llamacpp": "tangquant.gguf.gate:run"}


def build(work: Path) -> None:
    from tangquant.export import export
    from tangquant.merge import merge
    from tangquant.poet import ASSETS, demo_paths
    from tangquant.quantize import quantize

    paths = demo_paths(ASSETS)
    merge(paths["base"], paths["adapter"], work / "merged", dtype="fp32")
    q = quantize(work / "merged", work / "gptq", ASSETS / "int4-gptq-g128.yaml", calib=str(ASSETS / "calib.json"))
    export(q["checkpoint"], work / "ir")
    export(q["checkpoint"], work / "gguf", format="gguf")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if not (a.work / "gguf").is_dir():
        build(a.work)
    models = {"ov": str(a.work / "ir"), "llamacpp": str(next((a.work / "gguf").glob("*.gguf")))}
    ref = str(a.work / "reference.npz")
    res = run_worker({"call": GATES["ov"], "path": models["ov"], "threads": a.threads, "steps": a.steps,
                      "texts": _held_out(a.prompts), "reference_out": ref}, sys.executable, 1800)
    if not res.get("ok"):
        sys.exit(f"reference: {res.get('error')}")
    rows = []
    for kind, options in CANDIDATES:
        r = run_worker({"call": GATES[kind], "path": models[kind], "threads": a.threads, "options": options,
                        "prompts": res["prompts"], "steps": a.steps, "reference": ref}, sys.executable, 1800)
        if not r.get("ok"):
            sys.exit(f"{kind} {options}: {r.get('error')}")
        rows.append({"engine": kind, "options": options, **{k: r[k] for k in (
            "kld", "kld_max", "greedy_first_diff", "genai_first_diff", "genai_identical")}})
        print(json.dumps(rows[-1]), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({**environment(vars(a) | {"work": str(a.work), "out": str(a.out)}),
                                 "reference_plugin_defaults": res["defaults"], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
