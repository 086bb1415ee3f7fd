"""Tokens' log-probabilities in OpenAI's two response forms, from what an engine reports.

An engine hands each generated token as ``(id, logprob, ((id, logprob), ...))``: the model's own
log-softmax before penalties, temperature and filters (vLLM's default), and the most likely
alternatives it has (none on openvino-genai). ``token_bytes(ids)`` gives each token's bytes; a
token may hold part of a UTF-8 character, so ``token`` is those bytes decoded with U+FFFD for the
part, and ``bytes`` the exact bytes (OpenAI's chat form).
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import math

FLOOR = -9999.0  # vLLM's stand-in for -inf (JSON has no infinity)


def _number(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else FLOOR


def _ids(entries: list[tuple]) -> list[int]:
    return list(dict.fromkeys(i for token, _, top in entries for i in (token, *(t for t, _ in top))))


def _texts(entries: list[tuple], token_bytes) -> dict[int, bytes]:
    ids = _ids(entries)
    return dict(zip(ids, token_bytes(ids)))


def chat(entries: list[tuple], token_bytes) -> dict:
    """``choices[].logprobs`` of a chat completion (or of one chunk: the entries it carries)."""
    raw = _texts(entries, token_bytes)

    def one(token: int, logprob: float) -> dict:
        data = raw[token]
        return {"token": data.decode("utf-8", "replace"), "logprob": _number(logprob),
                "bytes": list(data)}

    return {"content": [{**one(token, lp), "top_logprobs": [one(t, tlp) for t, tlp in top]}
                        for token, lp, top in entries],
            "refusal": None}


class CompletionLogprobs:
    """``choices[].logprobs`` of a (legacy) completion, chunk after chunk: ``text_offset`` counts
    characters of the reply so far, a token that ends inside a character adding none."""

    def __init__(self, token_bytes):
        self.token_bytes = token_bytes
        self.chars = 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def __call__(self, entries: list[tuple]) -> dict:
        raw = _texts(entries, self.token_bytes)
        tokens, offsets, tops = [], [], []
        for token, lp, top in entries:
            offsets.append(self.chars)
            self.chars += len(self._utf8.decode(raw[token]))
            tokens.append(raw[token].decode("utf-8", "replace"))
            # vLLM's rule: the chosen token always among them, so up to n + 1
            alternatives = {raw[t].decode("utf-8", "replace"): _number(tlp) for t, tlp in top}
            tops.append({tokens[-1]: _number(lp), **alternatives})
        return {"tokens": tokens, "token_logprobs": [_number(lp) for _, lp, _ in entries],
                "top_logprobs": tops, "text_offset": offsets}


def formatter(chat_form: bool, token_bytes):
    """entries -> OpenAI's form for one request (a completion's keeps its text offsets)."""
    if chat_form:
        return functools.partial(chat, token_bytes=token_bytes)
    return CompletionLogprobs(token_bytes)


class Unsent:
    """The entries of a generation's growing list not sent yet, formatted off the event loop."""

    def __init__(self, fmt, entries: list):
        self.fmt, self.entries, self.sent = fmt, entries, 0

    async def take(self) -> dict | None:
        if self.fmt is None or self.sent == len(self.entries):
            return None
        new, self.sent = self.entries[self.sent:], len(self.entries)
        return await asyncio.to_thread(self.fmt, new)
