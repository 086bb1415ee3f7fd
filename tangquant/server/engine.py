"""What every generation engine behind ``tangquant serve`` shares: admission, prompts, results.

Two engines implement :class:`Engine`: ``batch.BatchEngine`` (the default: one
openvino-genai ``ContinuousBatchingPipeline`` for all requests, stepped by one
thread) and ``pool.PoolEngine`` (the old design, one ``LLMPipeline`` per
sequence, kept to compare against). Admission counts requests, not sockets: at
most ``max_num_seqs`` generate and ``queue_size`` more wait; beyond that a
request is refused at once with 429 and ``Retry-After``. A generation stops
early when its client goes away or its deadline passes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import openvino_genai

from tangquant.files import human_size, read_manifest
from tangquant.generate import MAX_TOP_K, Sampling, genai_config
from tangquant.server.config import ServeConfig
from tangquant.server.schema import ApiError
from tangquant.server.sizing import kv_shape

logger = logging.getLogger(__name__)

FINISH = {"STOP": "stop", "LENGTH": "length"}
COUNTS = ("completed", "cancelled", "timed_out", "refused_busy", "failed")


@dataclass
class Result:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str          # "stop", "length", or "cancelled"
    queue_s: float              # admitted -> generation started
    ttft_s: float               # generation started -> first token
    tpot_s: float               # mean time per further token
    duration_s: float
    model: str = ""
    error: str | None = None    # the engine could not finish it (e.g. out of KV cache)
    gaps: tuple = ()            # seconds between successive steps that gave it tokens


def _quantization(manifest: dict) -> str | None:
    """A short description of an exported model's weights, from its ``tangquant.json``."""
    metrics = manifest.get("metrics") or {}
    if not metrics.get("int4_layers"):
        return None
    text = f"INT4 linear layers, group {metrics.get('group_size')}"
    if metrics.get("embeddings"):
        text += f"; embeddings {metrics['embeddings'].upper()}"
    return text


class Generation:
    """One request's generation: text chunks arrive on an asyncio queue, ``None`` ends them."""
    def __init__(self, loop: asyncio.AbstractEventLoop, deadline: float):
        self.chunks: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self.deadline = deadline
        self.timed_out = False
        self._loop = loop
        # (token id, log-probability, ((id, log-probability), ...) alternatives) per token, when
        # the request asked; on the event loop, so entries come before the text pushed after them.
        self.logprobs: list[tuple] = []

    def push(self, text: str | None) -> None:
        """Hand a chunk (or the end, ``None``) to the event loop; callable from any thread."""
        self._loop.call_soon_threadsafe(self.chunks.put_nowait, text)

    def add_logprobs(self, entries: list[tuple]) -> None:
        """Hand tokens' log-probabilities to the event loop; callable from any thread."""
        self._loop.call_soon_threadsafe(self.logprobs.extend, entries)

    def should_stop(self) -> bool:
        if time.monotonic() > self.deadline:
            self.timed_out = True
        return self.cancel.is_set() or self.timed_out

    async def texts(self):
        while (text := await self.chunks.get()) is not None:
            yield text


