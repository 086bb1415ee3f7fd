"""ONNX Runtime GenAI's Python API: a model directory on the CPU with set threads, greedy generation.

``append_tokens`` runs the prefill (its logits give the first token); each later
``generate_next_token`` decodes the previous token, then picks the next one, so ``n`` tokens are
one prefill and ``n − 1`` single-token steps. ``min_length`` holds EOS off, as every bench kind
ignores EOS.

``python -m tangquant.ortgenai.runtime SPEC_JSON`` is the export's smoke test in a separate
process (a crash in onnxruntime must fail the export, not kill it); it prints one JSON line.
"""

from __future__ import annotations

import json
import sys

import numpy as np

try:
    import onnxruntime_genai as og
except ImportError as exc:  # the bench worker reports this line as the failed row's reason
    raise ImportError("onnxruntime-genai is not installed: pip install 'tangquant[ortgenai]'") from exc


def load(path, threads: int | None = None):
    """The model on ONNX Runtime's CPU provider, ``threads`` intra-op threads (its default: all cores)."""
    config = og.Config(str(path))
    config.clear_providers()  # the CPU provider, whatever device the directory was built for
    if threads:
        options = {"intra_op_num_threads": int(threads), "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    return og.Model(config)


def generator(model, length: int):
    """A greedy generator for ``length`` tokens in all (prompt included), EOS held off until then."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=length, min_length=length, do_sample=False)
    return og.Generator(model, params)


def prefill(gen, prompt: list[int]) -> None:
    gen.append_tokens(np.asarray([prompt], dtype=np.int32))


def step(gen, check: bool = False) -> tuple[int, bool]:
    """Pick the next token (decoding the previous one first, after the prefill's); (token, finite?)."""
    gen.generate_next_token()
    finite = bool(np.isfinite(gen.get_logits()).all()) if check else True
    return int(gen.get_next_tokens()[0]), finite


def greedy(model, prompt: list[int], n: int) -> tuple[list[int], int]:
    """``n`` greedy tokens after ``prompt`` and the number of steps with non-finite logits."""
    gen = generator(model, len(prompt) + n)
    prefill(gen, prompt)
    tokens, bad = [], 0
    while len(tokens) < n and not gen.is_done():
        token, finite = step(gen, check=True)
        tokens.append(token)
        bad += not finite
    return tokens, bad


def smoke(spec: dict) -> dict:
    """Load ``path``, generate ``n`` tokens after ``ids``; ONNX Runtime GenAI's own tokenizer must
    encode ``text`` as ``ids`` say (the Hugging Face tokenizer's encoding)."""
    model = load(spec["path"], spec.get("threads"))
    tokens, bad = greedy(model, spec["ids"], spec.get("n", 4))
    if bad or len(tokens) != spec.get("n", 4) or not all(0 <= t < spec["vocab"] for t in tokens):
        raise RuntimeError(f"generated {tokens} ({bad} steps with NaN/Inf logits)")
    own = list(og.Tokenizer(model).encode(spec["text"])) if spec.get("text") else None
    return {"tokens": tokens, "tokenizer_matches": own == spec["ids"] if own is not None else None,
            "onnxruntime_genai": og.__version__}


if __name__ == "__main__":
    try:
        result = {"ok": True, **smoke(json.loads(sys.argv[1]))}
    except Exception as exc:  # the parent turns any failure into an ExportError
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    print("\n" + json.dumps(result), flush=True)
