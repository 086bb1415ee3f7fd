"""The ``llamacpp`` kind with ``draft=GGUF[,draft_tokens=K]``: speculative decoding, timed like the rest.

The target and the draft each get a llama.cpp context (same threads, same ``repack``); a
repetition prefills both with the ``-p`` prompt (TTFT: both prefills, then the target's first
token), then runs :class:`tangquant.gguf.speculative.Speculator` rounds until ``-n`` tokens;
tpot = (total − TTFT) / (n − 1) as for every kind. Each run records the drafts offered and
accepted and the target's forward passes. The uncounted warm-up also decodes the same prompt
without the draft and records whether the tokens are the same (``greedy_identical``).
"""

from __future__ import annotations

import time

from tangquant.draft import DEFAULT_TOKENS
from tangquant.engines import is_true
from tangquant.gguf.reader import find
from tangquant.gguf.runtime import Session, system_info
from tangquant.gguf.speculative import Speculator, Stats
from tangquant.host import peak_rss_bytes
from tangquant.measure.timing import check_tokens, prompt_ids, repeat, summary


def run(spec: dict) -> dict:
    options, p, n = dict(spec.get("options") or {}), spec["prompt_tokens"], spec["gen_tokens"]
    k = int(options.get("draft_tokens", DEFAULT_TOKENS))
    repack = is_true(options.get("repack", "1"))
    size = {"threads": spec["threads"], "n_ctx": p + n + k + 8, "n_batch": max(p, k + 1), "repack": repack}
    start = time.perf_counter()
    target, draft = Session(spec["path"], **size), Session(find(options["draft"]), **size)
    out = {"load_s": time.perf_counter() - start, "rss_loaded_bytes": peak_rss_bytes(), "repack": repack,
           "repacked_tensors": target.repacked(), "draft_repacked_tensors": draft.repacked(),
           "draft_tokens": k, "llama_cpp_system_info": system_info()}
    spec_dec = Speculator(target, draft, k)

    def once(run: int, check: bool) -> dict:
        prompt = prompt_ids(spec["vocab"], p, run)
        spec_dec.stats = Stats()
        t0 = time.perf_counter()
        tokens = [spec_dec.prefill(prompt)]
        t1 = time.perf_counter()
        while len(tokens) < n:
            tokens += spec_dec.step(prompt + tokens, n - len(tokens))
        t2 = time.perf_counter()
        check_tokens(tokens, n)
        st = spec_dec.stats
        res = {"ttft_ms": (t1 - t0) * 1000, "tpot_ms": (t2 - t1) * 1000 / max(1, n - 1), "tokens": tokens,
               "drafted": st.drafted, "accepted": st.accepted, "target_passes": st.target_passes,
               "generated": st.tokens, "draft_passes": st.draft_passes}
        if check:
            res["greedy_identical"] = target.greedy(prompt, n) == tokens
        return res

    runs, checked = repeat(once, spec)
    target.close()
    draft.close()
    return {**out, "runs": runs, **summary(runs, p), "warmup_tokens": checked["tokens"][:16],
            "greedy_identical": checked["greedy_identical"]}
