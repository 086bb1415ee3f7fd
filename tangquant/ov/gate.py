"""The fidelity gate of ``tangquant tune``: does a setting compute what exact mode computes?

Runs in a bench worker process (``{"call": "tangquant.ov.gate:run", ...}``). Two checks on the
same held-out prompts (token ids):

- **greedy tokens** through openvino-genai with every option of the candidate
  (attention backend and scheduler included): the first ``steps`` tokens must be
  those of exact mode's pipeline;
- **KLD** through plain OpenVINO with the candidate's plugin properties, teacher
  forced on exact mode's greedy continuation, one decode step at a time (so a
  quantized KV cache is read back): mean KL(exact || candidate) per token, and
  whether the candidate's own argmax would have followed the same path.

Exact mode is :data:`REFERENCE`: f32 inference, no dynamic quantization, an f32
KV cache. The reference run saves its tokens and log-probabilities to an
``.npz`` that every candidate's run reads.
"""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino_genai as genai

from tangquant.ov.ir import EXACT_CONFIG, MODEL_XML
from tangquant.ov.options import DEFAULT_KEYS, pipeline_properties, properties

REFERENCE = {**EXACT_CONFIG, "KV_CACHE_PRECISION": "f32"}


def run(spec: dict) -> dict:
    options = dict(REFERENCE) if spec.get("reference_out") else dict(spec.get("options") or {})
    options.setdefault("INFERENCE_NUM_THREADS", spec["threads"])
    steps = int(spec["steps"])
    if spec.get("texts"):  # the reference run tokenizes the held-out prompts, for every run after
        spec["prompts"] = _tokenize(spec["path"], spec["texts"])
    prompts = [list(map(int, p)) for p in spec["prompts"]]
    genai_tokens = _genai_tokens(spec["path"], options, prompts, steps)
    plugin = properties(options, plugin_only=True)
    compiled = ov.Core().compile_model(f"{spec['path']}/{MODEL_XML}", "CPU", plugin)
    if spec.get("reference_out"):
        paths = [_decode(compiled, p, None, steps) for p in prompts]
        np.savez(spec["reference_out"], genai=np.array(genai_tokens, dtype=np.int64),
                 tokens=np.array([t for t, _ in paths], dtype=np.int64),
                 logprobs=np.stack([lp for _, lp in paths]))
        return {"reference": spec["reference_out"], "prompts": prompts, "genai_tokens": genai_tokens,
                "defaults": plugin_defaults()}
    ref = np.load(spec["reference"])
    klds, first_diff = [], []
    for i, p in enumerate(prompts):
        tokens, logprobs = _decode(compiled, p, ref["tokens"][i], steps)
        ref_lp = ref["logprobs"][i]
        klds.append(float((np.exp(ref_lp) * (ref_lp - logprobs)).sum(-1).mean()))
        mismatch = np.nonzero(logprobs.argmax(-1) != ref["tokens"][i])[0]
        first_diff.append(int(mismatch[0]) if mismatch.size else None)
    genai_diff = [_first_difference(a, b) for a, b in zip(genai_tokens, ref["genai"].tolist())]
    return {"kld": float(np.mean(klds)), "kld_max": float(np.max(klds)), "steps": steps,
            "prompts": len(prompts), "greedy_first_diff": first_diff, "genai_first_diff": genai_diff,
            "genai_identical": all(d is None for d in genai_diff)}


def plugin_defaults() -> dict[str, str]:
    """The CPU plugin's own values of the grid's keys (a candidate equal to them is not run)."""
    core, out = ov.Core(), {}
    for key in DEFAULT_KEYS:
        try:
            value = core.get_property("CPU", key)
        except RuntimeError:
            continue
        out[key] = value.get_type_name() if hasattr(value, "get_type_name") else str(value)
    return out


def _tokenize(path: str, texts: list[str]) -> list[list[int]]:
    """Each text as a chat user turn in the IR's own template, as token ids."""
    tok = genai.Tokenizer(path)
    out = []
    for text in texts:
        chat = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        out.append([int(t) for t in tok.encode(chat, add_special_tokens=False).input_ids.data[0]])
    return out


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
                None if len(a) == len(b) else min(len(a), len(b)))


def _genai_tokens(path: str, options: dict, prompts: list[list[int]], steps: int) -> list[list[int]]:
    pipe = genai.LLMPipeline(path, "CPU", **pipeline_properties(options))
    cfg = genai.GenerationConfig()
    cfg.max_new_tokens = cfg.min_new_tokens = steps
    cfg.ignore_eos, cfg.do_sample = True, False
    out = []
    for ids in prompts:
        arr = np.array([ids], dtype=np.int64)
        res = pipe.generate(genai.TokenizedInputs(ov.Tensor(arr), ov.Tensor(np.ones_like(arr))), cfg)
        out.append([int(t) for t in res.tokens[0]])
    return out


def stateful_feed(names: set[str], ids: np.ndarray, past: int) -> dict:
    """One infer request's inputs for a stateful text-generation IR whose KV cache holds ``past``."""
    n = ids.shape[1]
    feed = {"input_ids": ids, "attention_mask": np.ones((1, past + n), dtype=np.int64)}
    if "position_ids" in names:
        feed["position_ids"] = np.arange(past, past + n, dtype=np.int64)[None]
    if "beam_idx" in names:
        feed["beam_idx"] = np.zeros(1, dtype=np.int32)
    return feed


def _decode(compiled, prompt: list[int], forced, steps: int):
    """(tokens, log-probabilities [steps, vocab]) of a stateful IR: prefill, then one token per
    step — exact mode's greedy choice, or ``forced`` (teacher forcing on the reference path)."""
    req = compiled.create_infer_request()
    req.reset_state()
    names = {p.get_any_name() for p in compiled.inputs}
    ids, tokens, logprobs = np.array([prompt], dtype=np.int64), [], []
    past = 0
    for step in range(steps):
        n = ids.shape[1]
        req.infer(stateful_feed(names, ids, past))
        logits = req.get_output_tensor(0).data[0, -1].astype(np.float64)
        lp = logits - logits.max()
        lp = lp - np.log(np.exp(lp).sum())
        logprobs.append(lp.astype(np.float32))
        token = int(forced[step]) if forced is not None else int(lp.argmax())
        tokens.append(token)
        past += n
        ids = np.array([[token]], dtype=np.int64)
    return tokens, np.stack(logprobs)
