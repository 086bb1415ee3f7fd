"""Request parsing and validation for ``tangquant serve``, in OpenAI's error shape.

Everything a client sends is checked here before it reaches openvino-genai:
the body's size, encoding and JSON, the type of every field we use, and the
ranges of the sampling parameters. A bad request becomes a :class:`ApiError`
that the server turns into ``{"error": {...}}`` with the right status; it never
reaches the pipeline and never takes the server down.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import sys
from dataclasses import dataclass

from starlette.requests import ClientDisconnect

from tangquant.generate import MAX_STOP, Sampling, SamplingError
from tangquant.recipe import INT_RANGES

MAX_BODY_BYTES = 1 << 20
BODY_TIMEOUT_S = 30.0
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI's error fields."""
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type, self.headers = type_, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


@dataclass
class Request:
    model: str | None
    stream: bool
    include_usage: bool
    sampling: Sampling
    messages: list[dict] | None = None   # chat
    prompt: str | None = None            # completions
    logprobs: int | None = None          # None: none asked; else how many alternatives per token


def parse_body(raw: bytes) -> dict:
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body is larger than {MAX_BODY_BYTES} bytes",
                       code="request_too_large")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {exc.start})",
                       code="invalid_encoding") from None
    try:
        body = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    except ValueError:  # Python's cap on the digits of an integer it reads (4300)
        raise ApiError(400, "request body holds an integer too long to read (over "
                       f"{sys.get_int_max_str_digits()} digits)", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    return body


def check_key(request, api_key: bytes | None) -> None:
    """Refuse a request without ``Authorization: Bearer KEY`` (compared in constant time)."""
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY'",
                       code="invalid_api_key")
    # Digests of equal length: the comparison time reveals neither the key nor its length.
    given_digest = hashlib.sha256(given.strip().encode("utf-8", "surrogateescape")).digest()
    if not hmac.compare_digest(given_digest, hashlib.sha256(api_key).digest()):
        raise ApiError(401, "incorrect API key", code="invalid_api_key")


