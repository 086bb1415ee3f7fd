"""The chat generators the engines table names: openvino-genai for an IR (a draft model too),
transformers for a Hugging Face directory, llama.cpp in a child process for a GGUF; each with
``stream(messages, sampling)`` and ``generate(messages, sampling)``. :func:`tangquant.generate.open_generator`
picks one; :func:`require_finite_first_step` refuses a model whose first step is not finite.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from typing import Iterator

from tangquant import draft as drafts
from tangquant import load
from tangquant.engines import ENGINES
from tangquant.errors import EngineError, InputError
from tangquant.generate import PROBE, Sampling, SamplingError, _ContextCap, genai_config
from tangquant.gguf import options as llama_options
from tangquant.gguf import text as llama_text
from tangquant.gguf.process import LlamaProcess

logger = logging.getLogger(__name__)


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
            ENGINES["llamacpp"].require("draft", "--draft")
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
