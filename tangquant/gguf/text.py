"""Text around the llama.cpp process: request settings in, incremental text with stop strings out.

openvino-genai does both inside its pipeline (its GenerationConfig and stop_strings); for a GGUF
they happen in tangquant's process, with the model's Hugging Face tokenizer, so ``chat`` and
``serve`` give the same request schema whichever engine runs the model. Standard library only.
"""

from __future__ import annotations

import json
from pathlib import Path

GENERATION_CONFIG = "generation_config.json"


def generation_defaults(model: Path) -> dict:
    """The model's own sampling defaults (``generation_config.json`` beside the GGUF, as the export
    writes it), or {} (greedy, as openvino-genai without one)."""
    path = Path(model).parent / GENERATION_CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def eos_ids(defaults: dict) -> list[int]:
    ids = defaults.get("eos_token_id")
    ids = ids if isinstance(ids, list) else [ids]
    return [int(i) for i in ids if isinstance(i, int) and not isinstance(i, bool)]


def sampler_settings(sampling, defaults: dict) -> dict:
    """The child's sampler settings: a request's ``Sampling`` over the model's defaults, with
    openvino-genai's rule (the model samples only if its config says ``do_sample``, or the
    request gives a temperature above 0)."""
    temperature = sampling.temperature
    if temperature is None:
        temperature = float(defaults.get("temperature", 1.0)) if defaults.get("do_sample") else 0.0
    settings = {name: _given(sampling, defaults, name)
                for name in ("top_p", "top_k", "min_p", "repetition_penalty")}
    return {"temperature": temperature, **settings, "seed": sampling.seed,
            "presence_penalty": sampling.presence_penalty, "frequency_penalty": sampling.frequency_penalty}


def _given(sampling, defaults: dict, name: str):
    """The request's value, else ``generation_config.json``'s (as openvino-genai reads it)."""
    value = getattr(sampling, name)
    return defaults.get(name) if value is None else value


class TextStream:
    """Token ids to text pieces: an incomplete UTF-8 character is held back, and so is a tail
    that may begin a stop string; the text ends before the first stop string (which is left out,
    as openvino-genai leaves it out). ``decode(ids) -> str`` is the model's tokenizer's.

    Token ids are decoded in windows that restart after a newline or ``WINDOW`` tokens, so the
    work per token stays bounded on long replies.
    """

    WINDOW = 256

    def __init__(self, decode, stop=()):
        self.decode, self.stop = decode, tuple(s for s in stop if s)
        self.done, self.window, self.sent = "", [], 0   # text of closed windows; ids; chars sent
        self.text, self.stopped = "", False             # what was sent, in one string

    def write(self, ids: list[int]) -> str:
        if self.stopped:
            return ""
        self.window += list(ids)
        piece = self.decode(self.window)
        if piece.endswith("\ufffd"):
            return ""  # the rest of a character is still to come
        text = self.done + piece
        if piece.endswith("\n") or len(self.window) >= self.WINDOW:
            self.done, self.window = text, []
        return self._emit(text, final=False)

    def end(self) -> str:
        if self.stopped:
            return ""
        text = self.done + (self.decode(self.window) if self.window else "")
        self.done, self.window = text, []
        return self._emit(text, final=True)

    def _emit(self, text: str, final: bool) -> str:
        longest = max((len(s) for s in self.stop), default=0)
        start = max(0, self.sent - longest + 1)
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            end, self.stopped = min(hits), True
        elif final:
            end = len(text)
        else:
            end = len(text) - self._held(text)
        out = text[self.sent:max(end, self.sent)]
        self.sent += len(out)
        self.text += out
        return out

    def _held(self, text: str) -> int:
        """The longest tail of ``text`` that is the start of a stop string."""
        for n in range(min(len(text), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stop):
                return n
        return 0


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (``bytes_to_unicode``), character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


BYTE_LEVEL = _byte_level_alphabet()


def is_byte_level(tokenizer) -> bool:
    """Whether a Hugging Face fast tokenizer decodes with GPT-2's byte-level alphabet (Qwen's does)."""
    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    return "ByteLevel" in json.dumps(decoder)


def token_bytes(tokenizer, ids, byte_level: bool = True) -> list[bytes]:
    """Each token's own bytes through a Hugging Face fast tokenizer (a token may hold part of a
    UTF-8 character): a byte-level BPE token's characters mapped back to bytes, an added token's
    text as UTF-8, b"" for an id the tokenizer does not have (a model's padded rows). Without
    ``byte_level`` (:func:`is_byte_level`), each token's decoded text."""
    ids = [int(i) for i in ids]
    if not byte_level:
        return [tokenizer.decode([i]).encode("utf-8") if 0 <= i < len(tokenizer) else b"" for i in ids]
    added = tokenizer.added_tokens_decoder
    out = []
    for i, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
        if piece is None:
            out.append(b"")
        elif i in added or any(ch not in BYTE_LEVEL for ch in piece):
            out.append(piece.encode("utf-8"))
        else:
            out.append(bytes(BYTE_LEVEL[ch] for ch in piece))
    return out
