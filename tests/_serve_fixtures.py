"""Fixtures for the server tests: the tiny model exported to OpenVINO, and a running server.

The IR is made with optimum-intel and openvino-tokenizers (the export stage is
being written in parallel); it is built once per test session under pytest's
base temporary directory and shared by every serve test module.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time
from pathlib import Path

API_KEY = "test-key-0123456789"


def build_ir(model_dir: Path, out: Path) -> Path:
    """Export a Hugging Face model directory to an OpenVINO IR directory LLMPipeline can load."""
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer
    from optimum.intel import OVModelForCausalLM
    from transformers import AutoTokenizer

    tmp = out.parent / (out.name + ".partial")
    model = OVModelForCausalLM.from_pretrained(model_dir, export=True, compile=False)
    model.save_pretrained(tmp)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ov_tok, ov_detok = convert_tokenizer(tokenizer, with_detokenizer=True)
    ov.save_model(ov_tok, tmp / "openvino_tokenizer.xml")
    ov.save_model(ov_detok, tmp / "openvino_detokenizer.xml")
    tokenizer.save_pretrained(tmp)  # the chat template travels in tokenizer_config.json
    tmp.rename(out)
    return out


def tiny_ir(tmp_path_factory, tiny_model_dir: Path) -> Path:
    """The session's one IR of ``tiny_model_dir`` (built on first use)."""
    out = tmp_path_factory.getbasetemp() / "serve_ir" / "tiny-poet"
    if not out.is_dir():
        out.parent.mkdir(exist_ok=True)
        build_ir(tiny_model_dir, out)
    return out


# Long enough that no generation meant to be in flight can finish before the test acts on it, on a
# loaded runner: at 900 tokens of a 1024-token context some did in CI (8 of 50 dropped streams
# counted as completed; a stream done before the request meant to be refused with 429).
LONG_TOKENS = 12000


def long_context_ir(tmp_path_factory, tiny_tokenizer) -> Path:
    """The session's IR of the tiny model with a 16k context, for generations that must be
    still running when the test acts (built on first use)."""
    from conftest import save_tiny_model

    out = tmp_path_factory.getbasetemp() / "serve_ir_16k" / "tiny-poet"
    if not out.is_dir():
        out.parent.mkdir(exist_ok=True)
        save_tiny_model(tiny_tokenizer, out.parent / "hf", seed=7, max_position_embeddings=16384)
        build_ir(out.parent / "hf", out)
    return out


@contextlib.contextmanager
def running_server(model: Path, **kwargs):
    """A server on a free port in a background thread; yields it and stops it afterwards."""
    from tangquant.serve import prepare

    server = prepare(model, host="127.0.0.1", port=0, **kwargs).start()
    try:
        yield server
    finally:
        server.stop()


def raw_request(server, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None, timeout: float = 60.0):
    """Send exact bytes (the openai client cannot send malformed ones); return (status, headers, json)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        try:
            parsed = json.loads(data) if data else None
        except ValueError:
            parsed = data
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, parsed
    finally:
        conn.close()


def post_json(server, path: str, payload, key: str | None = API_KEY, raw: bytes | None = None,
              extra_headers: dict | None = None):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    headers.update(extra_headers or {})
    body = raw if raw is not None else json.dumps(payload).encode()
    return raw_request(server, "POST", path, body, headers)


def wait_idle(server, timeout: float = 30.0) -> dict:
    """Wait until no generation runs or waits (cancelled ones finish in the background)."""
    end = time.monotonic() + timeout
    while True:
        status, _, body = raw_request(server, "GET", "/health")
        if status == 200 and body["running"] == 0 and body["queued"] == 0:
            return body
        if time.monotonic() > end:
            raise AssertionError(f"server still busy: {body}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
