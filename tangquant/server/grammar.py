"""A ``response_format`` grammar compiled by the engine's own XGrammar before its request is queued.

openvino-genai compiles a request's grammar inside ``step()``, when the request is first
scheduled. A grammar XGrammar refuses throws out of that step after the other requests of the
batch were handed to the sampler but before their iteration finished, so the shared pipeline's
state is undefined and every request in it fails with the bad one. genai 2026.4 binds no call
that compiles a grammar alone (``StructuredOutputConfig::validate(Tokenizer&)`` is C++ only).

So :class:`GrammarCheck` compiles it the way the step will: a one-token ``generate()`` of a
stateless stand-in model (no weights; its logits are zeros over the served model's vocabulary)
in an ``LLMPipeline`` holding the served model's tokenizer. genai's sampler builds the same
XGrammar tokenizer info (vocabulary, vocabulary size, EOS) and compiles the same grammar; what
XGrammar refuses there is the request's 400, and the shared pipeline never meets it.
"""

from __future__ import annotations

import logging
import re
import tempfile
import threading
from pathlib import Path

import numpy as np
import openvino as ov
import openvino_genai
from openvino import opset13 as ops

from tangquant.errors import ServeError

logger = logging.getLogger(__name__)

# XGrammar's messages start with its source position and the failed check: the reason follows.
_WHERE = re.compile(r"^.*?\.(?:cc|cpp|h):\d+: (?:Check failed: .*? is false: )?")
_ECHO = ". The JSON string is:"  # XGrammar quotes the whole schema after this


def stand_in(vocab_size: int) -> tuple[str, ov.Tensor]:
    """(IR text, weights) of a model with the inputs a stateless LLM takes and zero logits."""
    names = ("input_ids", "attention_mask", "position_ids")
    params = [ops.parameter([-1, -1], ov.Type.i64, name=n) for n in names]
    params.append(ops.parameter([-1], ov.Type.i32, name="beam_idx"))
    for p in params:
        p.output(0).set_names({p.get_friendly_name()})
    shape = ops.concat([ops.shape_of(params[0]), ops.constant(np.array([vocab_size], np.int64))], 0)
    logits = ops.broadcast(ops.constant(np.zeros([], np.float32)), shape)
    logits.output(0).set_names({"logits"})
    with tempfile.TemporaryDirectory(prefix="tangquant-grammar-") as tmp:
        ov.save_model(ov.Model([logits], params, "grammar_check"), Path(tmp) / "m.xml",
                      compress_to_fp16=False)
        return (Path(tmp) / "m.xml").read_text(), ov.Tensor(np.fromfile(Path(tmp) / "m.bin", np.uint8))


def reason(exc: BaseException) -> str:
    """XGrammar's refusal without its source position or its echo of the schema."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = _WHERE.sub("", lines[-1] if lines else type(exc).__name__)
    return text.split(_ECHO)[0].strip()[:300] or type(exc).__name__


class GrammarCheck:
    """Compile JSON-schema grammars as the served model's pipeline will (one at a time)."""

    def __init__(self, model_dir: Path, vocab_size: int):
        xml, weights = stand_in(vocab_size)
        tokenizer = openvino_genai.Tokenizer(str(model_dir))  # its own: the handlers use theirs
        self._pipe = openvino_genai.LLMPipeline(xml, weights, tokenizer, "CPU",
                                                ATTENTION_BACKEND="SDPA")
        self._lock = threading.Lock()
        if why := self.refusal('{"type": "object"}'):  # the stand-in itself must work
            raise ServeError(f"openvino-genai cannot compile a JSON-schema grammar for {model_dir}: {why}")

    def refusal(self, json_schema: str) -> str | None:
        """None when XGrammar compiles ``json_schema``, else why not (its own words)."""
        config = self._pipe.get_generation_config()
        config.max_new_tokens, config.do_sample, config.apply_chat_template = 1, False, False
        config.structured_output_config = openvino_genai.StructuredOutputConfig(json_schema=json_schema)
        with self._lock:
            try:
                self._pipe.generate("0", config)
            except (RuntimeError, OverflowError, ValueError) as exc:
                logger.debug("grammar refused: %s", exc)
                return reason(exc)
        return None