async def read_body(request) -> dict:
    """Read at most ``MAX_BODY_BYTES`` of a JSON body and parse it."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        # Also makes a browser on another site ask first (CORS preflight), which is refused.
        raise ApiError(415, "the body must be JSON, sent with 'Content-Type: application/json'",
                       code="unsupported_media_type")
    length = request.headers.get("content-length")
    if length is not None and not (length.isdigit() and len(length) <= 18):  # int() of 5000 digits
        raise ApiError(400, "invalid Content-Length header", code="invalid_request")
    if length is not None and int(length) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body is larger than {MAX_BODY_BYTES} bytes",
                       code="request_too_large")

    raw = bytearray()
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):  # a body sent slowly holds no place forever
            async for chunk in request.stream():  # also caps a chunked body with no length
                raw += chunk
                if len(raw) > MAX_BODY_BYTES:
                    raise ApiError(413, f"request body is larger than {MAX_BODY_BYTES} bytes",
                                   code="request_too_large")
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s",
                       code="request_timeout") from None
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected while sending the body",
                       code="incomplete_body") from None
    return parse_body(bytes(raw))


def _text(value, param: str) -> str:
    if not isinstance(value, str):
        raise ApiError(400, f"'{param}' must be a string", param, "invalid_type")
    try:
        value.encode("utf-8")  # a lone surrogate from a "\ud800" escape cannot reach C++
    except UnicodeEncodeError:
        raise ApiError(400, f"'{param}' is not valid Unicode (lone surrogate)", param,
                       "invalid_encoding") from None
    return value


def _number(body: dict, name: str):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"'{name}' must be a number", name, "invalid_type")
    if isinstance(value, int) and abs(value) > 1.7e308:  # float() of it would overflow
        raise ApiError(400, f"'{name}' must be a finite number", name, "invalid_value")
    return float(value)


def _integer(body: dict, name: str):
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ApiError(400, f"'{name}' must be an integer", name, "invalid_type")
    low, high = INT_RANGES.get(name, INT_RANGES[None])
    if value is not None and not low <= value <= high:  # the engines take C integers, no bignum
        raise ApiError(400, f"'{name}' must be between {low} and {high}", name, "invalid_value")
    return value


def _sampling(body: dict, max_tokens_limit: int, names=("max_tokens",)) -> Sampling:
    max_tokens = None
    for name in names:
        value = _integer(body, name)
        if value is None:
            continue
        if value <= 0 or value > max_tokens_limit:
            raise ApiError(400, f"'{name}' must be between 1 and {max_tokens_limit}, got {value}",
                           name, "invalid_value")
        max_tokens = value
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP:
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP} strings",
                       "stop", "invalid_type")
    stop = [_text(s, "stop") for s in stop]
    if any(not s for s in stop):
        raise ApiError(400, "'stop' strings must not be empty", "stop", "invalid_value")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, "'ignore_eos' must be a boolean", "ignore_eos", "invalid_type")
    top_k = _integer(body, "top_k")
    try:
        return Sampling(max_new_tokens=max_tokens, temperature=_number(body, "temperature"),
                        top_p=_number(body, "top_p"), stop=tuple(stop), seed=_integer(body, "seed"),
                        presence_penalty=_number(body, "presence_penalty"),
                        frequency_penalty=_number(body, "frequency_penalty"), ignore_eos=ignore_eos,
                        top_k=0 if top_k == -1 else top_k,  # vLLM's -1: no limit
                        min_p=_number(body, "min_p"),
                        repetition_penalty=_number(body, "repetition_penalty"))
    except SamplingError as exc:  # the same ranges as chat's flags, as OpenAI's 400
        raise ApiError(400, f"'{exc.param}' {str(exc).split(' ', 1)[1]}", exc.param,
                       "invalid_value") from None


def _common(body: dict) -> tuple[str | None, bool, bool]:
    model = body.get("model")
    if model is not None:
        _text(model, "model")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError(400, "'stream_options.include_usage' must be a boolean",
                       "stream_options", "invalid_type")
    n = _integer(body, "n")
    if n not in (None, 1):
        raise ApiError(400, "only n=1 is supported", "n", "unsupported_value")
    return model, stream, include_usage


def _content(content, param: str) -> str:
    if isinstance(content, str):
        return _text(content, param)
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ApiError(400, f"'{param}' parts must be text parts", param, "invalid_type")
            parts.append(_text(part.get("text"), param))
        return "".join(parts)
    raise ApiError(400, f"'{param}' must be a string or a list of text parts", param,
                   "invalid_type")


def chat_request(body: dict, max_tokens_limit: int) -> Request:
    model, stream, include_usage = _common(body)
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages", "invalid_type")
    clean = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ApiError(400, f"'{where}' must be an object", where, "invalid_type")
        role = msg.get("role")
        if role not in ROLES:
            raise ApiError(400, f"'{where}.role' must be one of {sorted(ROLES)}",
                           f"{where}.role", "invalid_value")
        clean.append({"role": ROLES[role], "content": _content(msg.get("content"),
                                                               f"{where}.content")})
    sampling = _sampling(body, max_tokens_limit, ("max_tokens", "max_completion_tokens"))
    return Request(model, stream, include_usage, sampling, messages=clean,
                   logprobs=chat_logprobs(body))


def completion_request(body: dict, max_tokens_limit: int) -> Request:
    model, stream, include_usage = _common(body)
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "'prompt' is required", "prompt", "missing_required_parameter")
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, "only one prompt per request is supported", "prompt",
                           "unsupported_value")
        prompt = prompt[0]
    prompt = _text(prompt, "prompt")
    if body.get("echo"):
        raise ApiError(400, "echo is not supported", "echo", "unsupported_value")
    return Request(model, stream, include_usage, _sampling(body, max_tokens_limit),
                   prompt=prompt, logprobs=_top_count(body, "logprobs"))


def _top_count(body: dict, name: str) -> int | None:
    value = _integer(body, name)
    if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"'{name}' must be between 0 and {MAX_TOP_LOGPROBS}, got {value}", name,
                       "invalid_value")
    return value


def chat_logprobs(body: dict) -> int | None:
    """OpenAI's chat fields: ``logprobs`` (a boolean) and ``top_logprobs`` (0..20, only with
    ``logprobs``); None when none are asked, else how many alternatives per token."""
    asked = body.get("logprobs")
    if asked is not None and not isinstance(asked, bool):
        raise ApiError(400, "'logprobs' must be a boolean", "logprobs", "invalid_type")
    top = _top_count(body, "top_logprobs")
    if top is not None and not asked:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
    return (top or 0) if asked else None
