"""Fidelity of each quantization path on the trained demo poet (quality, not speed).

Merges the built-in demo adapter into its base, then quantizes it with the
demo's recipe (4 bits, group 128, symmetric, 16×256 calibration tokens of the
poet's own chat data) in six ways: GPTQ by INC on the whole model with and
without INC's ``true_sequential``, GPTQ by tangquant's layer-by-layer driver
with and without true-sequential groups, RTN, and AutoRound with 20 iterations
(the default 200 is too slow for this machine). Each run reports KLD,
perplexity and top-1 agreement against the merged model on the demo's
held-out data (8 samples), and, like ``tangquant demo``, its prompt-following on
the held-out prompts (``assets/demo/prompts.json``: form, title and topic
accuracy, greedy and seeded samples), beside base and base + LoRA. INC's
whole-model ``true_sequential`` is reached by
calling ``quant.inc.run_inc`` directly, because ``tangquant quantize`` routes
true-sequential GPTQ to the layer driver. Results go to
``benchmarks/results/demo_fidelity.json`` (file a run you keep under
``benchmarks/results/<date>-<machine>-<topic>/``; the 2026-12-01 record is
``benchmarks/results/2026-12-01-2core-epyc-demo-fidelity/demo_fidelity.json``).

    python benchmarks/demo_fidelity.py [--work /tmp/demo_fidelity] [--samples 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def inc_whole_model_true_seq(merged: Path, out: Path, recipe_path: Path, calib: Path,
                             heldout: Path) -> dict:
    """INC's own whole-model GPTQ with true_sequential=True, written and evaluated like quantize."""
    from tangquant.calib import load_documents, pack
    from tangquant.checkpoint import load_config, write_config
    from tangquant.evaluate import evaluate
    from tangquant.files import copy_aux_files
    from tangquant.gptq import quantization_config
    from tangquant.load import tokenizer as load_tokenizer
    from tangquant.quant.inc import run_inc
    from tangquant.quant.recipe import QuantRecipe
    from tangquant.quant.writer import write_checkpoint
    from tangquant.recipe import resolve

    r = resolve(QuantRecipe, recipe_path, {"true_sequential": True})
    # the same documents quantize calibrates on when --eval-data is given (all of --calib)
    docs = load_documents(calib)
    samples = pack(docs, load_tokenizer(merged), r.seq_len, r.num_samples, r.seed).samples
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    model, layers = run_inc(merged, r, samples)
    write_checkpoint(model, layers, merged, out, r.bits, r.group_size, 1)
    seconds = time.perf_counter() - t
    write_config(out, load_config(merged), "float16",
                 quantization_config(r.bits, r.group_size, True, False, r.percdamp, 1))
    copy_aux_files(merged, out)
    fid = evaluate(out, merged, heldout, num_samples=8, seq_len=r.seq_len, seed=r.seed)
    return {"seconds_quantize": round(seconds, 2), "fidelity": fid}


def via_cli(merged: Path, out: Path, recipe_path: Path, calib: Path, heldout: Path, *flags) -> dict:
    from tangquant.cli import main

    argv = ["-q", "quantize", "--model", str(merged), "--output", str(out), "--recipe", str(recipe_path),
            "--calib", str(calib), "--eval-data", str(heldout), "--eval-samples", "8", "--force", *flags]
    if main(argv) != 0:
        raise SystemExit(f"tangquant {' '.join(argv)} failed")
    m = json.loads((out / "tangquant.json").read_text())["metrics"]
    return {"seconds_quantize": m["seconds_quantize"], "fidelity": m["fidelity"], "driver": m["driver"]}


def follow_rows(models: dict, samples: int) -> dict:
    """Script and prompt-following of each (model dir, adapter), measured as `tangquant demo` does."""
    from tangquant.demo import generations
    from tangquant.generate import open_generator
    from tangquant.measure.poems import load_prompts
    from tangquant.poet import demo_paths

    prompts = load_prompts(demo_paths()["prompts"])
    out = {}
    for name, (path, adapter) in models.items():
        row = generations(open_generator(path, adapter=adapter), prompts, samples, 100)
        out[name] = {k: row[k] for k in ("follow", "ratio_greedy", "ratio_sampled")}
        g = row["follow"]["greedy"]
        print(f"{name:34s} greedy form {g['form']['rate']:.2f} title {g['title']['rate']:.2f} "
              f"topic {g['topic']['rate']:.2f}", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/demo_fidelity"))
    parser.add_argument("--results", type=Path, default=Path("tangquant-results") / "demo_fidelity.json")
    parser.add_argument("--samples", type=int, default=2, help="sampled answers per held-out prompt (seeds 0..)")
    args = parser.parse_args()

    import torch

    from tangquant.cli import main as cli
    from tangquant.poet import ASSETS as DEMO_DIR
    from tangquant import host

    merged = args.work / "merged"
    if cli(["-q", "merge", "--model", str(DEMO_DIR / "base"), "--adapter", str(DEMO_DIR / "adapter"),
            "--output", str(merged), "--force"]) != 0:
        raise SystemExit("merge failed")
    recipe = DEMO_DIR / "int4-gptq-g128.yaml"
    calib, heldout = DEMO_DIR / "calib.json", DEMO_DIR / "heldout.json"
    runs = {
        "inc_whole_model": via_cli(merged, args.work / "whole", recipe, calib, heldout,
                                   "--no-true-sequential"),
        "inc_whole_model_true_sequential": inc_whole_model_true_seq(
            merged, args.work / "whole-ts", recipe, calib, heldout),
        "layer_wise": via_cli(merged, args.work / "lw", recipe, calib, heldout, "--layer-wise",
                              "--no-true-sequential"),
        "layer_wise_true_sequential": via_cli(merged, args.work / "lw-ts", recipe, calib, heldout,
                                              "--layer-wise", "--true-sequential"),
        "rtn": via_cli(merged, args.work / "rtn", recipe, calib, heldout, "--algo", "rtn"),
        "autoround_iters20": via_cli(merged, args.work / "autoround", recipe, calib, heldout,
                                     "--algo", "autoround", "--iters", "20"),
    }
    dirs = {"inc_whole_model": "whole", "inc_whole_model_true_sequential": "whole-ts", "layer_wise": "lw",
            "layer_wise_true_sequential": "lw-ts", "rtn": "rtn", "autoround_iters20": "autoround"}
    follow = follow_rows({"base": (DEMO_DIR / "base", None), "base + LoRA": (DEMO_DIR / "base", DEMO_DIR / "adapter"),
                          **{name: (args.work / d, None) for name, d in dirs.items()}}, args.samples)
    record = {"benchmark": "demo_fidelity", "model": "tangquant demo poet (trained, merged)",
              "recipe": str(recipe.relative_to(HERE.parent)), "heldout_samples": 8,
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "host": host.record(), "torch_threads": torch.get_num_threads(),
              "command": f"python benchmarks/demo_fidelity.py --samples {args.samples}", "runs": runs,
              "prompt_following": follow}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for name, run in runs.items():
        f = run["fidelity"]
        print(f"{name:34s} KLD {f['kld']:.5f}  top-1 {f['top1_agreement']:.3f}  {run['seconds_quantize']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
