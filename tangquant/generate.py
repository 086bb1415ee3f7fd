"""Text generation shared by chat, demo and serve: one ``Sampling`` type and two backends.

:class:`Sampling` holds a request's generation settings (None: the model's own
default) and refuses values no backend can take, with the same message for
``chat``'s flags and ``serve``'s request fields. :func:`open_generator` gives an
object with ``stream(messages, sampling)`` and ``generate(messages, sampling)``:
openvino-genai for an OpenVINO IR, transformers for any other model directory
(GPTQ dequantised exactly, a LoRA adapter applied with peft).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tangquant import deploy, engines, load
from tangquant import draft as drafts
from tangquant.errors import EngineError, InputError, ParameterError
from tangquant.gguf import options as llama_options
from tangquant.gguf import text as llama_text
from tangquant.gguf.process import LlamaProcess
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


class _Streamer:
    """Runs a blocking generate() in a thread and yields the text pieces it reports."""

    def __init__(self):
        self.pieces: queue.Queue = queue.Queue()
        self.stopped = threading.Event()

    def iterate(self, target) -> Iterator[str]:
        done = object()

        def work():
            try:
                target()
                self.pieces.put(done)
            except BaseException as exc:  # re-raised in the consuming thread
                self.pieces.put(exc)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            while (piece := self.pieces.get()) is not done:
                if isinstance(piece, BaseException):
                    raise piece
                yield piece
        finally:
            self.stopped.set()
            thread.join()


class OVGenerator(_ContextCap):
    def __init__(self, md: load.ModelDir, device: str = "CPU", ov_config: dict | None = None,
                 options: dict | None = None, threads: int | None = None, draft=None,
                 draft_tokens: int | None = None, **_):
        from tangquant.ov.options import pipeline_properties

        options = dict(options or {})
        props = {**pipeline_properties(options), **(ov_config or {})}
        if threads:
            props.setdefault("INFERENCE_NUM_THREADS", threads)
        device = options.get("device", device)
        if draft:
            import openvino_genai

            # The draft runs with the target's properties (precision, threads).
            props["draft_model"] = openvino_genai.draft_model(str(draft), device, **(ov_config or {}))
        self.pipe = load.genai_pipeline(md, device, **props)
        self.model_dir = md.path
        self.context = load.context_length(md.config)
        self.draft_tokens = (draft_tokens or drafts.DEFAULT_TOKENS) if draft else None
        self.speculation: dict | None = None  # the last reply's draft counts (None without a draft)

    def _prompt_tokens(self, messages: list[dict]) -> int:
        tokenizer = self.pipe.get_tokenizer()
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return int(tokenizer.encode(prompt, add_special_tokens=False).input_ids.get_shape()[1])

    def stream(self, messages: list[dict], sampling: Sampling = Sampling()) -> Iterator[str]:
        import openvino_genai

        streamer = _Streamer()
        max_new = self._cap(self._prompt_tokens(messages), sampling)
        config = genai_config(self.pipe.get_generation_config(), sampling, max_new)
        if self.draft_tokens:
            if config.is_multinomial():
                raise SamplingError("temperature", drafts.GREEDY_ONLY)
            config.num_assistant_tokens = self.draft_tokens
        history = openvino_genai.ChatHistory(messages)

        def on_piece(piece: str):
            streamer.pieces.put(piece)
            stop = streamer.stopped.is_set()
            return openvino_genai.StreamingStatus.STOP if stop else openvino_genai.StreamingStatus.RUNNING

        def work():
            self.speculation = speculation(self.pipe.generate(history, config, on_piece))

        yield from streamer.iterate(work)

    def generate(self, messages: list[dict], sampling: Sampling = Sampling()) -> str:
        return "".join(self.stream(messages, sampling))


def speculation(result) -> dict | None:
    """A drafted openvino-genai result's counts: draft tokens offered and accepted, the target's
    forward passes (its prefill included) and tokens generated; None for a plain one."""
    sd = getattr(result, "extended_perf_metrics", None)
    if sd is None or not hasattr(sd, "get_num_accepted_tokens"):
        return None
    main = sd.main_model_metrics
    return {"drafted": int(sd.get_num_draft_tokens()), "accepted": int(sd.get_num_accepted_tokens()),
            "target_passes": len(main.raw_metrics.m_durations),
            "generated": int(main.get_num_generated_tokens())}


class HFGenerator(_ContextCap):
    def __init__(self, md: load.ModelDir, adapter=None, allow_pickle: bool = False,
                 options: dict | None = None, **_):
        if options:
            raise EngineError(f"the torch engine's chat takes no options, got {', '.join(options)}")
        self.tokenizer = load.tokenizer(md)
        if not self.tokenizer.chat_template:
            raise InputError(f"the tokenizer in {md.path} has no chat template")
        self.model = load.torch_model(md, adapter=adapter, allow_pickle=allow_pickle)
        self.context = load.context_length(md.config)

    def _kwargs(self, sampling: Sampling, max_new: int | None) -> dict:
        kwargs = {"max_new_tokens": max_new} if max_new else {}
        if sampling.repetition_penalty is not None:  # greedy decoding applies it too
            kwargs["repetition_penalty"] = sampling.repetition_penalty
        if sampling.greedy:
            return {**kwargs, "do_sample": False, "temperature": None, "top_p": None, "top_k": None,
                    "min_p": None}
        if sampling.temperature is not None:
            kwargs.update(do_sample=True, temperature=sampling.temperature)
        for name in ("top_p", "top_k", "min_p"):
            if getattr(sampling, name) is not None:
                kwargs[name] = getattr(sampling, name)
        return kwargs

    def stream(self, messages: list[dict], sampling: Sampling = Sampling()) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 return_tensors="pt", return_dict=True)
        max_new = self._cap(int(ids["input_ids"].shape[1]), sampling)
        text_streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        streamer = _Streamer()

        class Stop(StoppingCriteria):
            def __call__(self, *args, **kwargs):
                return streamer.stopped.is_set()

        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        errors: list[BaseException] = []

        def work():
            try:
                with torch.no_grad():
                    self.model.generate(**ids, streamer=text_streamer,
                                        stopping_criteria=StoppingCriteriaList([Stop()]),
                                        **self._kwargs(sampling, max_new))
            except BaseException as exc:  # ends the text stream, re-raised by pump
                errors.append(exc)
                text_streamer.end()

        def pump():
            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            for piece in text_streamer:
                if piece:
                    streamer.pieces.put(piece)
            thread.join()
            if errors:
                raise errors[0]

        yield from streamer.iterate(pump)

    def generate(self, messages: list[dict], sampling: Sampling = Sampling()) -> str:
        return "".join(self.stream(messages, sampling))


class LlamaCppGenerator(_ContextCap):
    """A GGUF through llama.cpp in a child process (:mod:`tangquant.gguf.process`), prompts
    templated and text decoded with the model's own tokenizer."""

    def __init__(self, md: load.ModelDir, options: dict | None = None, threads: int | None = None,
                 draft=None, **_):
        from tangquant import host

        if draft:  # llama.cpp drafts in the bench (gguf/speculative.py), not in the child process
            raise EngineError("--draft with a GGUF: llama.cpp's chat and server run without a draft "
                              "here; draft with an IR pair, or measure a GGUF pair with `tangquant "
                              "bench --candidate NAME=llamacpp:T.gguf,draft=D.gguf`")
        self.tokenizer = load.tokenizer(md)
        if not self.tokenizer.chat_template:
            raise InputError(f"the tokenizer of {md.path} has no chat template")
        options = dict(options or {})
        self.proc = LlamaProcess(md.path, threads or host.physical_cores(), options,
                                 n_ctx=llama_options.context_for(md.config, md.path, 1, options),
                                 n_seqs=1)
        self.context = int(self.proc.info["n_ctx_seq"])
        self.defaults = llama_text.generation_defaults(md.path)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def stream(self, messages: list[dict], sampling: Sampling = Sampling()) -> Iterator[str]:
        ids = list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        max_new = self._cap(len(ids), sampling)  # never None: the context is known
        events: queue.Queue = queue.Queue()
        rid = self.proc.submit(ids, max_new, events.put, llama_text.sampler_settings(sampling, self.defaults),
                               llama_text.eos_ids(self.defaults), sampling.ignore_eos)
        text, done = llama_text.TextStream(self.decode, sampling.stop), None
        try:
            while done is None:
                event = events.get()
                piece = text.write(event.get("tokens", []))
                if piece:
                    yield piece
                if text.stopped:
                    self.proc.cancel(rid)
                done = event if "done" in event or "refused" in event else None
            if done.get("error") or done.get("refused"):
                raise EngineError(f"generation failed: {done.get('error') or done['refused']}")
            if tail := text.end():
                yield tail
        finally:
            if done is None:
                self.proc.cancel(rid)

    def generate(self, messages: list[dict], sampling: Sampling = Sampling()) -> str:
        return "".join(self.stream(messages, sampling))

    def close(self) -> None:
        self.proc.close()


