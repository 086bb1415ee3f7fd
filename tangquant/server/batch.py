"""The default engine: one ``ContinuousBatchingPipeline`` for every request, stepped by one thread.

Request handlers put requests on a waiting list; the step thread moves up to
``max_num_seqs`` of them into the pipeline (``add_request``), calls ``step()``
while anything runs, reads each ``GenerationHandle``'s new tokens, detokenizes
them incrementally per request and hands the text to the event loop. A request whose client went away
or whose deadline passed is cancelled (``GenerationHandle.cancel()``); the
pipeline drops it at the next step and frees its KV blocks.

Speculative decoding (``--draft DIR``): the draft IR goes to the pipeline as openvino-genai's
``draft_model`` (compiled with the model's plugin properties), and every request asks for
``--draft-tokens`` per step (``num_assistant_tokens``); a step then gives a request up to K + 1
tokens.

LoRA adapters: openvino-genai 2026.4 applies an adapter to the whole pipeline
(``step()`` ignores a request's ``GenerationConfig.adapters``; only ``generate()``
sets them, and only on an idle pipeline). So the requests in the pipeline at any
moment share one adapter: the step thread serves the waiting list in order, and
when the oldest waiting request wants another adapter (or the base) it lets the
running ones finish, switches with a one-token ``generate()`` and goes on. Same
adapter traffic batches fully; mixed traffic batches per adapter.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import openvino as ov
import openvino_genai

from tangquant.draft import DEFAULT_TOKENS, GREEDY_ONLY
from tangquant.errors import NumericalError
from tangquant.generate import PROBE, Sampling
from tangquant.load import model_config
from tangquant.server import sizing
from tangquant.server.engine import FINISH, Engine, Generation, Result
from tangquant.server.grammar import GrammarCheck
from tangquant.server.schema import ApiError

logger = logging.getLogger(__name__)
RUNNING = openvino_genai.GenerationStatus.RUNNING
_UNKNOWN = "\0unknown"  # not a model name: the first request switches to its own adapter


class Detokenizer:
    """Incremental text of a token stream, holding back an incomplete UTF-8 character.

    (``openvino_genai.TextStreamer`` raises ``UnicodeDecodeError`` in Python when a
    model emits invalid UTF-8, as random-weight models do.) The window of tokens
    decoded together restarts after a newline, or after ``WINDOW`` tokens that end on
    a whole character, so the work per token stays bounded.
    """
    WINDOW = 256

    def __init__(self, tokenizer):
        self.tokenizer, self.window, self.printed = tokenizer, [], 0

    def write(self, ids: list[int]) -> str:
        self.window += ids
        text = self.tokenizer.decode(self.window)
        if text.endswith("\ufffd"):
            return ""  # the rest of a character is still to come
        out = text[self.printed:]
        if text.endswith("\n") or len(self.window) >= self.WINDOW:
            self.window, self.printed = [], 0
        else:
            self.printed = len(text)
        return out

    def end(self) -> str:
        out = self.tokenizer.decode(self.window)[self.printed:] if self.window else ""
        self.window, self.printed = [], 0
        return out


@dataclass
class _Request:
    gen: Generation
    prompt: str
    config: object
    adapter: str | None
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    admitted: float
    n_prompt: int = 0
    added: float = 0.0
    first: float = 0.0
    last: float = 0.0
    tokens: list = field(default_factory=list)
    finish: str = "stop"
    handle: object = None
    streamer: object = None
    logprobs: bool = False
    gaps: list = field(default_factory=list)


def adapter_configs(adapters: dict) -> dict:
    """For the base (None) and each adapter name, two genai configs holding every adapter, in two orders.

    A config holding only the chosen adapter (none for the base) changes the LoRA states' rank at every
    switch (genai 2026.4 concatenates the active adapters' A and B per layer, rank 0 for none); the CPU
    plugin's next step then crashed now and then (segfault, heap corruption) when switches between the
    base and adapters of different ranks and targets met schema-constrained batches. Holding every
    adapter always keeps the states' shapes fixed: the chosen one gets its alpha, the others 0, which
    adds exact zeros. The two orders make each switch a change of adapters to genai: its check for a
    change of alphas alone compares only the last adapter's (``compare_configs``), and would miss the
    rest.
    """
    items = list(adapters.items())
    out = {}
    for chosen in (None, *adapters):
        out[chosen] = tuple(openvino_genai.AdapterConfig(
            [(a, alpha if name == chosen else 0.0) for name, (a, alpha) in order])
            for order in (items, items[::-1]))
    return out


class BatchEngine(Engine):
    def __init__(self, model_dir, name, cfg, properties: dict, adapters: dict):
        """``properties``: OpenVINO properties; ``adapters``: name -> (genai Adapter, alpha)."""
        super().__init__(model_dir, name, cfg, properties)
        self.adapter_names = tuple(adapters)
        self._adapter_configs = adapter_configs(adapters)
        self._order = 0  # which of a name's two configs (adapter orders) the pipeline holds
        self._properties = dict(properties)
        self._draft_tokens = None
        if cfg.draft:
            self._properties["draft_model"] = openvino_genai.draft_model(
                str(cfg.draft), cfg.device, **dict(properties))
            self._draft_tokens = cfg.draft_tokens or DEFAULT_TOKENS
        if adapters:
            self._properties["adapters"] = openvino_genai.AdapterConfig(
                [a for a, _ in adapters.values()])
        self.plan_ = sizing.plan(sizing.kv_shape(model_dir), *sizing.kv_element_bytes(
            cfg.device, properties), cfg, (model_dir / "openvino_model.bin").stat().st_size)
        self._pipe = self._build()
        self._require_finite()
        self._grammar = GrammarCheck(model_dir, int(model_config(model_dir)["vocab_size"]))
        self.rebuilds = 0  # pipelines loaded anew after a failed step (never for one request)
        self.defaults = self._pipe.get_config()
        self._detok = self._pipe.get_tokenizer()
        self._ids = itertools.count()
        self._waiting: deque[_Request] = deque()
        self._active: list[_Request] = []
        # Which adapter the pipeline applies; unknown until the first switch sets it.
        self._adapter: str | None = _UNKNOWN if adapters else None
        self._metrics = None
        self._cv = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="tangquant-step", daemon=True)
        self._thread.start()

    def _build(self):
        return openvino_genai.ContinuousBatchingPipeline(
            str(self.model_dir), self.plan_.scheduler, self.cfg.device, self._properties)

    def _require_finite(self) -> None:
        """Refuse a model whose first step computes NaN or Inf logits (a probe prompt, one token
        with its log-probability): it would answer every request with empty text or noise."""
        config = self._pipe.get_config()
        config.max_new_tokens, config.do_sample, config.logprobs = 1, False, 1
        config.apply_chat_template = False
        if self._draft_tokens:  # a pipeline with a draft model asks for its tokens per step
            config.num_assistant_tokens = self._draft_tokens
        try:
            (result,) = self._pipe.generate([PROBE], [config])
            finite = all(math.isfinite(s) for s in result.m_scores)
        except RuntimeError as exc:  # genai's sampler checks the log-sum-exp it needs for logprobs
            if "isnan" not in str(exc):
                raise
            finite = False
        if not finite:
            raise NumericalError(f"{self.model_dir} computes NaN or Inf logits at its first step "
                                 "(a probe prompt at load): its weights are broken (a NaN scale or "
                                 "norm?); export it again")

    # -- the event loop's side -------------------------------------------------------------------
    def running(self) -> int:
        return len(self._active)

    def status(self) -> dict:
        return {**super().status(), "pipeline_rebuilds": self.rebuilds}

    def cache_usage(self) -> dict:
        m = self._metrics
        if m is None:
            return {"fraction": 0.0, "bytes": 0}
        return {"fraction": m.cache_usage / 100.0, "bytes": int(m.kv_cache_size_in_bytes),
                "scheduled": int(m.scheduled_requests)}

    async def start(self, prompt: str, sampling: Sampling, max_new: int, deadline: float,
                    model: str | None = None, json_schema: str | None = None, n_prompt: int = 0,
                    logprobs: int | None = None):
        loop = asyncio.get_running_loop()
        config = self.generation_config(self._pipe.get_config(), sampling, max_new, json_schema,
                                        logprobs)
        if self._draft_tokens:
            if config.is_multinomial():
                raise ApiError(400, f"this server decodes with a draft model: {GREEDY_ONLY}; send "
                               "\"temperature\": 0", param="temperature", code="invalid_value")
            config.num_assistant_tokens = self._draft_tokens
        try:
            config.validate()
        except RuntimeError as exc:
            raise ApiError(400, f"these generation settings are refused: "
                           f"{str(exc).strip().splitlines()[-1]}", code="invalid_value") from None
        if json_schema is not None:  # compiled here, never first inside the shared step
            refused = await asyncio.to_thread(self._grammar.refusal, json_schema)
            if refused:
                raise ApiError(400, f"response_format: {refused}", "response_format", "invalid_schema")
        adapter = None if model in (None, self.name) else model
        gen = Generation(loop, deadline)
        req = _Request(gen, prompt, config, adapter, loop.create_future(), loop,
                       admitted=deadline - self.timeout, n_prompt=n_prompt,
                       logprobs=logprobs is not None)
        with self._cv:
            self._waiting.append(req)
            self._cv.notify()
        return gen, req.future

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout=30)

    # -- the step thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._closing:
            try:
                self._cycle()
            except Exception as exc:  # the step thread must outlive any one request's fault
                logger.exception("the engine's step thread failed")
                self._recover(exc)
        for req in self._active + list(self._waiting):
            if req.handle is not None:
                req.handle.cancel()
            self._finish(req, "cancelled")

    def _cycle(self) -> None:
        """Wait for work, move waiting requests in, step once, hand out what it made."""
        with self._cv:
            while not (self._closing or self._waiting or self._active
                       or self._pipe.has_non_finished_requests()):
                self._cv.wait(timeout=1.0)
            if self._closing:
                return
        self._drop_stopped_waiting()
        self._move_in()
        if self._pipe.has_non_finished_requests():
            self._pipe.step()
            self._metrics = self._pipe.get_metrics()
        self._collect()

    def _drop_stopped_waiting(self) -> None:
        with self._cv:
            stopped = [r for r in self._waiting if r.gen.should_stop()]
            for r in stopped:
                self._waiting.remove(r)
        for r in stopped:
            self._finish(r, "cancelled")

    def _move_in(self) -> None:
        """Add waiting requests that share the pipeline's adapter, oldest first (see the module)."""
        with self._cv:
            idle = not self._active and not self._pipe.has_non_finished_requests()
            wanted = self._waiting[0].adapter if self._waiting else self._adapter
        if idle and wanted != self._adapter:
            self._switch(wanted)  # outside the lock: handlers keep queueing meanwhile
        with self._cv:
            # No more than max_num_seqs in the pipeline: a grown KV cache is never given back
            # (genai 2026.4), so it must only grow to what max_num_seqs sequences need.
            batch = []
            while self._waiting and self._waiting[0].adapter == self._adapter \
                    and len(self._active) + len(batch) < self.max_num_seqs:
                batch.append(self._waiting.popleft())
        for req in batch:
            self._add(req)

    def _switch(self, adapter: str | None) -> None:
        """A one-token ``generate()`` on the idle pipeline applies ``adapter`` to all of it."""
        config = self._pipe.get_config()
        config.max_new_tokens, config.do_sample = 1, False
        self._order ^= 1  # the other order: genai sees new adapters and sets every state (see adapter_configs)
        config.adapters = self._adapter_configs[adapter][self._order]
        token = max(0, self._detok.get_eos_token_id())
        self._pipe.generate([ov.Tensor(np.array([[token]], dtype=np.int64))], [config])
        logger.debug("adapter switched to %s", adapter or "none (the base)")
        self._adapter = adapter

    def _add(self, req: _Request) -> None:
        req.added = time.monotonic()
        try:
            req.handle = self._pipe.add_request(next(self._ids), req.prompt, req.config)
        except RuntimeError as exc:
            self._finish(req, "cancelled", error=str(exc).strip().splitlines()[-1])
            return
        req.streamer = Detokenizer(self._detok)
        self._active.append(req)

    def _collect(self) -> None:
        now = time.monotonic()
        for req in list(self._active):
            handle = req.handle
            while handle.can_read():
                for out in handle.read().values():
                    ids = list(out.generated_ids)
                    if ids:
                        if req.last:
                            req.gaps.append(now - req.last)
                        if req.logprobs:
                            req.gen.add_logprobs([(t, lp, ()) for t, lp in
                                                  zip(ids, out.generated_log_probs)])
                        req.first = req.first or now
                        req.last = now
                        req.tokens += ids
                        text = req.streamer.write(ids)
                        if text:
                            req.gen.push(text)
                    req.finish = FINISH.get(out.finish_reason.name, req.finish)
            status = handle.get_status()
            if status == RUNNING and req.gen.should_stop():
                handle.cancel()
                self._finish(req, "cancelled")
            elif status == openvino_genai.GenerationStatus.FINISHED:
                self._finish(req, req.finish)
            elif status != RUNNING:
                self._finish(req, "cancelled", error="the KV cache is full (raise --cache-size "
                             "or lower --max-num-seqs)")

    def _recover(self, exc: Exception) -> None:
        """A failed step leaves the pipeline unusable: fail what it held and load it anew."""
        first = str(exc).strip().splitlines()[-1][:300]
        logger.error("generation step failed (%s); reloading the pipeline", first)
        for req in list(self._active):
            self._finish(req, "cancelled", error=f"the generation step failed: {first}")
        self._pipe = self._build()
        self.rebuilds += 1
        self._detok = self._pipe.get_tokenizer()
        self._adapter = _UNKNOWN if self.adapter_names else None

    def _finish(self, req: _Request, reason: str, error: str | None = None) -> None:
        if req in self._active:
            self._active.remove(req)
        if req.streamer is not None and (text := req.streamer.end()):
            req.gen.push(text)
        n = len(req.tokens)
        started = req.added or time.monotonic()
        result = Result(
            text=self._detok.decode(req.tokens) if n else "",
            prompt_tokens=req.n_prompt, completion_tokens=n, finish_reason=reason,
            queue_s=started - req.admitted, ttft_s=(req.first - started) if n else 0.0,
            tpot_s=(req.last - req.first) / (n - 1) if n > 1 else 0.0,
            duration_s=time.monotonic() - started, model=req.adapter or self.name, error=error,
            gaps=tuple(req.gaps))
        try:
            req.loop.call_soon_threadsafe(self._resolve, req, result)
        except RuntimeError:  # the event loop is already closed: nobody waits for it
            pass

    def _resolve(self, req: _Request, result: Result) -> None:
        if not req.future.done():
            req.future.set_result(result)
        self.finished(req.gen, result, req.admitted)
