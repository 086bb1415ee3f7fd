"""The ``torch`` and ``torch-gptq+lora`` kinds: a Hugging Face directory through transformers.

``torch-gptq+lora`` is the seed baseline: a GPTQ checkpoint plus the un-merged peft adapter in
bf16, run in the baseline environment's Python (gptqmodel's kernels), where only the standard
library and this package's stdlib-only modules (host, timing) are imported beside torch.
"""

from __future__ import annotations

import time

import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig, LogitsProcessor, LogitsProcessorList

from tangquant.host import peak_rss_bytes
from tangquant.measure.timing import check_tokens, prompt_ids, repeat, summary


class _Clock:
    """A transformers streamer that timestamps the first generated token and the last one."""

    def __init__(self):
        self.calls: list[float] = []

    def put(self, value):  # first call: the prompt; then one call per generated token
        self.calls.append(time.perf_counter())

    def end(self):
        pass


def _finite_check():
    class FiniteCheck(LogitsProcessor):
        bad = 0

        def __call__(self, input_ids, scores):
            # -inf is legitimate (min_new_tokens masks EOS that way); NaN and +inf are not.
            if bool(torch.isnan(scores).any()) or bool(torch.isposinf(scores).any()):
                FiniteCheck.bad += 1
            return scores

    return FiniteCheck()


def _load_torch(spec: dict):
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
    return int(transformers.__version__.split(".")[0])


def run(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    model = _load_torch(spec)
    load_s = time.perf_counter() - start
    rss_loaded = peak_rss_bytes()
    p, n = spec["prompt_tokens"], spec["gen_tokens"]
    gen = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0, eos_token_id=None, bos_token_id=None)
    # transformers replaces every setting left at its global default with the model's own
    # (Qwen's sampling: top-k 20, top-p 0.8, repetition penalty): make greedy the model's default.
    for m in {id(x): x for x in (model, getattr(model, "get_base_model", lambda: model)())}.values():
        m.generation_config = gen

    def once(run: int, check: bool) -> dict:
        ids = torch.tensor([prompt_ids(spec["vocab"], p, run)], dtype=torch.long)
        clock, procs = _Clock(), LogitsProcessorList([_finite_check()] if check else [])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 generation_config=gen, logits_processor=procs, streamer=clock)
        tokens = out[0, p:].tolist()
        check_tokens(tokens, n)
        if check and procs[0].bad:
            raise RuntimeError(f"NaN/+Inf logits at {procs[0].bad} of {n} steps")
        first, last = clock.calls[1], clock.calls[-1]
        return {"ttft_ms": (first - t0) * 1000, "tpot_ms": (last - first) * 1000 / max(1, n - 1),
                "tokens": tokens[:16]}

    runs, checked = repeat(once, spec)
    return {"load_s": load_s, "rss_loaded_bytes": rss_loaded, "runs": runs, **summary(runs, p),
            "kernels": _kernel_names(model), "warmup_tokens": checked["tokens"],
            "lora_modules": sum(n.endswith(".lora_A") for n, _ in model.named_modules())}


def _kernel_names(model) -> list[str]:
    """The classes of the quantized linear layers, to show which kernel really ran."""
    return sorted({type(m).__name__ for m in model.modules() if "Quant" in type(m).__name__})
