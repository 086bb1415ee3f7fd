"""Quality of each deployable form of the trained demo poet, the way the field measures it.

The reference is what the fine-tune runs as before tangquant: base + LoRA
(peft, fp32). Against it, each candidate gets

- the KL block of ``llama-perplexity --kl-divergence`` (``tangquant eval --data``)
  on the poet's held-out poems (``tangquant/assets/demo/heldout.json``); IRs in
  exact mode (f32, no dynamic quantization), so the block measures the weights;
- the two shipped lm-evaluation-harness tasks (``tang_couplet``,
  ``tang_nextline``, traditional and simplified) side by side with the
  reference, Δ with its paired standard error; IRs as deployed (OpenVINO's CPU
  defaults) unless ``--tasks-exact``.

Default candidates, built into ``--workdir`` unless already there: the merged
model in fp16, the GPTQ checkpoint (the demo's recipe and calibration), its
OpenVINO IR, and the RTN IR (same grid, no calibration). ``--candidate
NAME=PATH`` adds any model ``tangquant.load`` reads, GGUF files included (dequantised
exactly; a lone llama-quantize file's tokenizer comes from its own vocabulary).
Writes one JSON record (versions, CPU, threads, date, load average) to
``--out``.

    python benchmarks/quality.py --workdir /tmp/quality [--candidate q4_0=/tmp/q4_0.gguf] [--limit N]

(from a checkout that is not the installed one: ``PYTHONPATH=. python benchmarks/quality.py …``)
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
TASKS = ("tang_couplet", "tang_nextline")


def build_defaults(work: Path, paths: dict) -> dict:
    """{name: path} of the default candidates, built with tangquant's own stages when missing."""
    from tangquant.export import export
    from tangquant.merge import merge
    from tangquant.quantize import quantize

    demo = paths["base"].parent
    recipe, calib = demo / "int4-gptq-g128.yaml", demo / "calib.json"
    out = {"merged fp16": work / "merged-fp16", "GPTQ INT4 (checkpoint)": work / "gptq",
           "GPTQ INT4 IR": work / "gptq-ir", "RTN INT4 IR": work / "rtn-ir"}
    if not out["merged fp16"].exists():
        merge(paths["base"], paths["adapter"], out["merged fp16"], dtype="fp16")
    for algo, ckpt, ir in (("gptq", work / "gptq", out["GPTQ INT4 IR"]), ("rtn", work / "rtn", out["RTN INT4 IR"])):
        if not ckpt.exists():
            quantize(out["merged fp16"], ckpt, recipe, algo=algo, calib=str(calib))
        if not ir.exists():
            export(ckpt, ir)
    return out


def kl_blocks(candidates: dict, paths: dict, samples: list) -> dict:
    """The KL block of every candidate against base + LoRA, the reference run once."""
    import gc

    from tangquant import load
    from tangquant.measure.kl import compare, logprobs

    ref = load.logits_model(paths["base"], adapter=paths["adapter"])
    ref_lp = logprobs(ref, samples, "reference")
    del ref
    out = {}
    for name, path in candidates.items():
        model = load.logits_model(path)
        out[name] = compare(logprobs(model, samples, name), ref_lp, samples)
        del model
        gc.collect()
    return out


def lm_eval_tables(candidates: dict, paths: dict, args) -> tuple[dict, dict]:
    """(reference's lm_eval results, {candidate: paired rows}); the reference is run once."""
    from tangquant import load
    from tangquant.lmtasks import ASSET_DIR
    from tangquant.measure import harness

    manager = harness.task_manager(ASSET_DIR, TASKS)
    ref = harness.run_one(load.inspect(paths["base"]), paths["adapter"], TASKS, manager, args.limit,
                          args.batch_size, args.tasks_exact, "lm_eval reference")
    tables = {}
    for name, path in candidates.items():
        t0 = time.perf_counter()
        res = harness.run_one(load.inspect(path, kinds=load.LOGIT_KINDS), None, TASKS, manager, args.limit,
                              args.batch_size, args.tasks_exact, f"lm_eval {name}")
        tables[name] = {"rows": harness.paired_rows(ref, res), "seconds": round(time.perf_counter() - t0, 1),
                        "results": harness.plain_results(res)}
    return harness.plain_results(ref), tables


