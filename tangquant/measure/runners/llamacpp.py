"""The ``llamacpp`` bench kind: a GGUF through llama.cpp's low-level API, timed like the ov kinds.

Run inside the bench worker's process (``tangquant.measure.worker``). Every
repetition decodes a new random prompt of ``-p`` ids in one ``llama_decode``
(TTFT: the prefill, whose logits give the first token), then ``-n - 1`` single
tokens, greedy, EOS ignored; tpot = (total − TTFT) / (n − 1), exactly as the ov
kind reads openvino-genai's metrics. So ``tg`` starts after the ``-p`` prompt
for every kind (llama-bench's ``tg128`` starts on an empty context instead).
Option ``repack=0|1`` (default 1, llama.cpp's default) sets ``use_extra_bufts``,
the CPU weight repacking; the row records which tensors were really repacked.
"""

from __future__ import annotations

import time

import numpy as np

from tangquant.engines import is_true
from tangquant.gguf.runtime import Session, system_info
from tangquant.host import peak_rss_bytes
from tangquant.measure.timing import check_tokens, prompt_ids, repeat, summary


def run(spec: dict) -> dict:
    if (spec.get("options") or {}).get("draft"):  # speculative decoding: its own module
        from tangquant.measure.runners import llamacpp_draft
        return llamacpp_draft.run(spec)
    options, p, n = dict(spec.get("options") or {}), spec["prompt_tokens"], spec["gen_tokens"]
    repack = is_true(options.get("repack", "1"))
    start = time.perf_counter()
    s = Session(spec["path"], threads=spec["threads"], n_ctx=p + n + 8, n_batch=p, repack=repack)
    out = {"load_s": time.perf_counter() - start, "rss_loaded_bytes": peak_rss_bytes(),
           "repack": repack, "repacked_tensors": s.repacked(), "llama_cpp_system_info": system_info()}

    def once(run: int, check: bool) -> dict:
        prompt = prompt_ids(spec["vocab"], p, run)
        s.clear()
        t0 = time.perf_counter()
        logits = s.decode(prompt, 0)
        t1 = time.perf_counter()
        tokens = [int(np.argmax(logits))]
        bad = 0 if np.isfinite(logits).all() else 1
        for i in range(n - 1):
            logits = s.decode([tokens[-1]], p + i)
            bad += 0 if not check or np.isfinite(logits).all() else 1
            tokens.append(int(np.argmax(logits)))
        t2 = time.perf_counter()
        check_tokens(tokens, n)
        if check and bad:
            raise RuntimeError(f"NaN/Inf logits at {bad} of {n} steps")
        return {"ttft_ms": (t1 - t0) * 1000, "tpot_ms": (t2 - t1) * 1000 / max(1, n - 1),
                "tokens": tokens[:16]}

    runs, checked = repeat(once, spec)
    s.close()
    return {**out, "runs": runs, **summary(runs, p), "warmup_tokens": checked["tokens"]}
