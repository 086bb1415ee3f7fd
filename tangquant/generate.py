"""Text generation shared by chat, demo and serve: one ``Sampling`` type and the generator's door.

:class:`Sampling` holds a request's generation settings (None: the model's own
default) and refuses values no backend can take, with the same message for
``chat``'s flags and ``serve``'s request fields. :func:`open_generator` gives an
object with ``stream(messages, sampling)`` and ``generate(messages, sampling)``, the
engine's chat entry in the engines table (:mod:`tangquant.generators`): openvino-genai
for an OpenVINO IR, llama.cpp for a GGUF, transformers for any other model directory
(GPTQ dequantised exactly, a LoRA adapter applied with peft).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from tangquant import deploy, engines, load
from tangquant import draft as drafts
from tangquant.errors import EngineError, InputError, ParameterError
from tangquant.ov.ir import MODEL_XML, is_ir_dir

logger = logging.getLogger(__name__)

MAX_STOP = 4
MAX_TOP_K = (1 << 31) - 1  # llama.cpp's top_k is a C int
MAX_REPETITION_PENALTY = 10.0  # beyond any published setting; 1 is none


@dataclass(frozen=True)
class Sampling:
    """Generation settings; temperature 0 means greedy decoding, None the model's default."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    ignore_eos: bool = False   # vLLM's extension; benchmarks use it for fixed-length replies
    top_k: int | None = None   # 0: no limit
    min_p: float | None = None
    repetition_penalty: float | None = None  # Hugging Face's: over the prompt and the reply

    def __post_init__(self):
        _check(self.max_new_tokens is None or self.max_new_tokens >= 1, "max_new_tokens",
               f"must be at least 1, got {self.max_new_tokens}")
        _check_range("temperature", self.temperature, 0.0, 2.0)
        _check_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check(len(self.stop) <= MAX_STOP and all(self.stop), "stop",
               f"must be at most {MAX_STOP} non-empty strings")
        _check(self.top_k is None or 0 <= self.top_k <= MAX_TOP_K, "top_k",
               f"must be an integer in [0, {MAX_TOP_K}] (0: no limit), got {self.top_k}")
        _check_range("min_p", self.min_p, 0.0, 1.0, high_open=True)  # genai's range; 1 is greedy
        _check_range("repetition_penalty", self.repetition_penalty, 0.0, MAX_REPETITION_PENALTY,
                     low_open=True)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class SamplingError(ParameterError):
    """A generation setting out of range; ``param`` names it (for the server's 400)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _check(ok: bool, name: str, what: str) -> None:
    if not ok:
        raise SamplingError(name, f"{name} {what}")


def _check_range(name: str, value, low: float, high: float, low_open: bool = False,
                 high_open: bool = False) -> None:
    if value is None:
        return
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    _check(math.isfinite(value) and not too_low and not too_high, name,
           f"must be a finite number in {interval}, got {value}")


def fit_context(n_prompt: int, wanted: int | None, context: int | None) -> tuple[int | None, bool]:
    """(new tokens to allow, whether ``wanted`` was cut): never past the model's context.

    A prompt that already fills the context is refused; ``wanted`` None (the model's default,
    possibly unbounded) becomes the room left.
    """
    if context is None:
        return wanted, False
    room = context - n_prompt
    if room < 1:
        raise SamplingError("messages", f"the prompt has {n_prompt} tokens but the model's context is "
                            f"{context}: shorten it (or start over with `clear`)")
    if wanted is None or wanted > room:
        return room, wanted is not None
    return wanted, False


class _ContextCap:
    """Caps each reply at the context left after its prompt, warning once per generator."""

    context: int | None = None
    _warned = False

    def _cap(self, n_prompt: int, sampling: "Sampling") -> int | None:
        n, cut = fit_context(n_prompt, sampling.max_new_tokens, self.context)
        if cut and not self._warned:
            self._warned = True
            logger.warning("warning: replies are capped at the model's context of %d tokens (this "
                           "prompt has %d, so at most %d new tokens instead of %d)", self.context,
                           n_prompt, n, sampling.max_new_tokens)
        return n

    def close(self) -> None:
        """Release what the generator holds beyond memory (a child process)."""


def genai_config(base, sampling: Sampling, max_new_tokens: int | None = None):
    """openvino-genai's GenerationConfig: ``base`` (the model's defaults, a copy) + ``sampling``."""
    cfg = base
    if max_new_tokens or sampling.max_new_tokens:
        cfg.max_new_tokens = max_new_tokens or sampling.max_new_tokens
    if sampling.temperature is not None:
        cfg.do_sample = sampling.temperature > 0
        if cfg.do_sample:
            cfg.temperature = sampling.temperature
    if sampling.top_p is not None:
        cfg.top_p = sampling.top_p
    if sampling.stop:
        cfg.stop_strings = set(sampling.stop)
    if sampling.seed is not None:
        cfg.rng_seed = sampling.seed % (1 << 63)
    if sampling.presence_penalty is not None:
        cfg.presence_penalty = sampling.presence_penalty
    if sampling.frequency_penalty is not None:
        cfg.frequency_penalty = sampling.frequency_penalty
    if sampling.top_k is not None:
        cfg.top_k = sampling.top_k  # genai's filter skips 0, as "no limit"
    if sampling.min_p is not None:
        cfg.min_p = sampling.min_p
    if sampling.repetition_penalty is not None:
        cfg.repetition_penalty = sampling.repetition_penalty
    cfg.ignore_eos = sampling.ignore_eos
    return cfg


def open_generator(model_dir, adapter=None, allow_pickle: bool = False, device: str = "CPU",
                   ov_config: dict | None = None, draft=None, draft_tokens: int | None = None):
    """A generator for ``model_dir`` in the engine its format has a chat entry for (the engines
    table): an OpenVINO IR through openvino-genai (``ov_config`` e.g. ``ov.ir.EXACT_CONFIG``), a
    GGUF through llama.cpp, a Hugging Face directory through transformers (fp32; ``adapter``);
    or, for a deployment directory (``tangquant tune --apply``), the engine, file and settings
    it chose. ``draft``: a draft model in the same format with the same tokenizer (checked),
    proposing ``draft_tokens`` per step."""
    engine, md, settings = open_model(model_dir, "chat", allow_pickle)
    if adapter:
        engine.require("adapter", "--adapter")
    extra = {}
    if draft_tokens is not None and not draft:
        raise ParameterError("--draft-tokens needs --draft DIR")
    if draft:
        engine.require("draft", "--draft")
        draft_md = load.inspect(draft, kinds=engine.models, what="draft")
        drafts.check(md.path, draft_md.path)
        extra = {"draft": draft_md.path, "draft_tokens": draft_tokens or drafts.DEFAULT_TOKENS}
    return engines.entry(engine.chat)(md, adapter=adapter, allow_pickle=allow_pickle, device=device,
                                      ov_config=ov_config, **settings, **extra)


def open_model(model, use: str, allow_pickle: bool = False):
    """(engine row, checked model, settings) for ``chat`` or ``serve`` (``use``): a deployment's
    choice (``options``, ``threads``), or the engine the model's format runs in."""
    if deploy.find(model) is not None:
        choice = deploy.read(model).chosen
        engine = engines.get(choice.engine)
        if not getattr(engine, use):
            raise EngineError(f"{model}: its {choice.engine} engine has no `tangquant {use}`")
        md = load.inspect(choice.model, kinds=engine.models)
        logger.info("deployment %s: %s", model, choice.describe())
        return engine, md, {"options": choice.options, "threads": choice.threads}
    kinds = tuple(dict.fromkeys(k for e in engines.ENGINES.values() if getattr(e, use) for k in e.models))
    if "hf" not in kinds and Path(model).is_dir() and not (is_ir_dir(Path(model)) or load.is_gguf(model)):
        raise InputError(f"{model} is not an exported OpenVINO model (no {MODEL_XML}), a GGUF or a "
                         "deployment; make one with `tangquant export` (or `tangquant tune --apply`)")
    md = load.inspect(model, kinds=kinds, allow_pickle=allow_pickle)
    return engines.for_model(md.kind, use), md, {}


PROBE = "写一首唐诗"  # the first step's prompt: any text the tokenizer takes
