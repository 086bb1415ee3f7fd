"""The old engine (``--engine pipelines``): one ``LLMPipeline`` per sequence, kept for comparison.

An ``LLMPipeline`` is not re-entrant, so this engine holds ``max_num_seqs``
pipelines — each with its own compiled model and KV cache — and runs each
generation in a worker thread. It is what ``tangquant serve`` was before the
continuous-batching engine; ``benchmarks/serve_load.py`` measures the two side by side.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import time

import openvino_genai

from tangquant import load
from tangquant.generate import Sampling
from tangquant.server.engine import FINISH, Engine, Generation, Result
from tangquant.server.schema import ApiError


class PoolEngine(Engine):
    max_top_logprobs = None  # LLMPipeline.generate gives a sequence's summed score, not tokens'

    def __init__(self, model_dir, name, cfg, properties: dict | None = None):
        super().__init__(model_dir, name, cfg, properties or {})
        self._pipes = [load.genai_pipeline(model_dir, cfg.device, **(properties or {}))
                       for _ in range(cfg.max_num_seqs)]
        self.defaults = self._pipes[0].get_generation_config()
        self._free: asyncio.Queue | None = None
        self._threads = concurrent.futures.ThreadPoolExecutor(
            cfg.max_num_seqs, thread_name_prefix="tangquant-gen")
        self._running = 0
        self._active: set[Generation] = set()

    def running(self) -> int:
        return self._running

    async def start(self, prompt: str, sampling: Sampling, max_new: int, deadline: float,
                    model: str | None = None, json_schema: str | None = None, n_prompt: int = 0,
                    logprobs: int | None = None):
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
            cfg = self.generation_config(pipe.get_generation_config(), sampling, max_new,
                                         json_schema)
        except BaseException:
            self._free.put_nowait(pipe)
            raise
        self._running += 1
        self._active.add(gen)
        started = time.monotonic()
        queue_s = started - (deadline - self.timeout)
        future = loop.run_in_executor(self._threads, self._generate, pipe, prompt, cfg, gen,
                                      queue_s)
        future.add_done_callback(functools.partial(self._done, gen, pipe, started))
        return gen, future

    def _done(self, gen: Generation, pipe, started: float, fut) -> None:
        """Runs on the event loop when a worker thread ends: free its pipeline and place."""
        self._running -= 1
        self._active.discard(gen)
        result = None if fut.cancelled() or fut.exception() else fut.result()
        self._free.put_nowait(pipe)
        self.finished(gen, result, started)

    def _generate(self, pipe, prompt: str, cfg, gen: Generation, queue_s: float) -> Result:
        started = time.monotonic()

        def on_text(text: str):
            gen.push(text)
            if gen.should_stop():
                return openvino_genai.StreamingStatus.CANCEL
            return openvino_genai.StreamingStatus.RUNNING

        out = pipe.generate([prompt], cfg, on_text)
        metrics = out.perf_metrics
        reason = FINISH.get(out.finish_reasons[0].name, "cancelled") if out.finish_reasons else "stop"
        if gen.cancel.is_set() or gen.timed_out:
            reason = "cancelled"
        return Result(out.texts[0], int(metrics.get_num_input_tokens()),
                      int(metrics.get_num_generated_tokens()), reason, queue_s,
                      metrics.get_ttft().mean / 1000, metrics.get_tpot().mean / 1000,
                      time.monotonic() - started, self.name)

    def close(self) -> None:
        for gen in list(self._active):  # stop what still runs, so shutdown is quick
            gen.cancel.set()
        self._threads.shutdown(wait=True, cancel_futures=True)
