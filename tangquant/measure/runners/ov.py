"""The ``ov`` and ``ov+lora`` kinds: an OpenVINO IR through openvino-genai's LLMPipeline.

TTFT and the total come from genai's own perf metrics; tpot = (total − TTFT) / (n − 1). The
uncounted warm-up asks for log-probabilities: a NaN logit shows as a NaN score.

``draft=DIR[,draft_tokens=K]``: speculative decoding (``openvino_genai.draft_model``, K tokens
per step, default 4); each run records genai's own counts (draft tokens offered and accepted)
and the target's forward passes, so the row carries the acceptance and tokens per target step.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import openvino as ov
import openvino_genai as genai

from tangquant.draft import DEFAULT_TOKENS
from tangquant.generators import speculation
from tangquant.host import peak_rss_bytes
from tangquant.measure.timing import check_tokens, log, prompt_ids, summary
from tangquant.ov.options import pipeline_properties


def _adapter(options: dict):
    adir = Path(options["adapter"])
    cfg = json.loads((adir / "adapter_config.json").read_text(encoding="utf-8"))
    # GenAI ignores adapter_config.json: the peft scale lora_alpha / r must be passed as alpha.
    alpha = float(options.get("alpha") or cfg["lora_alpha"] / cfg["r"])
    mode = str(options.get("lora_mode", "auto")).upper()
    adapter = genai.Adapter(str(adir / "adapter_model.safetensors"))
    return genai.AdapterConfig(adapter, alpha, getattr(genai.AdapterConfig.Mode, f"MODE_{mode}")), alpha


def _draft(options: dict, props: dict):
    """openvino-genai's draft model, compiled with the target's plugin properties."""
    plugin = {k: v for k, v in props.items() if k not in ("scheduler_config", "adapters")}
    return genai.draft_model(options["draft"], options.get("device", "CPU"), **plugin)


def run(spec: dict) -> dict:
    options, p, n = dict(spec.get("options") or {}), spec["prompt_tokens"], spec["gen_tokens"]
    props = pipeline_properties(options)
    props.setdefault("INFERENCE_NUM_THREADS", spec["threads"])
    out = {}
    if options.get("adapter"):
        props["adapters"], out["lora_alpha_scale"] = _adapter(options)
    if options.get("draft"):
        props["draft_model"] = _draft(options, props)
        out["draft_tokens"] = int(options.get("draft_tokens", DEFAULT_TOKENS))
    start = time.perf_counter()
    pipe = genai.LLMPipeline(spec["path"], options.get("device", "CPU"), **props)
    out.update(load_s=time.perf_counter() - start, rss_loaded_bytes=peak_rss_bytes())

    def inputs(run: int):
        arr = np.array([prompt_ids(spec["vocab"], p, run)], dtype=np.int64)
        return genai.TokenizedInputs(ov.Tensor(arr), ov.Tensor(np.ones_like(arr)))

    def config(logprobs: int):
        cfg = genai.GenerationConfig()
        cfg.max_new_tokens = cfg.min_new_tokens = n
        cfg.ignore_eos, cfg.do_sample, cfg.logprobs = True, False, logprobs
        if "draft_tokens" in out:
            cfg.num_assistant_tokens = out["draft_tokens"]
        return cfg

    warm = max(1, spec["warmup"])
    for w in range(warm):
        try:
            res = pipe.generate(inputs(w), config(1))
        except RuntimeError as exc:  # genai's sampler checks the log-sum-exp that logprobs need
            if "isnan" not in str(exc):
                raise
            raise RuntimeError(f"{spec['path']} computes NaN or Inf logits (a NaN weight?)") from None
        check_tokens(res.tokens[0], n)
        if not all(math.isfinite(s) for s in res.scores):
            raise RuntimeError(f"{spec['path']} computes NaN or Inf logits: output scores "
                               f"{list(res.scores)}")
    out["warmup_tokens"] = list(res.tokens[0][:16])  # greedy: shows whether an adapter acts
    runs = []
    for i in range(spec["repetitions"]):
        res = pipe.generate(inputs(warm + i), config(0))
        check_tokens(res.tokens[0], n)
        pm = res.perf_metrics
        total, ttft = pm.get_generate_duration().mean, pm.get_ttft().mean
        runs.append({"ttft_ms": ttft, "tpot_ms": (total - ttft) / max(1, n - 1),
                     "genai_tpot_ms": pm.get_tpot().mean, **(speculation(res) or {})})
        log(f"rep {i + 1}: ttft {ttft:.1f} ms, tpot {runs[-1]['tpot_ms']:.2f} ms")
    return {**out, "runs": runs, **summary(runs, p)}
