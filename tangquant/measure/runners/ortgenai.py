"""The ``ortgenai`` bench kind: an ONNX Runtime GenAI model directory, timed like the llamacpp kind.

Run inside the bench worker's process. ONNX Runtime runs on its CPU provider with the bench's
``-t`` as its intra-op threads (one inter-op thread). Every repetition makes a generator for
``-p + -n`` tokens, then times ``append_tokens`` of a new random prompt of ``-p`` ids with the
first ``generate_next_token`` (TTFT: the prefill, whose logits give the first token) and the
``-n − 1`` later steps, each decoding one token; tpot = (total − TTFT) / (n − 1), EOS held off.
The uncounted warm-up checks every step's logits are finite.
"""

from __future__ import annotations

import os
import time

from tangquant.host import peak_rss_bytes
from tangquant.measure.timing import greedy_run, prompt_ids, repeat, summary
from tangquant.ortgenai import runtime


def run(spec: dict) -> dict:
    p, n = spec["prompt_tokens"], spec["gen_tokens"]
    start = time.perf_counter()
    model = runtime.load(spec["path"], spec["threads"])
    out = {"load_s": time.perf_counter() - start, "rss_loaded_bytes": peak_rss_bytes(),
           "intra_op_threads": spec["threads"], "process_threads": len(os.listdir("/proc/self/task"))}

    def once(run: int, check: bool) -> dict:
        gen = runtime.generator(model, p + n)
        prompt = prompt_ids(spec["vocab"], p, run)

        def first() -> tuple[int, bool]:
            runtime.prefill(gen, prompt)
            return runtime.step(gen, check)

        return greedy_run(first, lambda token, i: None if gen.is_done() else runtime.step(gen, check),
                          n, check)

    runs, checked = repeat(once, spec)
    return {**out, "runs": runs, **summary(runs, p), "warmup_tokens": checked["tokens"]}
