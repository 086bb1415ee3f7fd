"""The llama.cpp engine behind ``tangquant serve``: a GGUF in a child process, the same API.

Admission, the queue, 429, deadlines, cancellation and ``/metrics`` are :class:`Engine`'s, as
for the OpenVINO engines. Generation runs in one llama.cpp process
(:mod:`tangquant.gguf.process`) with ``--max-num-seqs`` sequences batched together, each with
its own slice of the KV cache; requests beyond them wait in that process, in order. Prompts are
templated and counted, and text decoded with stop strings applied, here, with the model's own
tokenizer. A watcher thread turns a client that went away or a passed deadline into a cancel.

llama.cpp runs outside the server's process (docs/design.md): when it dies, the requests it was
running fail (503, ``generation_failed``), the model loads again, and the server goes on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

from tangquant import files, host, load
from tangquant.errors import NumericalError, ServeError
from tangquant.generate import PROBE, Sampling
from tangquant.gguf import options as llama_options
from tangquant.gguf import text as llama_text
from tangquant.gguf.process import LlamaProcess, LlamaProcessError
from tangquant.gguf.reader import require_finite
from tangquant.server.config import ServeConfig
from tangquant.server.engine import Engine, Generation, Result
from tangquant.server.schema import MAX_TOP_LOGPROBS, ApiError

logger = logging.getLogger(__name__)

WATCH_S = 0.05
# ServeConfig fields that are OpenVINO's alone: a GGUF server refuses a value other than the default.
OPENVINO_ONLY = {"engine": "an OpenVINO engine choice", "enable_prefix_caching": "OpenVINO's prefix caching",
                 "ov_config": "OpenVINO properties", "device": "an OpenVINO device"}


@dataclass
class _Request:
    gen: Generation
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    admitted: float
    n_prompt: int
    text: llama_text.TextStream
    rid: int = 0
    started: float = 0.0
    first: float = 0.0
    last: float = 0.0
    tokens: int = 0
    cancelled: bool = False
    schema: bool = False
    queued: asyncio.Future | None = None   # None when the child built its sampler, else why not
    gaps: list = dataclasses.field(default_factory=list)


def _settle(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def refuse_settings(cfg: ServeConfig) -> None:
    """One line for a setting this engine cannot honour, never a silent drop."""
    defaults = {f.name: f.default for f in dataclasses.fields(ServeConfig)}
    for name, what in OPENVINO_ONLY.items():
        if getattr(cfg, name) != defaults[name]:
            raise ServeError(f"--{name.replace('_', '-')}: the llamacpp engine (llama.cpp) has no "
                             f"{what}; this model is a GGUF")


def open_engine(model_path, cfg: ServeConfig, name: str, options: dict | None = None,
                threads: int | None = None):
    refuse_settings(cfg)
    md = load.inspect(model_path, kinds=("gguf",))
    # A NaN weight can give finite logits (llama.cpp's 8-bit activations skip it): read them all.
    require_finite(md.path)
    return LlamaEngine(md, name, cfg, dict(options or {}), threads)


class LlamaEngine(Engine):
    max_top_logprobs = MAX_TOP_LOGPROBS  # the child has each step's logits

    def __init__(self, md: load.ModelDir, name: str, cfg: ServeConfig, options: dict,
                 threads: int | None):
        self.md = md
        super().__init__(md.path, name, cfg, {})
        self.options, self.kind = options, "llamacpp"
        defaults = llama_text.generation_defaults(md.path)
        self.sampling_defaults, self.eos = defaults, llama_text.eos_ids(defaults)
        self.defaults = SimpleNamespace(do_sample=bool(defaults.get("do_sample")),
                                        temperature=defaults.get("temperature", 1.0),
                                        top_p=defaults.get("top_p", 1.0),
                                        max_new_tokens=defaults.get("max_new_tokens"),
                                        top_k=defaults.get("top_k") or 0, min_p=defaults.get("min_p", 0.0),
                                        repetition_penalty=defaults.get("repetition_penalty", 1.0))
        n_ctx = llama_options.context_for(md.config, md.path, cfg.max_num_seqs, options, cfg.cache_size)
        self.proc = LlamaProcess(md.path, threads or host.physical_cores(), options, n_ctx=n_ctx,
                                 n_seqs=cfg.max_num_seqs,
                                 n_batch=max(cfg.max_num_batched_tokens or 512, cfg.max_num_seqs),
                                 probe=PROBE)
        if not self.proc.info.get("finite", True):
            self.proc.close()
            raise NumericalError(f"{md.path} computes NaN or Inf logits at its first step (a probe prompt "
                                 "at load): its weights are broken; export it again")
        self.context_length = int(self.proc.info["n_ctx_seq"])
        self.kv_bytes = int(llama_options.kv_bytes_per_token(md.config, options)
                            * self.context_length * cfg.max_num_seqs)
        logger.info("llama.cpp: %d sequence(s) of %d tokens (KV cache %s), %s threads, options %s",
                    cfg.max_num_seqs, self.context_length, files.human_size(self.kv_bytes),
                    threads or host.physical_cores(), options or "llama.cpp's defaults")
        self._lock = threading.Lock()
        self._requests: dict[int, _Request] = {}
        self._running, self._closing = 0, threading.Event()
        self._watch = threading.Thread(target=self._watcher, name="tangquant-llama-watch", daemon=True)
        self._watch.start()

    def _open_tokenizer(self, model_dir):
        self._tok_lock = threading.Lock()
        tokenizer = load.tokenizer(self.md)
        if not tokenizer.chat_template:
            raise ServeError(f"the tokenizer of {self.md.path} has no chat template")
        self._byte_level = llama_text.is_byte_level(tokenizer)
        return tokenizer, load.context_length(self.md.config)

    # -- what the API shows ------------------------------------------------------------------------
    def info(self) -> dict:
        manifest = files.read_manifest(self.md.path.parent) or {}
        exact = (manifest.get("metrics") or {}).get("q4_0_tensors_exact")
        return {**super().info(), "engine": self.kind,
                "weights": files.human_size(self.md.path.stat().st_size),
                "made_by": f"tangquant {manifest['stage']}" if manifest.get("stage") else None,
                "quantization": f"GGUF Q4_0, {exact} tensors the checkpoint's integers" if exact else None}

    def status(self) -> dict:
        return {**super().status(), "engine": self.kind}

    def running(self) -> int:
        return self._running

    def cache_usage(self) -> dict:
        with self._lock:
            used = sum(r.n_prompt + r.tokens for r in self._requests.values() if r.started)
        return {"fraction": used / (self.context_length * self.max_num_seqs), "bytes": self.kv_bytes}

    # -- prompts -----------------------------------------------------------------------------------
    # One tokenizer for the handlers' threads and the reader's: Hugging Face's fast tokenizer may
    # change its truncation settings inside a call, which another thread's call must not meet.
    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        with self._tok_lock:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False)

    def _encode(self, text: str) -> list[int]:
        with self._tok_lock:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text))

    def _decode(self, ids: list[int]) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    # -- tokens (/tokenize, /detokenize, logprobs): the same tokenizer --------------------------------
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        with self._tok_lock:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def detokenize(self, ids: list[int]) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def token_bytes(self, ids) -> list[bytes]:
        # Lookups and decoding only: nothing that changes the tokenizer's settings, so no lock.
        return llama_text.token_bytes(self.tokenizer, ids, self._byte_level)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    # -- generation --------------------------------------------------------------------------------
    async def start(self, prompt: str, sampling: Sampling, max_new: int, deadline: float,
                    model: str | None = None, json_schema: str | None = None, n_prompt: int = 0,
                    logprobs: int | None = None):
        if json_schema is not None and sampling.ignore_eos:  # a finished grammar allows only EOS
            raise ApiError(400, "ignore_eos cannot be combined with response_format on the llamacpp "
                           "engine", "ignore_eos", "unsupported_value")
        loop = asyncio.get_running_loop()
        ids = await asyncio.to_thread(self._encode, prompt)
        if not ids:
            raise ApiError(400, "the prompt is empty", "prompt", "invalid_value")
        req = _Request(Generation(loop, deadline), loop.create_future(), loop,
                       admitted=deadline - self.timeout, n_prompt=len(ids),
                       text=llama_text.TextStream(self._decode, sampling.stop),
                       schema=json_schema is not None, queued=loop.create_future())
        with self._lock:
            try:
                req.rid = self.proc.submit(ids, max_new, functools.partial(self._event, req),
                                           llama_text.sampler_settings(sampling, self.sampling_defaults),
                                           self.eos, sampling.ignore_eos, json_schema, logprobs)
            except LlamaProcessError as exc:  # it died and could not load the model again
                raise ApiError(503, str(exc), code="generation_failed", type_="server_error") from None
            self._requests[req.rid] = req
        if json_schema is not None:  # the child compiles the grammar: its refusal is this request's 400
            refused = await req.queued
            if refused:
                raise ApiError(400, f"response_format: {refused}", "response_format", "invalid_schema")
        return req.gen, req.future

    def _event(self, req: _Request, msg: dict) -> None:
        """One event of the llama.cpp process for ``req`` (on its reader thread)."""
        now = time.monotonic()
        if "refused" in msg and not req.schema:  # not this engine's doing: a failed request
            self._done(req, {"done": "cancelled", "error": msg["refused"]}, now)
            return
        if "queued" in msg or "refused" in msg:  # a schema's start waits for this
            if "refused" in msg:
                with self._lock:
                    self._requests.pop(req.rid, None)
            req.loop.call_soon_threadsafe(_settle, req.queued, msg.get("refused"))
            return
        if msg.get("started"):
            req.started = now
            with self._lock:
                self._running += 1
            return
        ids = msg.get("tokens") or []
        if ids and not req.text.stopped:
            if req.last:
                req.gaps.append(now - req.last)
            if "logprobs" in msg:
                req.gen.add_logprobs([(t, lp, tuple(map(tuple, top)))
                                      for t, (lp, top) in zip(ids, msg["logprobs"])])
            req.first, req.last, req.tokens = req.first or now, now, req.tokens + len(ids)
            if piece := req.text.write(ids):
                req.gen.push(piece)
            if req.text.stopped:
                self.proc.cancel(req.rid)
        if "done" in msg:
            self._done(req, msg, now)

    def _done(self, req: _Request, msg: dict, now: float) -> None:
        with self._lock:
            self._requests.pop(req.rid, None)
            self._running -= 1 if req.started else 0
        if tail := req.text.end():
            req.gen.push(tail)
        reason = "stop" if req.text.stopped else msg.get("done", "cancelled")
        started, n = req.started or now, req.tokens
        result = Result(text=req.text.text, prompt_tokens=req.n_prompt, completion_tokens=n,
                        finish_reason=reason, queue_s=started - req.admitted,
                        ttft_s=req.first - started if n else 0.0,
                        tpot_s=(req.last - req.first) / (n - 1) if n > 1 else 0.0,
                        duration_s=now - started, model=self.name, error=msg.get("error"),
                        gaps=tuple(req.gaps))
        try:
            req.loop.call_soon_threadsafe(self._resolve, req, result)
        except RuntimeError:  # the event loop is closed: nobody waits for it
            pass

    def _resolve(self, req: _Request, result: Result) -> None:
        _settle(req.queued, None)  # a start still waiting for the child goes on to this result
        if not req.future.done():
            req.future.set_result(result)
        self.finished(req.gen, result, req.admitted)

    def _watcher(self) -> None:
        """Cancel what a client left or a deadline passed (the child only hears of it from here)."""
        while not self._closing.wait(WATCH_S):
            with self._lock:
                stop = [r for r in self._requests.values() if not r.cancelled and r.gen.should_stop()]
            for req in stop:
                req.cancelled = True
                self.proc.cancel(req.rid)

    def close(self) -> None:
        self._closing.set()
        self._watch.join(timeout=5)
        self.proc.close()
        with self._lock:
            left = list(self._requests.values())
        for req in left:
            self._done(req, {"done": "cancelled", "error": "the server is shutting down"}, time.monotonic())
