"""One benchmark measurement in a clean process: ``python -m tangquant.measure.worker SPEC_JSON``.

``tangquant bench`` starts one worker per candidate and thread count, so each
one's peak RSS is its own, and the seed baseline can run in another Python
(the baseline environment, where tangquant is not installed: this module
imports nothing of tangquant's beyond the standard library). The worker prints
exactly one JSON line on stdout: ``{"ok": true, ...metrics}`` or
``{"ok": false, "error": "..."}``; progress goes to stderr.

Spec keys: ``op`` ("generate" or "bandwidth"), ``kind``, ``path``, ``options``,
``prompt_tokens``, ``gen_tokens``, ``repetitions``, ``warmup``, ``threads``, ``vocab``.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

# Keys of a candidate's options that are not OpenVINO properties.
OV_OWN_KEYS = ("device", "adapter", "alpha", "lora_mode", "dtype", "cache_size",
               "enable_prefix_caching")


def _log(msg: str) -> None:
    print(f"[bench_worker] {msg}", file=sys.stderr, flush=True)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _prompt(vocab: int, n: int, run: int) -> list[int]:
    """Pseudo-random token ids, different for every run (tokenization is excluded, as in llama-bench).

    A new prompt each run matters: openvino-genai's default pipeline caches prefixes, and a
    repeated prompt would be served from that cache, measuring one token instead of a prefill.
    """
    import random

    rng = random.Random(1234 + run)
    return [rng.randrange(3, max(4, vocab)) for _ in range(n)]


def summary(runs: list[dict], p: int) -> dict:
    def ms(key):
        vals = [r[key] for r in runs]
        return statistics.fmean(vals), statistics.pstdev(vals) if len(vals) > 1 else 0.0

    pp = [p / (r["ttft_ms"] / 1000) for r in runs]
    tg = [1000 / r["tpot_ms"] for r in runs]
    out = {"pp_tps": statistics.fmean(pp), "pp_tps_std": statistics.pstdev(pp) if len(pp) > 1 else 0.0,
           "tg_tps": statistics.fmean(tg), "tg_tps_std": statistics.pstdev(tg) if len(tg) > 1 else 0.0,
           # llama-bench reports mean ± sd; the medians stay beside them for noisy hosts (one slow run)
           "pp_tps_median": statistics.median(pp), "tg_tps_median": statistics.median(tg)}
    out["ttft_ms"], out["ttft_ms_std"] = ms("ttft_ms")
    out["tpot_ms"], out["tpot_ms_std"] = ms("tpot_ms")
    return out


def _repeat(once, spec: dict) -> tuple[list[dict], dict]:
    """``once(run, check)`` for the uncounted warm-up (checked: tokens and finite logits), then for
    each repetition; returns the timed runs and the last warm-up's result."""
    warm = max(1, spec["warmup"])
    for w in range(warm):
        checked = once(w, check=True)
    runs = []
    for i in range(spec["repetitions"]):
        runs.append(once(warm + i, check=False))
        runs[-1].pop("tokens")
        _log(f"rep {i + 1}: ttft {runs[-1]['ttft_ms']:.1f} ms, tpot {runs[-1]['tpot_ms']:.2f} ms")
    return runs, checked


def _check_tokens(tokens, n: int) -> None:
    if len(tokens) != n:
        raise RuntimeError(f"produced {len(tokens)} of {n} tokens (empty or short output)")


# --- OpenVINO GenAI -------------------------------------------------------------------------

def _ov_value(value):
    """ov_config values arrive as strings; OpenVINO wants typed hints for a few keys."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return value


def scheduler_config(options: dict):
    """openvino-genai's SchedulerConfig from the ``cache_size`` (GB) and ``enable_prefix_caching``
    options (``tangquant tune`` sweeps them), or None when neither is given."""
    if "cache_size" not in options and "enable_prefix_caching" not in options:
        return None
    import openvino_genai as genai

    sched = genai.SchedulerConfig()
    if "cache_size" in options:
        sched.cache_size = int(options["cache_size"])
    if "enable_prefix_caching" in options:
        sched.enable_prefix_caching = _ov_value(str(options["enable_prefix_caching"]))
    return sched


def _ov_adapter(options: dict):
    import openvino_genai as genai

    adir = Path(options["adapter"])
    cfg = json.loads((adir / "adapter_config.json").read_text(encoding="utf-8"))
    # GenAI ignores adapter_config.json: the peft scale lora_alpha / r must be passed as alpha.
    alpha = float(options.get("alpha") or cfg["lora_alpha"] / cfg["r"])
    mode = str(options.get("lora_mode", "auto")).upper()
    adapter = genai.Adapter(str(adir / "adapter_model.safetensors"))
    return genai.AdapterConfig(adapter, alpha, getattr(genai.AdapterConfig.Mode, f"MODE_{mode}")), alpha


def run_ov(spec: dict) -> dict:
    import numpy as np
    import openvino as ov
    import openvino_genai as genai

    options, p, n = dict(spec.get("options") or {}), spec["prompt_tokens"], spec["gen_tokens"]
    props = {k: _ov_value(v) for k, v in options.items() if k not in OV_OWN_KEYS}
    props.setdefault("INFERENCE_NUM_THREADS", spec["threads"])
    out = {}
    if spec["kind"] == "ov+lora":
        props["adapters"], out["lora_alpha_scale"] = _ov_adapter(options)
    if scheduler_config(options) is not None:
        props["scheduler_config"] = scheduler_config(options)
    start = time.perf_counter()
    pipe = genai.LLMPipeline(spec["path"], options.get("device", "CPU"), **props)
    out.update(load_s=time.perf_counter() - start, rss_loaded_bytes=_peak_rss())

    def inputs(run: int):
        arr = np.array([_prompt(spec["vocab"], p, run)], dtype=np.int64)
        return genai.TokenizedInputs(ov.Tensor(arr), ov.Tensor(np.ones_like(arr)))

    def config(logprobs: int):
        cfg = genai.GenerationConfig()
        cfg.max_new_tokens = cfg.min_new_tokens = n
        cfg.ignore_eos, cfg.do_sample, cfg.logprobs = True, False, logprobs
        return cfg

    # The uncounted warm-up also checks the output: with logprobs the score is NaN if the logits are.
    warm = max(1, spec["warmup"])
    for w in range(warm):
        res = pipe.generate(inputs(w), config(1))
        _check_tokens(res.tokens[0], n)
        if not all(math.isfinite(s) for s in res.scores):
            raise RuntimeError(f"non-finite output scores {list(res.scores)} (NaN/Inf logits)")
    out["warmup_tokens"] = list(res.tokens[0][:16])  # greedy: shows whether an adapter acts
    runs = []
    for i in range(spec["repetitions"]):
        res = pipe.generate(inputs(warm + i), config(0))
        _check_tokens(res.tokens[0], n)
        pm = res.perf_metrics
        total, ttft = pm.get_generate_duration().mean, pm.get_ttft().mean
        runs.append({"ttft_ms": ttft, "tpot_ms": (total - ttft) / max(1, n - 1),
                     "genai_tpot_ms": pm.get_tpot().mean})
        _log(f"rep {i + 1}: ttft {ttft:.1f} ms, tpot {runs[-1]['tpot_ms']:.2f} ms")
    return {**out, "runs": runs, **summary(runs, p)}


# --- PyTorch / transformers ------------------------------------------------------------------

class _Clock:
    """A transformers streamer that timestamps the first generated token and the last one."""

    def __init__(self):
        self.calls: list[float] = []

    def put(self, value):  # first call: the prompt; then one call per generated token
        self.calls.append(time.perf_counter())

    def end(self):
        pass


def _finite_check():
    from transformers import LogitsProcessor

    class FiniteCheck(LogitsProcessor):
        bad = 0

        def __call__(self, input_ids, scores):
            import torch

            # -inf is legitimate (min_new_tokens masks EOS that way); NaN and +inf are not.
            if bool(torch.isnan(scores).any()) or bool(torch.isposinf(scores).any()):
                FiniteCheck.bad += 1
            return scores

    return FiniteCheck()


def _load_torch(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    options = spec.get("options") or {}
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[
        options.get("dtype", "bf16")]
    kwargs = {"dtype": dtype} if _transformers_major() >= 5 else {"torch_dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(spec["path"], device_map="cpu", **kwargs)
    if options.get("adapter"):
        from peft import PeftModel

        # Un-merged, as the seed runs it: the LoRA stays a separate branch on every target.
        model = PeftModel.from_pretrained(model, options["adapter"])
    return model.eval()


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def run_torch(spec: dict) -> dict:
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    model = _load_torch(spec)
    load_s = time.perf_counter() - start
    rss_loaded = _peak_rss()
    p, n = spec["prompt_tokens"], spec["gen_tokens"]
    gen = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0, eos_token_id=None, bos_token_id=None)
    # transformers replaces every setting left at its global default with the model's own
    # (Qwen's sampling: top-k 20, top-p 0.8, repetition penalty): make greedy the model's default.
    for m in {id(x): x for x in (model, getattr(model, "get_base_model", lambda: model)())}.values():
        m.generation_config = gen

    def once(run: int, check: bool) -> dict:
        ids = torch.tensor([_prompt(spec["vocab"], p, run)], dtype=torch.long)
        clock, procs = _Clock(), LogitsProcessorList([_finite_check()] if check else [])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 generation_config=gen, logits_processor=procs, streamer=clock)
        tokens = out[0, p:].tolist()
        _check_tokens(tokens, n)
        if check and procs[0].bad:
            raise RuntimeError(f"NaN/+Inf logits at {procs[0].bad} of {n} steps")
        first, last = clock.calls[1], clock.calls[-1]
        return {"ttft_ms": (first - t0) * 1000, "tpot_ms": (last - first) * 1000 / max(1, n - 1),
                "tokens": tokens[:16]}

    runs, checked = _repeat(once, spec)
    return {"load_s": load_s, "rss_loaded_bytes": rss_loaded, "runs": runs, **summary(runs, p),
            "kernels": _kernel_names(model), "warmup_tokens": checked["tokens"],
            "lora_modules": sum(n.endswith(".lora_A") for n, _ in model.named_modules())}


def _kernel_names(model) -> list[str]:
    """The classes of the quantized linear layers, to show which kernel really ran."""
    return sorted({type(m).__name__ for m in model.modules() if "Quant" in type(m).__name__})


# --- STREAM-style DRAM bandwidth -------------------------------------------------------------

def run_bandwidth(spec: dict) -> dict:
    """Copy (2 arrays), triad (3 arrays) and the read-only kernels on >= 1 GB fp32 tensors; best
    of several, in GB/s."""
    import torch

    torch.set_num_threads(spec["threads"])
    n = int(spec.get("bytes", 2**30)) // 4
    a, b, c = torch.empty(n), torch.ones(n), torch.full((n,), 2.0)
    a.zero_()
    best = {"copy": 0.0, "triad": 0.0}
    for _ in range(int(spec.get("trials", 6))):
        t0 = time.perf_counter()
        a.copy_(b)
        t1 = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        t2 = time.perf_counter()
        best["copy"] = max(best["copy"], 2 * 4 * n / (t1 - t0) / 1e9)
        best["triad"] = max(best["triad"], 3 * 4 * n / (t2 - t1) / 1e9)
    if float(a[n // 2]) != 7.0:
        raise RuntimeError("triad gave a wrong result")
    del a, b, c
    from tangquant.measure.roofline import read_kernels  # only tangquant's python runs this op

    reads = read_kernels(4 * n, int(spec.get("trials", 6)))
    return {"copy_gbs": best["copy"], "triad_gbs": best["triad"], "array_bytes": 4 * n,
            "read_gbs": max(reads.values()), "read_kernels_gbs": reads, "torch": torch.__version__}


def _versions() -> dict:
    from importlib import metadata

    import platform

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "optimum", "gptqmodel", "openvino",
                 "openvino-genai", "openvino-tokenizers", "llama-cpp-python", "gguf"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        spec = json.loads(argv[0])
        op = spec.get("op", "generate")
        if op == "bandwidth":
            result = run_bandwidth(spec)
        elif op == "fidelity":  # tangquant tune's gate: tangquant's environment only
            from tangquant.ov import gate

            result = gate.run(spec)
        elif spec["kind"] in ("ov", "ov+lora"):
            result = run_ov(spec)
        elif spec["kind"] == "llamacpp":
            from tangquant.measure.llamacpp import run_llamacpp  # imports llama_cpp

            result = run_llamacpp(spec)
        else:
            result = run_torch(spec)
        result.update(ok=True, peak_rss_bytes=_peak_rss(), worker_versions=_versions(),
                      pid=os.getpid())
    except Exception as exc:  # the parent reports any failure as a failed candidate
        import traceback

        traceback.print_exc(file=sys.stderr)
        msg = str(exc).strip().splitlines()
        result = {"ok": False, "error": f"{type(exc).__name__}: {msg[0] if msg else ''}"[:500]}
    # The last stdout line is the result, whatever a library printed before it.
    print("\n" + json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
