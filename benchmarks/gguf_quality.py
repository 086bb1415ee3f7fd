"""The demo poet as GGUF: tangquant's GPTQ-Q4_0 against llama-quantize's Q4_0 and Q4_K_M of the same merge.

Builds into ``--workdir`` (unless there): the merged poet (fp32), its GPTQ
checkpoint (the demo's recipe and calibration), tangquant's IR and GGUF of it,
and ``tangquant.measure.anchor``'s F16 / Q4_0 / Q4_K_M of the merged model.
Then

- KL statistics (``measure.kl``, as ``tangquant eval --data``) of each against base + LoRA
  (peft, fp32) on the poet's held-out poems; a GGUF is dequantised exactly by gguf's numpy
  code, so the block measures the weights, with bits per weight from the file;
- chat: the held-out prompts through llama-cpp-python's ``create_chat_completion`` (the chat
  template stored in the GGUF, greedy), and the IR through openvino-genai, with each one's
  traditional-character ratio (``measure.poems.traditional_ratio``).

    PYTHONPATH=. python benchmarks/gguf_quality.py --workdir /tmp/gguf-quality --out FILE.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from quality import environment  # noqa: E402

MAX_NEW = 100


def build(work: Path) -> dict:
    from tangquant.export import export
    from tangquant.merge import merge
    from tangquant.poet import ASSETS, demo_paths
    from tangquant.quantize import quantize

    paths = demo_paths(ASSETS)
    if not (work / "merged").exists():
        merge(paths["base"], paths["adapter"], work / "merged", dtype="fp32")
    if not (work / "gptq").exists():
        quantize(work / "merged", work / "gptq", ASSETS / "int4-gptq-g128.yaml", calib=str(ASSETS / "calib.json"))
    for fmt in ("openvino", "gguf"):
        if not (work / fmt).exists():
            export(work / "gptq", work / fmt, format=fmt)
    if not (work / "anchor").exists():
        subprocess.run([sys.executable, "-m", "tangquant.measure.anchor", "--model", str(work / "merged"),
                        "--output", str(work / "anchor")], check=True, stderr=subprocess.DEVNULL)
    (gguf_file,) = (work / "gguf").glob("*.gguf")
    anchor = {p.stem.rsplit("-", 1)[1]: p for p in (work / "anchor").glob("*.gguf")}
    return {"paths": paths, "gptq": work / "gptq", "ir": work / "openvino", "tangquant GPTQ Q4_0": gguf_file,
            "llama-quantize Q4_0": anchor["Q4_0"], "llama-quantize Q4_K_M": anchor["Q4_K_M"],
            "F16": anchor["F16"]}


def bits_per_weight(path: Path) -> float:
    from tangquant.gguf.reader import open_reader

    tensors = open_reader(path).tensors
    return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


def kl(built: dict, names: list[str], samples: list) -> dict:
    from tangquant import load
    from tangquant.measure.kl import compare, logprobs

    paths = built["paths"]
    ref = load.logits_model(paths["base"], adapter=paths["adapter"])
    ref_lp = logprobs(ref, samples, "reference")
    del ref
    out = {}
    for name in names:
        model = load.logits_model(built[name])
        out[name] = compare(logprobs(model, samples, name), ref_lp, samples)
        del model
        gc.collect()
    return out


def chat_gguf(path: Path, prompts: list[str]) -> list[str]:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=512, n_threads=os.cpu_count(), verbose=False)
    return [llm.create_chat_completion([{"role": "user", "content": p}], temperature=0.0, top_k=1,
                                       max_tokens=MAX_NEW)["choices"][0]["message"]["content"] for p in prompts]


def chat_ir(path: Path, prompts: list[str]) -> list[str]:
    from tangquant.generate import Sampling, open_generator

    gen = open_generator(path)
    return [gen.generate([{"role": "user", "content": p}], Sampling(MAX_NEW, 0.0, 1.0, 0)) for p in prompts]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)  # as benchmarks/quality.py
    args = ap.parse_args()
    from tangquant import load
    from tangquant.calib import eval_samples
    from tangquant.measure import poems
    from tangquant.measure.poems import traditional_ratio

    record = environment()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    built = build(work)
    paths = built["paths"]
    samples = eval_samples(paths["base"].parent / "heldout.json", load.tokenizer(paths["base"]),
                           args.num_samples, args.seq_len, 0)
    ggufs = ["tangquant GPTQ Q4_0", "llama-quantize Q4_0", "llama-quantize Q4_K_M", "F16"]
    record["kl"] = kl(built, ["gptq", *ggufs], samples)
    record["bits_per_weight"] = {n: bits_per_weight(built[n]) for n in ggufs}
    record["file_bytes"] = {n: built[n].stat().st_size for n in ggufs}
    prompts = [p["prompt"] for p in poems.load_prompts(paths["prompts"])]
    answers = {"tangquant GPTQ Q4_0 (llama.cpp chat completion)": chat_gguf(built["tangquant GPTQ Q4_0"], prompts),
               "llama-quantize Q4_0 (llama.cpp chat completion)": chat_gguf(built["llama-quantize Q4_0"], prompts),
               "tangquant IR (openvino-genai)": chat_ir(built["ir"], prompts)}
    record["traditional_ratio_greedy"] = {k: traditional_ratio(v) for k, v in answers.items()}
    record["answers"] = {"prompts": prompts, **answers}
    record["loadavg_end"] = list(os.getloadavg())
    Path(args.out).write_text(json.dumps(record, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    for name, m in record["kl"].items():
        print(f"{name:28s} KLD {m['kld']:.5f}  same top {100 * m['same_top']:.1f}%  PPL ratio {m['ppl_ratio']:.4f}"
              + (f"  {record['bits_per_weight'][name]:.2f} bpw" if name in record["bits_per_weight"] else ""))
    for name, r in record["traditional_ratio_greedy"].items():
        print(f"{name}: traditional ratio {r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
