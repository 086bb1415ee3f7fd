"""``POST /tokenize`` and ``POST /detokenize``: vLLM's request and response shapes.

The engine's own tokenizer does the work (openvino-tokenizers for an IR, the model's Hugging Face
tokenizer for a GGUF), so the ids are the ones generation counts and feeds. llama-server's
field names are read too (``content``, ``add_special``, ``with_pieces``) and ``/detokenize``
answers with both names for the text (vLLM's ``prompt``, llama-server's ``content``), so a client
of either works unchanged. Bodies go through the same key, size and time limits as the rest.
"""

from __future__ import annotations

import asyncio

from tangquant.server.schema import ApiError, chat_request


def _flag(body: dict, names: tuple[str, ...], default: bool) -> bool:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, bool):
            raise ApiError(400, f"'{name}' must be a boolean", name, "invalid_type")
        return value
    return default


def _text(body: dict) -> str:
    name = "prompt" if "prompt" in body else "content"
    value = body.get(name)
    if value is None:
        raise ApiError(400, "'prompt' (or 'messages') is required", "prompt",
                       "missing_required_parameter")
    if not isinstance(value, str):
        raise ApiError(400, f"'{name}' must be a string", name, "invalid_type")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"'{name}' is not valid Unicode (lone surrogate)", name,
                       "invalid_encoding") from None
    return value


def _pieces(engine, ids: list[int]) -> list[dict]:
    """llama-server's ``with_pieces`` form: a piece is text, or its bytes when not valid UTF-8."""
    out = []
    for i, data in zip(ids, engine.token_bytes(ids)):
        try:
            piece = data.decode("utf-8")
        except UnicodeDecodeError:
            piece = list(data)
        out.append({"id": i, "piece": piece})
    return out


def _tokenize(engine, body: dict) -> dict:
    if body.get("return_token_strs"):
        raise ApiError(400, "'return_token_strs' is not supported; 'with_pieces' gives each token's "
                       "text", "return_token_strs", "unsupported_value")
    if "messages" in body:  # vLLM's chat form: the messages as the model's chat template renders them
        messages = chat_request({"messages": body["messages"]}, 1).messages
        text = engine.chat_prompt(messages, _flag(body, ("add_generation_prompt",), True))
        special = _flag(body, ("add_special_tokens", "add_special"), False)
    else:
        text, special = _text(body), _flag(body, ("add_special_tokens", "add_special"), True)
    ids = engine.tokenize(text, special)
    tokens = _pieces(engine, ids) if _flag(body, ("with_pieces",), False) else ids
    return {"count": len(ids), "max_model_len": engine.context_length, "tokens": tokens,
            "token_strs": None}


def _detokenize(engine, body: dict) -> dict:
    ids = body.get("tokens")
    if ids is None:
        raise ApiError(400, "'tokens' is required", "tokens", "missing_required_parameter")
    size = engine.vocab_size
    if not isinstance(ids, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise ApiError(400, "'tokens' must be a list of integers", "tokens", "invalid_type")
    if any(not 0 <= i < size for i in ids):
        bad = next(i for i in ids if not 0 <= i < size)
        raise ApiError(400, f"'tokens' holds {bad}; this model's token ids are 0 to {size - 1}",
                       "tokens", "invalid_value")
    text = engine.detokenize(ids)
    return {"prompt": text, "content": text}


def model_of(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", "model", "invalid_type")
    return model


async def tokenize(engine, body: dict) -> dict:
    return await asyncio.to_thread(_tokenize, engine, body)


async def detokenize(engine, body: dict) -> dict:
    return await asyncio.to_thread(_detokenize, engine, body)


ROUTES = {"/tokenize": tokenize, "/detokenize": detokenize}
