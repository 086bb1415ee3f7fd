"""The fidelity gate of ``tangquant tune`` for a GGUF in llama.cpp, against the IR's exact mode.

Runs in a bench worker process (``{"call": "tangquant.gguf.gate:run", ...}``) after
:mod:`tangquant.ov.gate` has made the reference: the IR in exact mode (f32, no dynamic
quantization, an f32 KV cache) on the held-out prompts, tokenized by the IR's tokenizer (the
GGUF holds the same vocabulary). The same two checks, with the candidate's llama.cpp options
(``repack``, ``ctk``/``ctv``, ``fa``) and threads:

- **greedy tokens**: llama.cpp's own greedy continuation of each prompt must be the reference's
  for ``steps`` tokens;
- **KLD**: teacher forced on the reference's continuation, one decode step at a time (so a
  quantized KV cache is read back, as in decoding): mean KL(exact || candidate) per token, and
  where the candidate's argmax would first have left the reference path.

The result has the keys the OpenVINO gate's has (``genai_*`` name the engine's own generation).
"""

from __future__ import annotations

import numpy as np

from tangquant.gguf.runtime import LlamaCppError, Session, session_options


def run(spec: dict) -> dict:
    ref = np.load(spec["reference"])
    prompts = [list(map(int, p)) for p in spec["prompts"]]
    steps = int(spec["steps"])
    s = Session(spec["path"], threads=spec["threads"], n_ctx=max(map(len, prompts)) + steps + 8,
                n_batch=max(map(len, prompts)), **session_options(spec.get("options") or {}))
    try:
        if s.n_vocab != ref["logprobs"].shape[-1]:
            raise LlamaCppError(f"the GGUF has {s.n_vocab} tokens, the IR {ref['logprobs'].shape[-1]}: "
                                "not the same model")
        klds, first_diff, own_diff = [], [], []
        for i, prompt in enumerate(prompts):
            want = [int(t) for t in ref["tokens"][i]]
            own_diff.append(_first_difference(s.greedy(prompt, steps), want))
            logprobs = _forced(s, prompt, want)
            ref_lp = ref["logprobs"][i]
            klds.append(float((np.exp(ref_lp) * (ref_lp - logprobs)).sum(-1).mean()))
            mismatch = np.nonzero(logprobs.argmax(-1) != np.array(want))[0]
            first_diff.append(int(mismatch[0]) if mismatch.size else None)
    finally:
        s.close()
    return {"kld": float(np.mean(klds)), "kld_max": float(np.max(klds)), "steps": steps,
            "prompts": len(prompts), "greedy_first_diff": first_diff, "genai_first_diff": own_diff,
            "genai_identical": all(d is None for d in own_diff), "engine": "llamacpp"}


def _forced(s: Session, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """Log-probabilities [steps, vocab] after the prompt and after each forced token."""
    s.clear()
    rows = [s.decode(prompt, 0)]
    for i, t in enumerate(tokens[:-1]):
        rows.append(s.decode([t], len(prompt) + i))
    logits = np.stack(rows).astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    return (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32)


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
                None if len(a) == len(b) else min(len(a), len(b)))