class Engine:
    """The shared half of an engine; subclasses load the model and implement ``start``.

    ``max_top_logprobs``: the most alternatives the engine gives with a token's log-probability
    (openvino-genai 2026.4 gives the chosen token's alone: 0), None when it gives none.
    """

    max_top_logprobs: int | None = 0

    def __init__(self, model_dir: Path, name: str, cfg: ServeConfig, properties: dict):
        self.model_dir, self.name, self.cfg = model_dir, name, cfg
        self.properties = dict(properties)  # OpenVINO properties the model was compiled with
        self.max_num_seqs, self.queue_size = cfg.max_num_seqs, cfg.queue_size
        self.max_tokens_limit, self.timeout = cfg.max_tokens_limit, cfg.timeout
        # A tokenizer of its own: prompts are templated and counted off the generating thread.
        self.tokenizer, self.context_length = self._open_tokenizer(model_dir)
        self._vocab_bytes: dict[int, bytes] | None = None
        self.adapter_names: tuple[str, ...] = ()
        self.defaults = None          # the model's GenerationConfig, set by the subclass
        self.admitted = 0
        self.counts = dict.fromkeys(COUNTS, 0)
        self.observers: list = []     # called with each finished Result (metrics)
        self._mean_s = 5.0            # running mean request time, for Retry-After
        self.created = int(time.time())

    def _open_tokenizer(self, model_dir: Path):
        """(the tokenizer, the context length): openvino-genai's and config.json's for an IR."""
        return openvino_genai.Tokenizer(str(model_dir)), kv_shape(model_dir).context

    # -- what the API shows ---------------------------------------------------------------------
    def models(self) -> tuple[str, ...]:
        return (self.name, *self.adapter_names)

    def info(self) -> dict:
        d = self.defaults
        manifest = read_manifest(self.model_dir) or {}
        weights = self.model_dir / "openvino_model.bin"
        return {
            "context_length": self.context_length, "max_tokens_limit": self.max_tokens_limit,
            "engine": self.cfg.engine, "max_num_seqs": self.max_num_seqs,
            "max_concurrency": self.max_num_seqs, "queue_size": self.queue_size,
            "timeout_s": self.timeout,
            "weights": human_size(weights.stat().st_size) if weights.is_file() else None,
            "made_by": f"tangquant {manifest['stage']}" if manifest.get("stage") else None,
            "quantization": _quantization(manifest),
            "defaults": {"temperature": d.temperature if d.do_sample else 0.0,
                         "top_p": d.top_p, "max_tokens": min(d.max_new_tokens,
                                                             self.max_tokens_limit),
                         "top_k": d.top_k if 0 < d.top_k <= MAX_TOP_K else 0,
                         "min_p": d.min_p, "repetition_penalty": d.repetition_penalty},
        }

    def running(self) -> int:
        raise NotImplementedError

    def cache_usage(self) -> dict:
        """KV cache use (fraction, bytes) where the engine knows it."""
        return {}

    def status(self) -> dict:
        running = self.running()
        return {"running": running, "queued": max(0, self.admitted - running),
                "engine": self.cfg.engine, "max_num_seqs": self.max_num_seqs,
                "max_concurrency": self.max_num_seqs, "queue_size": self.queue_size,
                **self.counts}

    # -- admission -----------------------------------------------------------------------------
    def admit(self) -> float:
        """Take a place in the queue or refuse with 429; return the request's deadline."""
        if self.admitted >= self.max_num_seqs + self.queue_size:
            waves = self.admitted / self.max_num_seqs
            retry = min(60, max(1, math.ceil(waves * self._mean_s)))
            self.counts["refused_busy"] += 1
            raise ApiError(429, "the server is busy: all sequences and queue places are taken; "
                           "retry later", code="server_busy", type_="rate_limit_error",
                           headers={"Retry-After": str(retry)})
        self.admitted += 1
        return time.monotonic() + self.timeout

    def release(self) -> None:
        self.admitted -= 1

    def finished(self, gen: Generation, result: Result | None, started: float) -> None:
        """Book-keeping when a generation ends (on the event loop): counts, observers, place."""
        if gen.timed_out:
            self.counts["timed_out"] += 1
        elif result is None or result.error:
            self.counts["failed"] += 1
        elif result.finish_reason == "cancelled":
            self.counts["cancelled"] += 1
        else:
            self.counts["completed"] += 1
        if result is not None:
            logger.debug("generation: %d prompt + %d new tokens in %.2f s (%s)",
                         result.prompt_tokens, result.completion_tokens, result.duration_s,
                         result.finish_reason)
            for observe in self.observers:
                observe(result, gen.timed_out)
        self._mean_s = 0.8 * self._mean_s + 0.2 * (time.monotonic() - started)
        gen.chunks.put_nowait(None)
        self.release()

    # -- prompts -------------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    def count_tokens(self, text: str) -> int:
        return int(self.tokenizer.encode(text).input_ids.get_shape()[1])

    # -- tokens (/tokenize, /detokenize, logprobs) ----------------------------------------------
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).input_ids
        return [int(i) for i in ids.data[0]]

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _vocabulary(self) -> dict[int, bytes]:
        """id -> the token's bytes, read once (openvino-tokenizers' vocabulary maps bytes to ids)."""
        if self._vocab_bytes is None:
            self._vocab_bytes = {i: b for b, i in self.tokenizer.get_vocab().items()}
        return self._vocab_bytes

    def token_bytes(self, ids) -> list[bytes]:
        """Each token's own bytes (a token may hold part of a UTF-8 character); b"" for an id
        beyond the tokenizer's vocabulary (a model's padded rows)."""
        vocab = self._vocabulary()
        return [vocab.get(int(i), b"") for i in ids]

    @property
    def vocab_size(self) -> int:
        """Token ids /detokenize takes: 0 .. vocab_size - 1."""
        return len(self._vocabulary())

    def check_logprobs(self, top: int | None, param: str) -> None:
        """A 400 naming ``param`` for log-probabilities this engine cannot give."""
        if top is None:
            return
        if self.max_top_logprobs is None:
            raise ApiError(400, f"this server's engine ({self.cfg.engine}) gives no log-probabilities",
                           "logprobs", "unsupported_value")
        if top > self.max_top_logprobs:
            raise ApiError(400, f"'{param}' must be at most {self.max_top_logprobs} on this server: "
                           f"its engine gives {self._logprobs_what()}", param, "unsupported_value")

    def _logprobs_what(self) -> str:
        return "the chosen token's log-probability alone (openvino-genai 2026.4)"

    def plan(self, prompt: str, sampling: Sampling) -> tuple[int, int]:
        """Return (prompt tokens, max new tokens), refusing what does not fit the context."""
        n_prompt = self.count_tokens(prompt)
        room = self.context_length - n_prompt
        max_new = sampling.max_new_tokens
        if max_new is None:
            max_new = min(self.defaults.max_new_tokens or self.max_tokens_limit,
                          self.max_tokens_limit, room)
        if room <= 0 or n_prompt + max_new > self.context_length:
            raise ApiError(400, f"this model's context is {self.context_length} tokens; the prompt "
                           f"has {n_prompt} and max_tokens asks for {max_new} more",
                           "messages", "context_length_exceeded")
        return n_prompt, max_new

    def generation_config(self, base, sampling: Sampling, max_new: int,
                          json_schema: str | None = None, logprobs: int | None = None):
        cfg = genai_config(base, sampling, max_new)  # ``base`` is a copy of the defaults
        cfg.apply_chat_template = False  # the prompt is already templated
        if logprobs is not None:
            cfg.logprobs = 1  # genai 2026.4 returns the chosen token's alone, whatever the number
        if json_schema is not None:
            cfg.structured_output_config = openvino_genai.StructuredOutputConfig(
                json_schema=json_schema)
        return cfg

    # -- generation ----------------------------------------------------------------------------
    async def start(self, prompt: str, sampling: Sampling, max_new: int, deadline: float,
                    model: str | None = None, json_schema: str | None = None, n_prompt: int = 0,
                    logprobs: int | None = None):
        """Start generating; return the :class:`Generation` and an asyncio future of its
        :class:`Result`. The place taken by :meth:`admit` is released when it ends.
        ``logprobs`` (None: none) is how many alternatives come with each token's log-probability
        in ``Generation.logprobs`` (:meth:`check_logprobs` has allowed it)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError
