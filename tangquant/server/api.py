"""The HTTP side of ``tangquant serve``: OpenAI-compatible routes and the web page.

FastAPI/Starlette give a tested HTTP stack with streaming responses and
client-disconnect events; request bodies are read and validated by hand
(``server.schema``) so every bad input gets OpenAI's error JSON and the exact
status, and an over-large body is refused before it is all read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from tangquant.server import logprobs as token_logprobs
from tangquant.server import structured, tokens
from tangquant.server.engine import Engine
from tangquant.server.metrics import CONTENT_TYPE, CountRequests, Metrics
from tangquant.server.protocol import LOOPBACK_HOSTS, HostGuard
from tangquant.server.schema import (ApiError, Request, chat_request, check_key,
                                    completion_request, read_body)

logger = logging.getLogger(__name__)

WEB_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8",
             "favicon.svg": "image/svg+xml"}
# The page loads nothing from elsewhere and runs no inline script: model output stays text.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY", "Cache-Control": "no-cache",
}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _error_response(exc: ApiError):
    headers = dict(exc.headers)
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _usage(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _timings(result) -> dict:
    """Server-side timings (an extension, like llama.cpp's): they need no decodable text."""
    return {"queue_ms": round(1000 * result.queue_s, 1), "ttft_ms": round(1000 * result.ttft_s, 1),
            "tpot_ms": round(1000 * result.tpot_s, 2),
            "decode_tokens_per_s": round(1 / result.tpot_s, 2) if result.tpot_s > 0 else None}


def _json(data):
    return JSONResponse(data)


def _sse(data) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode("utf-8")


class Api:
    """Route handlers bound to one engine and one optional key."""
    def __init__(self, engine: Engine, api_key: str | None, metrics: Metrics,
                 metrics_public: bool = False):
        self.engine, self.metrics, self.metrics_public = engine, metrics, metrics_public
        self.api_key = api_key.encode("utf-8") if api_key else None

    def model_card(self, name: str) -> dict:
        card = {"id": name, "object": "model", "created": self.engine.created,
                "owned_by": "tangquant", **self.engine.info()}
        if name != self.engine.name:  # an adapter served on the base (OpenAI's fine-tune fields)
            card.update(root=self.engine.name, parent=self.engine.name, adapter=True)
        return card

    def _known(self, model_id: str) -> str:
        if model_id not in self.engine.models():
            raise ApiError(404, f"the model '{model_id}' does not exist; this server serves "
                           f"{', '.join(repr(m) for m in self.engine.models())}", "model",
                           "model_not_found")
        return model_id

    async def models(self, request):
        check_key(request, self.api_key)
        return _json({"object": "list", "data": [self.model_card(m) for m in self.engine.models()]})

    async def model(self, request):
        check_key(request, self.api_key)
        return _json(self.model_card(self._known(request.path_params["model_id"])))

    async def tokens(self, request):
        """``/tokenize`` and ``/detokenize`` (:mod:`tangquant.server.tokens`)."""
        check_key(request, self.api_key)
        body = await read_body(request)
        if (model := tokens.model_of(body)) is not None:
            self._known(model)
        return _json(await tokens.ROUTES[request.url.path](self.engine, body))

    async def prometheus(self, request):
        if not self.metrics_public:
            check_key(request, self.api_key)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def chat(self, request):
        return await self._complete(request, chat=True)

    async def completions(self, request):
        return await self._complete(request, chat=False)

    async def _complete(self, request, chat: bool):
        check_key(request, self.api_key)
        body = await read_body(request)
        parse = chat_request if chat else completion_request
        req = parse(body, self.engine.max_tokens_limit)
        self.engine.check_logprobs(req.logprobs, "top_logprobs" if chat else "logprobs")
        structured.refuse_tools(body)
        schema = structured.response_format(body)
        model = self._known(req.model) if req.model is not None else self.engine.name
        deadline = self.engine.admit()
        try:
            prompt = (await asyncio.to_thread(self.engine.chat_prompt, req.messages)
                      if chat else req.prompt)
            n_prompt, max_new = await asyncio.to_thread(self.engine.plan, prompt, req.sampling)
            gen, future = await self.engine.start(prompt, req.sampling, max_new, deadline,
                                                  model=model, json_schema=schema,
                                                  n_prompt=n_prompt, logprobs=req.logprobs)
        except BaseException:
            self.engine.release()
            raise
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "created": int(time.time()), "model": model}
        if req.stream:

            # The background task runs after the response ends, also after a disconnect.
            return StreamingResponse(self._stream(req, chat, meta, gen, future,
                                                  self._logprobs(req, chat)),
                                     media_type="text/event-stream", headers=SSE_HEADERS,
                                     background=BackgroundTask(gen.cancel.set))
        return await self._whole(request, chat, meta, gen, future, self._logprobs(req, chat))

    def _logprobs(self, req: Request, chat: bool):
        return (None if req.logprobs is None
                else token_logprobs.formatter(chat, self.engine.token_bytes))

    async def _whole(self, request, chat: bool, meta: dict, gen, future, logprobs=None):
        disconnected = asyncio.ensure_future(_wait_disconnect(request))
        try:
            timeout = max(0.0, gen.deadline - time.monotonic()) + 1.0
            done, _ = await asyncio.wait({future, disconnected}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnected.cancel()
        if future not in done:
            gen.cancel.set()  # the worker stops at its next token and frees its slot
            if disconnected in done:
                logger.info("client went away; generation %s cancelled", meta["id"])

                return Response(status_code=499)  # nginx's "client closed request"; never seen
        result = await future if future in done else None
        if result is None or gen.timed_out:
            raise ApiError(504, "the request timed out during generation", code="timeout",
                           type_="timeout_error")
        if result.error:
            raise ApiError(503, result.error, code="generation_failed", type_="server_error")
        lp = await token_logprobs.Unsent(logprobs, gen.logprobs).take()
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text,
                                               "refusal": None},
                      "logprobs": lp, "finish_reason": result.finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": result.text, "logprobs": lp,
                      "finish_reason": result.finish_reason}
            obj = "text_completion"
        return _json({**meta, "object": obj, "system_fingerprint": None, "choices": [choice],
                      "usage": _usage(result), "timings": _timings(result)})

    async def _stream(self, req: Request, chat: bool, meta: dict, gen, future, logprobs=None):
        obj = "chat.completion.chunk" if chat else "text_completion"
        extra = {"usage": None} if req.include_usage else {}
        unsent = token_logprobs.Unsent(logprobs, gen.logprobs)

        def chunk(text: str | None, finish: str | None, first: bool = False,
                  lp: dict | None = None) -> bytes:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else (
                    {"content": text} if text is not None else {})
                choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": lp,
                          "finish_reason": finish}
            return _sse({**meta, "object": obj, "system_fingerprint": None, "choices": [choice],
                         **extra})

        try:
            if chat:
                yield chunk(None, None, first=True)
            async with asyncio.timeout(max(0.0, gen.deadline - time.monotonic()) + 1.0):
                async for text in gen.texts():
                    if text:
                        # this text's tokens (and those of a character still incomplete)
                        yield chunk(text, None, lp=await unsent.take())
                result = await future
                if (lp := await unsent.take()) is not None:  # tokens that made no text (the end)
                    yield chunk("", None, lp=lp)
            if gen.timed_out:
                raise TimeoutError
            if result.error:
                yield _sse(ApiError(503, result.error, code="generation_failed",
                                    type_="server_error").body())
            else:
                yield chunk(None, result.finish_reason)
            if req.include_usage and not result.error:
                yield _sse({**meta, "object": obj, "system_fingerprint": None, "choices": [],
                            "usage": _usage(result), "timings": _timings(result)})
        except TimeoutError:
            gen.cancel.set()
            yield _sse(ApiError(504, "the request timed out during generation", code="timeout",
                                type_="timeout_error").body())
        except Exception as exc:  # the headers are sent: report in the stream, as OpenAI does
            logger.exception("generation %s failed", meta["id"])
            yield _sse(ApiError(500, f"generation failed: {type(exc).__name__}",
                                type_="server_error").body())
        finally:
            # Runs on normal end and when Starlette cancels the stream because the client
            # disconnected: either way the worker must stop generating.
            gen.cancel.set()
        yield b"data: [DONE]\n\n"




