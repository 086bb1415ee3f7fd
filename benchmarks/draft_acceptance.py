"""The demo pair's speculative decoding, greedy, on the demo's held-out prompts, per K, in both engines.

Target: the shipped poet with its LoRA merged, GPTQ INT4 g128 (the demo's recipe and calibration),
as an OpenVINO IR and as a Q4_0 GGUF of the same integers. Draft: the shipped draft poet
(tangquant/assets/demo/draft), quantized and exported the same way. Both are built under
--workdir on the first run.

For each engine and each K: every held-out prompt (assets/demo/prompts.json, the chat template
applied by the poet's tokenizer, the same ids for both engines) is answered greedily up to
--max-new-tokens or the end of turn, without and with the draft; recorded are the draft tokens
offered and accepted, the target's forward passes, the tokens, and whether the answer is the
same token for token as without the draft. OpenVINO runs in f32 with an f32 KV cache (the
setting under which verification rounds as one-token steps do) and, for the record, at its
defaults (bf16 where the CPU has it, int8 dynamic activations, u8 KV cache). Acceptance is
deterministic: it is measured on any machine. With --timing R the same runs are also timed, R
rounds interleaved (plain, K=1, ...), giving end-to-end decode tokens/s: only on a quiet machine.

  python benchmarks/draft_acceptance.py --workdir /tmp/draft-pair --out DIR [--ks 1,2,3,4,5,6,7,8]
      [--threads 1] [--timing 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tangquant import host  # noqa: E402
from tangquant.measure.speedup import tokens_per_round  # noqa: E402
from tangquant.poet import ASSETS  # noqa: E402

EXACT_KV = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0",
            "KV_CACHE_PRECISION": "f32"}


def build(work: Path, draft_model: Path = ASSETS / "draft") -> dict:
    """target/draft × ir/gguf under ``work`` (made once)."""
    from tangquant.export import export
    from tangquant.merge import merge
    from tangquant.quantize import quantize

    recipe, calib = ASSETS / "int4-gptq-g128.yaml", str(ASSETS / "calib.json")
    if not (work / "target-merged").is_dir():
        merge(ASSETS / "base", ASSETS / "adapter", work / "target-merged", dtype="fp32")
    out = {}
    for name, src in (("target", work / "target-merged"), ("draft", draft_model)):
        gptq = work / f"{name}-gptq"
        if not gptq.is_dir():
            quantize(src, gptq, recipe, calib=calib)
        for fmt in ("ir", "gguf"):
            path = work / f"{name}-{fmt}"
            if not path.is_dir():
                export(gptq, path, format="openvino" if fmt == "ir" else "gguf")
            out[f"{name}_{fmt}"] = path
    return out


def prompt_ids(tokenizer_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    from tangquant.measure import poems

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    out = []
    for p in poems.load_prompts(ASSETS / "prompts.json"):
        text = tok.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=False,
                                       add_generation_prompt=True)
        out.append(tok(text)["input_ids"])
    return out


def _totals(rows: list[dict]) -> dict:
    sums = {k: sum(r[k] for r in rows) for k in ("drafted", "accepted", "generated", "target_passes", "seconds")}
    sums["acceptance"] = sums["accepted"] / sums["drafted"] if sums["drafted"] else None
    sums["tokens_per_step"] = sums["generated"] / sums["target_passes"]
    sums["tokens_per_round"] = sum(tokens_per_round(r["generated"], r["target_passes"]) * (r["target_passes"] - 1)
                                   for r in rows) / max(1, sum(r["target_passes"] - 1 for r in rows))
    sums["identical"] = sum(r["identical"] for r in rows)
    sums["prompts"] = len(rows)
    sums["decode_tps"] = sums["generated"] / sums["seconds"]
    return sums


def ov_runs(paths: dict, prompts, ks, n: int, threads: int, config: dict) -> dict:
    """{K or 0: [per-prompt record]} in openvino-genai (0: no draft)."""
    import numpy as np
    import openvino as ov
    import openvino_genai as genai

    from tangquant.generators import speculation

    props = {**config, "INFERENCE_NUM_THREADS": threads}
    plain = genai.LLMPipeline(str(paths["target_ir"]), "CPU", **props)
    drafted = genai.LLMPipeline(str(paths["target_ir"]), "CPU", **props,
                                draft_model=genai.draft_model(str(paths["draft_ir"]), "CPU", **props))

    def once(pipe, ids, k):
        arr = np.array([ids], dtype=np.int64)
        cfg = pipe.get_generation_config()
        cfg.max_new_tokens, cfg.do_sample = n, False
        if k:
            cfg.num_assistant_tokens = k
        t0 = time.perf_counter()
        res = pipe.generate(genai.TokenizedInputs(ov.Tensor(arr), ov.Tensor(np.ones_like(arr))), cfg)
        seconds = time.perf_counter() - t0
        tokens = list(res.tokens[0])
        counts = speculation(res) or {"drafted": 0, "accepted": 0, "generated": len(tokens),
                                      "target_passes": len(tokens)}
        return tokens, {**counts, "seconds": seconds}

    return _runs(lambda ids, k: once(drafted if k else plain, ids, k), prompts, ks)


def llamacpp_runs(paths: dict, prompts, ks, n: int, threads: int) -> dict:
    from tangquant.gguf.reader import find
    from tangquant.gguf.runtime import Session
    from tangquant.gguf.speculative import Speculator, Stats

    size = {"threads": threads, "n_ctx": 512, "n_batch": 256}
    target, draft = Session(find(paths["target_gguf"]), **size), Session(find(paths["draft_gguf"]), **size)
    specs = {k: Speculator(target, draft, k) for k in ks}

    def once(ids, k):
        t0 = time.perf_counter()
        if not k:
            tokens = target.greedy(ids, n, stop_at_eog=True)
            return tokens, {"drafted": 0, "accepted": 0, "generated": len(tokens), "target_passes": len(tokens),
                            "seconds": time.perf_counter() - t0}
        specs[k].stats = Stats()
        tokens = specs[k].greedy(ids, n, stop_at_eog=True)
        st = specs[k].stats
        return tokens, {"drafted": st.drafted, "accepted": st.accepted, "generated": st.tokens,
                        "target_passes": st.target_passes, "seconds": time.perf_counter() - t0}

    try:
        return _runs(once, prompts, ks)
    finally:
        target.close()
        draft.close()


def _runs(once, prompts, ks) -> dict:
    once(prompts[0], 0)  # warm-up (compilation, first allocations)
    out = {0: []}
    for ids in prompts:
        tokens, rec = once(ids, 0)
        out[0].append({**rec, "tokens": tokens, "identical": True})
    for k in ks:
        once(prompts[0], k)
        out[k] = []
        for ids, ref in zip(prompts, out[0]):
            tokens, rec = once(ids, k)
            out[k].append({**rec, "identical": tokens == ref["tokens"]})
    return out


def table(results: dict, ks) -> str:
    lines = ["| engine | K | acceptance | tokens / target step | tokens / round | identical to plain greedy |",
             "|---|---|---|---|---|---|"]
    for engine, by_k in results.items():
        for k in ks:
            t = by_k[str(k)]
            lines.append(f"| {engine} | {k} | {100 * t['acceptance']:.1f}% ({t['accepted']}/{t['drafted']}) | "
                         f"{t['tokens_per_step']:.2f} | {t['tokens_per_round']:.2f} | {t['identical']}/{t['prompts']} |")
    return "\n".join(lines)


def timing_table(results: dict, ks) -> str:
    lines = ["| engine | plain t/s | " + " | ".join(f"K={k} t/s (×)" for k in ks) + " |",
             "|---" * (len(ks) + 2) + "|"]
    for engine, by_k in results.items():
        plain = by_k["0"]["decode_tps"]
        cells = [f"{by_k[str(k)]['decode_tps']:.1f} ({by_k[str(k)]['decode_tps'] / plain:.2f}×)" for k in ks]
        lines.append(f"| {engine} | {plain:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True, help="directory for acceptance.json and acceptance.md")
    p.add_argument("--ks", default="1,2,3,4,5,6,7,8")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timing", type=int, default=0, help="rounds of timed runs (a quiet machine only)")
    p.add_argument("--engines", default="ov,ov-defaults,llamacpp")
    p.add_argument("--draft-model", default=str(ASSETS / "draft"), help="the draft's model directory "
                   "(default: the shipped draft poet)")
    a = p.parse_args(argv)
    ks = [int(k) for k in a.ks.split(",")]
    work, out = Path(a.workdir), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    paths = build(work, Path(a.draft_model))
    prompts = prompt_ids(paths["target_ir"])
    engines = {"ov": lambda: ov_runs(paths, prompts, ks, a.max_new_tokens, a.threads, EXACT_KV),
               "ov-defaults": lambda: ov_runs(paths, prompts, ks, a.max_new_tokens, a.threads, {}),
               "llamacpp": lambda: llamacpp_runs(paths, prompts, ks, a.max_new_tokens, a.threads)}
    rounds = max(1, a.timing)
    results: dict = {}
    for r in range(rounds):
        for name in a.engines.split(","):
            runs = engines[name]()
            for k, rows in runs.items():
                results.setdefault(name, {}).setdefault(str(k), []).extend(rows)
            print(f"round {r + 1}: {name} done", file=sys.stderr, flush=True)
    summary = {e: {k: _totals(rows) for k, rows in by_k.items()} for e, by_k in results.items()}
    record = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv),
              "host": host.record(), "threads": a.threads, "max_new_tokens": a.max_new_tokens,
              "prompts": len(prompts), "rounds": rounds, "ks": ks,
              "paths": {k: str(v) for k, v in paths.items()}, "summary": summary}
    (out / "acceptance.json").write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
    md = table(summary, ks)
    if a.timing:
        md += "\n\nEnd-to-end decode tokens/s (generated tokens / generate() wall time, prefill included):\n\n"
        md += timing_table(summary, ks)
    (out / "acceptance.md").write_text(md + "\n", encoding="utf-8")
    print(md)


if __name__ == "__main__":
    main()
