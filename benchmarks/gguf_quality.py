"""The demo poet as GGUF: tangquant's GPTQ-Q4_0 (one file per output-head type) against
llama-quantize's Q4_0 and Q4_K_M of the same merge, and the IR.

Builds into ``--workdir`` (unless there): the merged poet (fp32), its GPTQ
checkpoint (the demo's recipe and calibration), tangquant's IR and one GGUF of it
per ``--heads`` type (``export --gguf-head``; the poet's head is tied, so that type is
its one table's), and ``tangquant.measure.anchor``'s F16 / Q4_0 / Q4_K_M of the merged
model. Then

- KL statistics (``measure.kl``, as ``tangquant eval --data``) of each against base + LoRA
  (peft, fp32) on the poet's held-out poems; a GGUF is dequantised exactly by gguf's numpy
  code and the IR runs in exact mode (f32), so the block measures the weights; with each
  file's bits per weight, its weight bytes read per decoded token (``measure.roofline``'s
  count, the one ``bench`` uses) and who made it (``origin``);
- chat: the held-out prompts through llama-cpp-python's ``create_chat_completion`` (the chat
  template stored in the GGUF, greedy), and the IR through openvino-genai, with each one's
  traditional-character ratio (``measure.poems.traditional_ratio``).

``--untie`` first rewrites the merged poet with an ``lm_head.weight`` of its own, a copy of its
embedding table (the same model, the same logits): then the head type is the output head's
alone, the embeddings stay at the export's q8_0, and llama-quantize treats the file as it treats
Qwen1.5-7B's (untied: Q6_K head, Q4_0 embeddings), so the head is measured as it would be at 7B.

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


def tq_name(head: str) -> str:
    return f"tangquant GPTQ Q4_0, head {head}"


def untie(src: Path, dst: Path) -> None:
    """``src`` (a tied model) with its own lm_head: the embedding table copied, the tie undone."""
    import shutil

    from safetensors.torch import load_file, save_file

    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    tensors = load_file(str(tmp / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
    config["tie_word_embeddings"] = False
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tmp.rename(dst)


def build(work: Path, heads: list[str], untied: bool = False) -> dict:
    from tangquant.export import export
    from tangquant.merge import merge
    from tangquant.poet import ASSETS, demo_paths
    from tangquant.quantize import quantize

    paths = demo_paths(ASSETS)
    if not (work / "merged").exists():
        merge(paths["base"], paths["adapter"], work / "merged", dtype="fp32")
    merged = work / "merged"
    if untied:
        if not (work / "merged-untied").exists():
            untie(merged, work / "merged-untied")
        merged = work / "merged-untied"
    if not (work / "gptq").exists():
        quantize(merged, work / "gptq", ASSETS / "int4-gptq-g128.yaml", calib=str(ASSETS / "calib.json"))
    if not (work / "openvino").exists():
        export(work / "gptq", work / "openvino", format="openvino")
    built = {"paths": paths, "gptq": work / "gptq", "IR (openvino, int8 head)": work / "openvino"}
    for head in heads:
        out = work / f"gguf-head-{head}"
        if not out.exists():
            export(work / "gptq", out, format="gguf", gguf_head=head)
        (built[tq_name(head)],) = out.glob("*.gguf")
    if not (work / "anchor").exists():
        subprocess.run([sys.executable, "-m", "tangquant.measure.anchor", "--model", str(merged),
                        "--output", str(work / "anchor")], check=True, stderr=subprocess.DEVNULL)
    anchor = {p.stem.rsplit("-", 1)[1]: p for p in (work / "anchor").glob("*.gguf")}
    built.update({"llama-quantize Q4_0": anchor["Q4_0"], "llama-quantize Q4_K_M": anchor["Q4_K_M"],
                  "F16": anchor["F16"]})
    return built


def per_token(name: str, path: Path) -> dict:
    """Weight bytes read per decoded token, as ``bench`` counts them, and who made the file."""
    from tangquant.gguf.reader import origin
    from tangquant.measure.roofline import bytes_per_token

    if path.suffix == ".gguf":
        return {**bytes_per_token("llamacpp", path, {}), **origin(path)}
    return {**bytes_per_token("ov", path, {}), "origin": "tangquant", "by": "tangquant export (openvino)"}


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
    ap.add_argument("--heads", default="q8_0,q5_0,q4_0", help="comma list of export --gguf-head types")
    ap.add_argument("--no-chat", action="store_true", help="skip the greedy chat answers")
    ap.add_argument("--untie", action="store_true", help="measure the poet untied (its head a copy of its "
                    "embeddings): the output head's type apart from the embeddings', as at 7B")
    args = ap.parse_args()
    from tangquant import load
    from tangquant.calib import eval_samples
    from tangquant.measure import poems
    from tangquant.measure.poems import traditional_ratio

    record = environment()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    built = build(work, heads, args.untie)
    record["untied"] = args.untie
    paths = built["paths"]
    samples = eval_samples(paths["base"].parent / "heldout.json", load.tokenizer(paths["base"]),
                           args.num_samples, args.seq_len, 0)
    ggufs = [*(tq_name(h) for h in heads), "llama-quantize Q4_0", "llama-quantize Q4_K_M", "F16"]
    ir = "IR (openvino, int8 head)"
    record["kl"] = kl(built, ["gptq", ir, *ggufs], samples)
    record["bits_per_weight"] = {n: bits_per_weight(built[n]) for n in ggufs}
    record["file_bytes"] = {n: built[n].stat().st_size for n in ggufs}
    record["per_token"] = {n: per_token(n, built[n]) for n in [ir, *ggufs]}
    if not args.no_chat:
        prompts = [p["prompt"] for p in poems.load_prompts(paths["prompts"])]
        answers = {f"{n} (llama.cpp chat completion)": chat_gguf(built[n], prompts)
                   for n in [*(tq_name(h) for h in heads), "llama-quantize Q4_0"]}
        answers["tangquant IR (openvino-genai)"] = chat_ir(built[ir], prompts)
        record["traditional_ratio_greedy"] = {k: traditional_ratio(v) for k, v in answers.items()}
        record["answers"] = {"prompts": prompts, **answers}
    record["loadavg_end"] = list(os.getloadavg())
    Path(args.out).write_text(json.dumps(record, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(table(record))
    return 0


def table(record: dict) -> str:
    """The markdown table of the run: KL statistics, bytes per token and origin per candidate."""
    lines = ["| candidate | origin | mean KLD ± err | KLD p99 | same top | PPL ratio | bits/weight | "
             "bytes/token |", "|---|---|---|---|---|---|---|---|"]
    for name, m in record["kl"].items():
        t = record["per_token"].get(name, {})
        bpw = record["bits_per_weight"].get(name)
        per_token = f"{t['bytes_per_token'] / 1e6:.3f} MB" if t else "—"
        lines.append(f"| {name} | {t.get('origin', 'tangquant')} | {m['kld']:.5f} ± {m['kld_err']:.5f} | "
                     f"{m['kld_p99']:.4f} | {100 * m['same_top']:.2f}% | {m['ppl_ratio']:.4f} | "
                     f"{f'{bpw:.2f}' if bpw else '—'} | {per_token} |")
    for name, r in record.get("traditional_ratio_greedy", {}).items():
        lines.append(f"\n{name}: traditional ratio {r}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
