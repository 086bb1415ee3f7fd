"""The generation engine behind ``tangquant serve``: openvino-genai pipelines, a bounded queue.

An ``LLMPipeline`` is not re-entrant, so the engine holds one pipeline per
worker (``max_concurrency`` of them) in a pool and runs each generation in a
worker thread. Requests beyond the workers wait in a queue of ``queue_size``;
beyond that they are refused at once with 429 and ``Retry-After``. A generation
stops early (the streamer returns ``StreamingStatus.CANCEL``) when the client
goes away or the request's deadline passes; its slot is freed only when the
worker thread has really finished.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import openvino_genai

from tangquant import load
from tangquant.files import human_size, read_json, read_manifest
from tangquant.generate import Sampling, genai_config
from tangquant.server.schema import ApiError

logger = logging.getLogger(__name__)

FINISH = {"STOP": "stop", "LENGTH": "length"}


@dataclass
class Result:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str          # "stop", "length", or "cancelled"
    queue_s: float              # admitted -> a worker took it
    ttft_s: float               # openvino-genai's: generate() called -> first token
    tpot_s: float               # openvino-genai's mean time per further token
    duration_s: float


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
    """One running generation: its text chunks arrive on an asyncio queue."""
    def __init__(self, loop: asyncio.AbstractEventLoop, deadline: float):
        self.chunks: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self.deadline = deadline
        self.timed_out = False
        self._loop = loop

    def on_text(self, text: str):
        """The streamer callback, called in the worker thread."""
        self._loop.call_soon_threadsafe(self.chunks.put_nowait, text)
        if time.monotonic() > self.deadline:
            self.timed_out = True
        if self.cancel.is_set() or self.timed_out:
            return openvino_genai.StreamingStatus.CANCEL
        return openvino_genai.StreamingStatus.RUNNING

    async def texts(self):
        while (text := await self.chunks.get()) is not None:
            yield text


class Engine:
    def __init__(self, model_dir: Path, name: str, max_concurrency: int, queue_size: int,
                 max_tokens_limit: int, timeout: float, device: str = "CPU"):
        self.model_dir, self.name = model_dir, name
        self.max_concurrency, self.queue_size = max_concurrency, queue_size
        self.max_tokens_limit, self.timeout = max_tokens_limit, timeout
        self._pipes = [load.genai_pipeline(model_dir, device) for _ in range(max_concurrency)]
        # A tokenizer of its own: prompts are templated and counted on the event loop's side
        # while the pipelines generate in their threads.
        self.tokenizer = openvino_genai.Tokenizer(str(model_dir))
        self.defaults = self._pipes[0].get_generation_config()
        self.context_length = self._context_length()
        self._free: asyncio.Queue | None = None
        self._threads = concurrent.futures.ThreadPoolExecutor(
            max_concurrency, thread_name_prefix="tangquant-gen")
        self.admitted = 0
        self.running = 0
        self._active: set[Generation] = set()
        self.counts = {"completed": 0, "cancelled": 0, "timed_out": 0, "refused_busy": 0}
        self._mean_s = 5.0      # running mean request time, for Retry-After
        self.created = int(time.time())

    def _context_length(self) -> int:
        config_path = self.model_dir / "config.json"
        config = read_json(config_path, "model config") if config_path.is_file() else {}
        for key in ("max_position_embeddings", "seq_length", "n_positions"):
            if isinstance(config.get(key), int) and config[key] > 0:
                return config[key]
        logger.warning("no context length in %s; assuming 2048", config_path)
        return 2048

    def info(self) -> dict:
        d = self.defaults
        manifest = read_manifest(self.model_dir) or {}
        weights = self.model_dir / "openvino_model.bin"
        return {
            "context_length": self.context_length, "max_tokens_limit": self.max_tokens_limit,
            "max_concurrency": self.max_concurrency, "queue_size": self.queue_size,
            "timeout_s": self.timeout,
            "weights": human_size(weights.stat().st_size) if weights.is_file() else None,
            "made_by": f"tangquant {manifest['stage']}" if manifest.get("stage") else None,
            "quantization": _quantization(manifest),
            "defaults": {"temperature": d.temperature if d.do_sample else 0.0,
                         "top_p": d.top_p, "max_tokens": min(d.max_new_tokens,
                                                             self.max_tokens_limit)},
        }

    def status(self) -> dict:
        return {"running": self.running, "queued": max(0, self.admitted - self.running),
                "max_concurrency": self.max_concurrency, "queue_size": self.queue_size,
                **self.counts}

    # -- admission -----------------------------------------------------------------------------
    def admit(self) -> float:
        """Take a place in the queue or refuse with 429; return the request's deadline."""
        if self.admitted >= self.max_concurrency + self.queue_size:
            waves = self.admitted / self.max_concurrency
            retry = min(60, max(1, math.ceil(waves * self._mean_s)))
            self.counts["refused_busy"] += 1
            raise ApiError(429, "the server is busy: all workers and queue places are taken; "
                           "retry later", code="server_busy", type_="rate_limit_error",
                           headers={"Retry-After": str(retry)})
        self.admitted += 1
        return time.monotonic() + self.timeout

    def release(self) -> None:
        self.admitted -= 1

    # -- prompts -------------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def count_tokens(self, text: str) -> int:
        return int(self.tokenizer.encode(text).input_ids.get_shape()[1])

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

    @staticmethod
    def _config(pipe, sampling: Sampling, max_new: int):
        cfg = genai_config(pipe.get_generation_config(), sampling, max_new)  # a copy of the defaults
        cfg.apply_chat_template = False  # the prompt is already templated
        return cfg

    # -- generation ----------------------------------------------------------------------------
    async def start(self, prompt: str, sampling: Sampling, max_new: int, deadline: float):
        """Wait for a free pipeline (until the deadline) and start generating in its thread.

        Returns the :class:`Generation` and an asyncio future of its :class:`Result`. The
        admission taken by :meth:`admit` is released when the worker thread ends.
        """
        loop = asyncio.get_running_loop()
        if self._free is None:
            self._free = asyncio.Queue()
            for pipe in self._pipes:
                self._free.put_nowait(pipe)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                pipe = await self._free.get()
        except TimeoutError:
            raise ApiError(504, "the request timed out waiting for a free worker",
                           code="timeout", type_="timeout_error") from None
        gen = Generation(loop, deadline)
        try:
            cfg = self._config(pipe, sampling, max_new)
        except BaseException:
            self._free.put_nowait(pipe)
            raise
        self.running += 1
        self._active.add(gen)
        started = time.monotonic()
        queue_s = started - (deadline - self.timeout)
        future = loop.run_in_executor(self._threads, self._generate, pipe, prompt, cfg, gen,
                                      queue_s)

        future.add_done_callback(functools.partial(self._finished, gen, pipe, started))
        return gen, future

    def _finished(self, gen: Generation, pipe, started: float, fut) -> None:
        """Runs on the event loop when a worker thread ends: free its pipeline and place."""
        self.running -= 1
        self._active.discard(gen)
        result = None if fut.cancelled() or fut.exception() else fut.result()
        if gen.timed_out:
            self.counts["timed_out"] += 1
        elif result is not None and result.finish_reason == "cancelled":
            self.counts["cancelled"] += 1
        else:
            self.counts["completed"] += 1
        if result is not None:
            logger.debug("generation: %d prompt + %d new tokens in %.2f s (%s)",
                         result.prompt_tokens, result.completion_tokens, result.duration_s,
                         result.finish_reason)
        self._free.put_nowait(pipe)
        self._mean_s = 0.8 * self._mean_s + 0.2 * (time.monotonic() - started)
        gen.chunks.put_nowait(None)
        self.release()

    @staticmethod
    def _generate(pipe, prompt: str, cfg, gen: Generation, queue_s: float) -> Result:
        started = time.monotonic()
        out = pipe.generate([prompt], cfg, gen.on_text)
        metrics = out.perf_metrics
        reason = FINISH.get(out.finish_reasons[0].name, "cancelled") if out.finish_reasons else "stop"
        if gen.cancel.is_set() or gen.timed_out:
            reason = "cancelled"
        return Result(out.texts[0], int(metrics.get_num_input_tokens()),
                      int(metrics.get_num_generated_tokens()), reason, queue_s,
                      metrics.get_ttft().mean / 1000, metrics.get_tpot().mean / 1000,
                      time.monotonic() - started)

    def close(self) -> None:
        for gen in list(self._active):  # stop what still runs, so shutdown is quick
            gen.cancel.set()
        self._threads.shutdown(wait=True, cancel_futures=True)