PROBE = "写一首唐诗"  # the first step's prompt: any text the tokenizer takes


def require_finite_first_step(generator, where) -> None:
    """Refuse, in one line naming the model, a model whose first step computes NaN or Inf logits
    (a NaN scale, norm or weight no reader saw): greedy decoding would answer with empty text and
    sampling with noise, both as if all were well."""
    from tangquant.errors import NumericalError

    if isinstance(generator, OVGenerator):
        config = generator.pipe.get_generation_config()
        config.max_new_tokens, config.do_sample, config.logprobs = 1, False, 1
        try:
            scores = generator.pipe.generate([PROBE], config).scores
        except RuntimeError as exc:  # genai's sampler checks the log-sum-exp it needs for logprobs
            if "isnan" not in str(exc):
                raise
            scores = [math.nan]
        finite = all(math.isfinite(s) for s in scores)
    elif isinstance(generator, HFGenerator):
        import torch

        with torch.no_grad():
            logits = generator.model(**generator.tokenizer(PROBE, return_tensors="pt")).logits
        finite = bool(torch.isfinite(logits[0, -1]).all())
    else:
        return
    if not finite:
        raise NumericalError(f"{where} computes NaN or Inf logits at its first step: its weights are "
                             "broken (a NaN scale or norm?); export, quantize or merge it again")