def environment() -> dict:
    import torch

    from tangquant import host

    sha = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "HEAD"], capture_output=True,
                         text=True).stdout.strip() or None
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "git_sha": sha,
            "host": host.record((*host.PACKAGES, "lm-eval")), "torch_threads": torch.get_num_threads()}


def summary_table(record: dict) -> list[str]:
    lines = ["| candidate | mean KLD | KLD 99% | PPL(Q)/PPL(base) | same top p | RMS Δp | "
             + " | ".join(f"{t} {m}" for t, m in record["table_columns"]) + " |",
             "|---" * (6 + len(record["table_columns"])) + "|"]
    for name, c in record["candidates"].items():
        k = c["kl"]
        cells = [f"{k['kld']:.6f} ± {k['kld_err']:.6f}", f"{k['kld_p99']:.4f}",
                 f"{k['ppl_ratio']:.4f} ± {k['ppl_ratio_err']:.4f}",
                 f"{100 * k['same_top']:.2f} ± {100 * k['same_top_err']:.2f}%",
                 f"{100 * k['dp_rms']:.3f} ± {100 * k['dp_rms_err']:.3f}%"]
        rows = {(r["task"], r["metric"]): r for r in c.get("lm_eval", {}).get("rows", [])}
        for key in record["table_columns"]:
            r = rows.get(tuple(key))
            cells.append("n/a" if r is None else f"{r['model']:.4f} (Δ {r['delta']:+.4f} ± {r['delta_err']:.4f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/tangquant-quality"))
    p.add_argument("--candidate", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--no-defaults", action="store_true", help="only the --candidate models")
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--limit", type=int, help="lm_eval: documents per task (default: all 100)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tasks-exact", action="store_true")
    p.add_argument("--no-tasks", action="store_true", help="the KL block only")
    p.add_argument("--out", type=Path, default=Path("tangquant-results") / "quality-demo-poet.json")
    args = p.parse_args()

    from tangquant.cli import _configure_logging

    _configure_logging(verbose=False, quiet=False)  # before torch is imported: the CLI's quiet output

    from tangquant import load
    from tangquant.calib import eval_samples
    from tangquant.poet import demo_paths

    paths = demo_paths()
    args.workdir.mkdir(parents=True, exist_ok=True)
    candidates = {} if args.no_defaults else build_defaults(args.workdir, paths)
    for spec in args.candidate:
        name, _, path = spec.partition("=")
        candidates[name] = Path(path)
    record = environment()
    heldout = paths["base"].parent / "heldout.json"
    samples = eval_samples(heldout, load.tokenizer(paths["base"]), args.num_samples, args.seq_len, 0)
    record.update(reference="demo poet base + LoRA (peft, fp32)", heldout=str(heldout.relative_to(HERE.parent)),
                  kl_note="IRs in exact mode (f32, no dynamic quantization)",
                  tasks_note="IRs " + ("in exact mode" if args.tasks_exact else "with OpenVINO's CPU defaults"),
                  tasks=list(TASKS) if not args.no_tasks else [], limit=args.limit, batch_size=args.batch_size,
                  candidates={n: {"path": str(pth)} for n, pth in candidates.items()})
    t0 = time.perf_counter()
    for name, block in kl_blocks(candidates, paths, samples).items():
        record["candidates"][name]["kl"] = block
    record["seconds_kl"] = round(time.perf_counter() - t0, 1)
    if not args.no_tasks:
        record["reference_lm_eval"], tables = lm_eval_tables(candidates, paths, args)
        for name, t in tables.items():
            record["candidates"][name]["lm_eval"] = t
    cols = sorted({(r["task"], r["metric"]) for c in record["candidates"].values()
                   for r in c.get("lm_eval", {}).get("rows", []) if r["metric"] != "bits_per_byte"})
    record["table_columns"] = [list(c) for c in cols]
    record["loadavg_end"] = list(os.getloadavg())
    record["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    print("\n".join(summary_table(record)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
