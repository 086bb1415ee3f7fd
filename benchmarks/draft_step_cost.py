"""What one speculative round costs, in both engines: a target step verifying K + 1 tokens, a draft step.

Random weights, speed only: run it on the 7B target and 0.5B draft of `python -m tangquant.poet.shapes`
(benchmarks/xeon_draft.sh builds them), on a quiet machine. After a prefill of -p random ids:

- llama.cpp (tangquant.gguf.runtime, the same low-level calls the drafted bench kind makes): the
  median wall time of one ``llama_decode`` of K + 1 tokens with logits for all of them, for K = 0
  (a plain decode step) .. max K, the KV cache trimmed back after each; and of one draft step (one
  token) on the draft;
- openvino-genai: a plain LLMPipeline's time per output token (t_target), and for each K a drafted
  LLMPipeline's per-iteration durations from its own metrics: the main model's iterations after the
  prefill (each verifies K + 1 tokens: with random weights next to nothing is accepted) and the
  draft model's iterations (one draft token each; a round's first also decodes the token the draft
  had not seen).

The result feeds benchmarks/draft_projection.py (with the acceptance of benchmarks/draft_acceptance.py).

  python benchmarks/draft_step_cost.py --target-ir IR --draft-ir IR --target-gguf G --draft-gguf G \\
      -t 16 -p 512 --ks 1,2,3,4,5,6,7,8 --out step-cost.json [--engines ov,llamacpp]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tangquant import host  # noqa: E402


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def llamacpp_costs(target_gguf, draft_gguf, threads: int, p: int, ks, reps: int) -> dict:
    import llama_cpp as L

    from tangquant.gguf.reader import find
    from tangquant.gguf.runtime import Session

    kmax = max(ks)
    size = {"threads": threads, "n_ctx": p + kmax + 16, "n_batch": p}
    out = {}
    for role, path, steps in (("target", target_gguf, [0] + list(ks)), ("draft", draft_gguf, [0])):
        s = Session(find(path), **size)
        vocab = min(s.n_vocab, 151643)
        s.decode(_ids(p, vocab, 0), 0)
        mem = L.llama_get_memory(s.ctx)
        times = {}
        for k in steps:
            batch = _ids(k + 1, vocab, k + 1)
            runs = []
            for r in range(reps + 1):  # the first is a warm-up
                t0 = time.perf_counter()
                s.decode(batch, p, all_logits=True)
                runs.append((time.perf_counter() - t0) * 1000)
                L.llama_memory_seq_rm(mem, 0, p, -1)
            times[k] = {"median_ms": statistics.median(runs[1:]), "runs_ms": runs[1:]}
        s.close()
        out[role] = times
    return {"t_target_ms": out["target"][0]["median_ms"], "t_draft_ms": out["draft"][0]["median_ms"],
            "t_verify_ms": {k: out["target"][k]["median_ms"] for k in ks}, "raw": out}


def ov_costs(target_ir, draft_ir, threads: int, p: int, ks, n: int) -> dict:
    import numpy as np
    import openvino as ov
    import openvino_genai as genai

    props = {"INFERENCE_NUM_THREADS": threads}

    def inputs(seed):
        arr = np.array([_ids(p, 151643, seed)], dtype=np.int64)
        return genai.TokenizedInputs(ov.Tensor(arr), ov.Tensor(np.ones_like(arr)))

    def config(k=None):
        cfg = genai.GenerationConfig()
        cfg.max_new_tokens = cfg.min_new_tokens = n
        cfg.ignore_eos, cfg.do_sample = True, False
        if k:
            cfg.num_assistant_tokens = k
        return cfg

    plain = genai.LLMPipeline(str(target_ir), "CPU", **props)
    plain.generate(inputs(100), config())  # warm-up
    res = plain.generate(inputs(101), config())
    pm = res.perf_metrics
    t_target = (pm.get_generate_duration().mean - pm.get_ttft().mean) / (n - 1)
    del plain
    pipe = genai.LLMPipeline(str(target_ir), "CPU", **props,
                             draft_model=genai.draft_model(str(draft_ir), "CPU", **props))
    verify, draft, accepted = {}, {}, {}
    for k in ks:
        pipe.generate(inputs(200 + k), config(k))  # warm-up at this K
        res = pipe.generate(inputs(300 + k), config(k))
        sd = res.extended_perf_metrics
        main_us = list(sd.main_model_metrics.raw_metrics.m_durations)[1:]  # the prefill left out
        draft_us = list(sd.draft_model_metrics.raw_metrics.m_durations)[1:]
        verify[k] = statistics.median(main_us) / 1000
        draft[k] = statistics.median(draft_us) / 1000
        accepted[k] = {"accepted": sd.get_num_accepted_tokens(), "drafted": sd.get_num_draft_tokens()}
    return {"t_target_ms": t_target, "t_draft_ms": statistics.median(draft.values()),
            "t_verify_ms": verify, "t_draft_ms_by_k": draft, "acceptance_random_weights": accepted}


def main(argv=None) -> None:
    a = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--target-ir")
    a.add_argument("--draft-ir")
    a.add_argument("--target-gguf")
    a.add_argument("--draft-gguf")
    a.add_argument("-t", "--threads", type=int, required=True)
    a.add_argument("-p", "--prompt-tokens", type=int, default=512)
    a.add_argument("-n", "--gen-tokens", type=int, default=64, help="tokens per openvino-genai run")
    a.add_argument("-r", "--reps", type=int, default=10, help="timed llama_decode calls per K")
    a.add_argument("--ks", default="1,2,3,4,5,6,7,8")
    a.add_argument("--engines", default="ov,llamacpp")
    a.add_argument("--out", required=True)
    args = a.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    record = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv),
              "host": host.record(), "threads": args.threads, "prompt_tokens": args.prompt_tokens, "ks": ks,
              "label": "random weights, speed only", "engines": {}}
    if "ov" in args.engines:
        record["engines"]["ov"] = ov_costs(args.target_ir, args.draft_ir, args.threads, args.prompt_tokens,
                                           ks, args.gen_tokens)
    if "llamacpp" in args.engines:
        record["engines"]["llamacpp"] = llamacpp_costs(args.target_gguf, args.draft_gguf, args.threads,
                                                       args.prompt_tokens, ks, args.reps)
    Path(args.out).write_text(json.dumps(record, indent=1), encoding="utf-8")
    for engine, c in record["engines"].items():
        print(f"{engine}: t_target {c['t_target_ms']:.2f} ms, t_draft {c['t_draft_ms']:.2f} ms, t_verify "
              + ", ".join(f"K={k} {v:.2f}" for k, v in c["t_verify_ms"].items()))


if __name__ == "__main__":
    main()
