"""The hostile-input suite, server part (issue 18, class 6): slow and idle clients must not deny
service to others. Against a real `tangquant serve` on 127.0.0.1; every loop is bounded."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _hostile_fixtures import copy, edit_json
from _serve_fixtures import free_port, raw_request, tiny_ir

from tangquant.cli import main

ROOT = Path(__file__).resolve().parent.parent
IDLE, HALF_SENT, SLOW_BODY = 100, 100, 20


@pytest.fixture(scope="module")
def ir(tmp_path_factory, tiny_model_dir):
    return tiny_ir(tmp_path_factory, tiny_model_dir)


@contextlib.contextmanager
def serve_process(model: Path, port: int):
    """`tangquant serve` in its own process, ready (its /health answers) or failed."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "tangquant", "-q", "serve", "--model", str(model),
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read()
            with contextlib.suppress(OSError):
                if _get_health(port, timeout=2.0)[0] == 200:
                    break
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _get_health(port: int, timeout: float):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        start = time.monotonic()
        conn.request("GET", "/health")
        resp = conn.getresponse()
        resp.read()
        return resp.status, time.monotonic() - start
    finally:
        conn.close()


def _open(port: int, payload: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    if payload:
        s.sendall(payload)
    return s


def test_idle_and_half_sent_connections_do_not_lock_out_the_server(ir):
    """The probe's lock-out: 33 silent sockets made every request, /health included, get 503."""
    port = free_port()
    with serve_process(ir, port), contextlib.ExitStack() as held:
        for _ in range(IDLE):
            held.callback(_open(port).close)
        for i in range(HALF_SENT):
            held.callback(_open(port, f"GET /health HTTP/1.1\r\nHost: x\r\nX-{i}: ".encode()).close)
        for _ in range(SLOW_BODY):
            held.callback(_open(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                      b"Content-Type: application/json\r\nContent-Length: 4000\r\n\r\n{").close)
        for _ in range(3):  # locked out, it answered 503 or never; 5 s leaves room for a loaded runner
            status, seconds = _get_health(port, timeout=5.0)  # a socket timeout fails the test
            assert status == 200 and seconds < 5.0
        body = json.dumps({"messages": [{"role": "user", "content": "写一首唐诗"}], "max_tokens": 4,
                           "temperature": 0}).encode()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        reply = json.loads(resp.read())
        conn.close()
        assert resp.status == 200 and reply["usage"]["completion_tokens"] >= 1


def test_stalled_connections_are_closed(ir):
    """Sockets that never finish a request are closed, so they cannot pile up to the fd limit."""
    from tangquant.server import runner
    from tangquant.server.config import ServeConfig

    server = runner.build(ir, ServeConfig(port=0), head_timeout=1.0, body_timeout=1.0).start()
    try:
        stalled = {"idle": _open(server.port),
                   "half-sent head": _open(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\n"),
                   "stalled body": _open(server.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")}
        for name, s in stalled.items():
            s.settimeout(10)
            try:
                data = s.recv(4096)
            except TimeoutError:
                pytest.fail(f"the {name} connection was not closed")
            finally:
                s.close()
            assert b"200 OK" not in data, name
        # A client that sends its request in pieces, within the time, is served.
        slow = _open(server.port, b"GET /health HTTP/1.1\r\n")
        time.sleep(0.2)
        slow.sendall(b"Host: 127.0.0.1\r\n\r\n")
        slow.settimeout(10)
        assert slow.recv(4096).startswith(b"HTTP/1.1 200")
        slow.close()
        assert raw_request(server, "GET", "/health")[0] == 200
    finally:
        server.stop()


def test_chat_on_an_ir_stops_at_its_context(tmp_path, capsys, ir):
    short = copy(ir, tmp_path / "short")
    edit_json(short / "config.json", max_position_embeddings=96)
    rc = main(["chat", "--model", str(short), "--prompt", "写一首唐诗", "--temperature", "0",
               "--max-new-tokens", "100000000"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "capped at the model's context of 96 tokens" in captured.err
    from tangquant.generate import Sampling, open_generator

    generator = open_generator(short)
    n_prompt = generator._prompt_tokens([{"role": "user", "content": "写一首唐诗"}])
    assert generator._cap(n_prompt, Sampling(max_new_tokens=100_000_000)) == 96 - n_prompt
    rc = main(["chat", "--model", str(short), "--prompt", "寫" * 200])
    assert rc == 2 and "context is 96" in capsys.readouterr().err
