"""The ``llamacpp`` bench kind: a GGUF through llama.cpp's low-level API, timed like the ov kinds.

Run inside the bench worker's process (``tangquant.measure.worker``). Every
repetition decodes a new random prompt of ``-p`` ids in one ``llama_decode``
(TTFT: the prefill, whose logits give the first token), then ``-n - 1`` single
tokens, greedy, EOS ignored; tpot = (total − TTFT) / (n − 1), exactly as the ov
kind reads openvino-genai's metrics. So ``tg`` starts after the ``-p`` prompt
for every kind (llama-bench's ``tg128`` starts on an empty context instead).

Options: ``repack=0|1`` (default 1, llama.cpp's default) sets ``use_extra_bufts``, the CPU
weight repacking (AMX's buffer too); ``ctk``/``ctv`` the KV cache's types and ``fa`` flash
attention (llama-bench's ``-ctk``/``-ctv``/``-fa``; llama.cpp's defaults f16, f16, auto).

The row records which buffer types llama.cpp put the weights in (AMX, CPU_REPACK with its
layouts, plain CPU: from its load log), its system info, and the AMX verdict
(:mod:`tangquant.gguf.amx`): where this build, CPU and kernel make llama.cpp take its AMX
path, a child process first checks that path against the plain one (:func:`amx_probe`); if
it faults or disagrees, the measurement runs with repacking off and the row says why
(``amx_fallback``) — never a silent change of engine, never a speed from wrong numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from tangquant import files
from tangquant.engines import is_true
from tangquant.gguf import amx
from tangquant.gguf.reader import require_finite
from tangquant.gguf.runtime import Session, session_options, system_info
from tangquant.host import peak_rss_bytes
from tangquant.measure.runners.logits import pick
from tangquant.measure.timing import greedy_run, prompt_ids, repeat, summary

PROBE_TIMEOUT_S = 900


def amx_probe(path: str, threads: int) -> dict:
    """:func:`tangquant.gguf.runtime.amx_probe` in a child process; a fault is an answer too."""
    spec = json.dumps({"probe": "amx", "path": path, "threads": threads})
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "tangquant.gguf.runtime", spec], capture_output=True,
                              text=True, timeout=PROBE_TIMEOUT_S, env=files.child_env())
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {PROBE_TIMEOUT_S} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    res = json.loads(lines[-1]) if lines else {
        "ok": False, "error": f"crashed (signal {-proc.returncode})" if proc.returncode < 0
        else f"exited with code {proc.returncode}"}
    return {**res, "seconds": round(time.perf_counter() - start, 1)}


def amx_plan(spec: dict, repack: bool, info: str) -> tuple[bool, dict]:
    """(repack to measure with, the row's AMX record): the verdict, and where AMX is expected,
    the probe's answer — a fault or a disagreement turns repacking off, and the record says so."""
    verdict = amx.check(info)
    if not repack or verdict["expected"] != "AMX":
        return repack, verdict
    probe = amx_probe(spec["path"], spec["threads"])
    verdict["probe"] = probe
    if probe.get("ok") and probe.get("agree"):
        return repack, verdict
    why = probe.get("error") or (f"its logits disagree with the plain path (correlation "
                                 f"{probe.get('correlation', float('nan')):.3f})")
    verdict["amx_fallback"] = f"repacking off: llama.cpp's AMX path {why} on this machine"
    return False, verdict


def run(spec: dict) -> dict:
    if (spec.get("options") or {}).get("draft"):  # speculative decoding: its own module
        from tangquant.measure.runners import llamacpp_draft
        return llamacpp_draft.run(spec)
    options, p, n = dict(spec.get("options") or {}), spec["prompt_tokens"], spec["gen_tokens"]
    require_finite(spec["path"])  # a NaN weight can give finite logits here (see the reader)
    info = system_info()
    repack, amx_record = amx_plan(spec, is_true(options.get("repack", "1")), info)
    kv = {"cache_k": options.get("ctk", "f16"), "cache_v": options.get("ctv", "f16"),
          "flash_attn": options.get("fa", "auto")}
    start = time.perf_counter()
    s = Session(spec["path"], threads=spec["threads"], n_ctx=p + n + 8, n_batch=p,
                **{**session_options(options), "repack": repack})
    placed = s.buffers()
    out = {"load_s": time.perf_counter() - start, "rss_loaded_bytes": peak_rss_bytes(),
           "repack": repack, **placed, **kv, "amx": amx_record, "llama_cpp_system_info": info}
    if "amx_fallback" in amx_record:
        out["amx_fallback"] = amx_record["amx_fallback"]
    if amx_record["expected"] == "AMX" and repack and placed["weights_path"] != "AMX":
        out["amx_fallback"] = f"AMX expected, but llama.cpp placed the weights in {placed['weights_path']}"

    def once(run: int, check: bool) -> dict:
        prompt = prompt_ids(spec["vocab"], p, run)
        s.clear()
        # the prefill's logits are always checked; a step's only in the warm-up
        return greedy_run(lambda: pick(s.decode(prompt, 0), True),
                          lambda token, i: pick(s.decode([token], p + i), check), n, check)

    runs, checked = repeat(once, spec)
    s.close()
    return {**out, "runs": runs, **summary(runs, p), "warmup_tokens": checked["tokens"]}