async def _wait_disconnect(request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _page(name: str) -> bytes:
    return resources.files("tangquant.server").joinpath("web", name).read_bytes()


def create_app(engine: Engine, api_key: str | None = None, loopback_only: bool = True,
               metrics_public: bool = False, replica: str | None = None):
    """The ASGI app: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
    ``/tokenize``, ``/detokenize``, ``/health``, ``/metrics``, ``/``.

    ``loopback_only`` refuses requests whose Host header is not a loopback name; ``replica``
    names this copy of the server in ``/health`` (Ray Serve runs several).
    """
    metrics = Metrics(engine)
    api = Api(engine, api_key, metrics, metrics_public)
    replica = replica or f"{socket.gethostname()}:{os.getpid()}"
    pages = {name: _page(name) for name in ("index.html", *WEB_FILES)}
    app = FastAPI(title="tangquant", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return _error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return _error_response(ApiError(exc.status_code, str(exc.detail),
                                        code="not_found" if exc.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        logger.exception("internal error on %s", request.url.path)
        return JSONResponse(ApiError(500, "internal server error", type_="server_error").body(),
                            status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "replica": replica, **engine.status()}

    @app.get("/")
    async def index():
        return Response(pages["index.html"], media_type="text/html; charset=utf-8",
                        headers=PAGE_HEADERS)

    @app.get("/favicon.ico")
    async def favicon():
        return Response(pages["favicon.svg"], media_type=WEB_FILES["favicon.svg"])

    @app.get("/web/{name}")
    async def web(name: str):
        if name not in WEB_FILES:
            raise ApiError(404, "not found", code="not_found")
        return Response(pages[name], media_type=WEB_FILES[name], headers=PAGE_HEADERS)

    # Plain Starlette routes: the handlers read and check the raw request themselves.
    app.add_route("/v1/models", api.models, methods=["GET"])
    app.add_route("/v1/models/{model_id:path}", api.model, methods=["GET"])
    app.add_route("/v1/chat/completions", api.chat, methods=["POST"])
    app.add_route("/v1/completions", api.completions, methods=["POST"])
    for path in tokens.ROUTES:
        app.add_route(path, api.tokens, methods=["POST"])
    app.add_route("/metrics", api.prometheus, methods=["GET"])
    if loopback_only:
        app.add_middleware(HostGuard, hosts=LOOPBACK_HOSTS)
    app.add_middleware(CountRequests, metrics=metrics, replica=replica)
    return app
