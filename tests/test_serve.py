"""`tangquant serve`: the official openai client, bad inputs, auth, queueing, cancellation, timeouts."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest
from _serve_fixtures import (API_KEY, LONG_TOKENS, long_context_ir, post_json, raw_request,
                             running_server, tiny_ir, wait_idle)

from tangquant.cli import main
from tangquant.errors import InputError, ParameterError, ServeError

MODEL = "tiny-poet"
CHAT = "/v1/chat/completions"
LIMIT = 1000  # --max-tokens-limit of the shared server; the tiny model's context is 1024


@pytest.fixture(scope="module")
def ir(tmp_path_factory, tiny_model_dir):
    return tiny_ir(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def long_ir(tmp_path_factory, tiny_tokenizer):
    return long_context_ir(tmp_path_factory, tiny_tokenizer)


@pytest.fixture(scope="module")
def server(ir):
    with running_server(ir, api_key=API_KEY, max_concurrency=1, queue_size=0,
                        max_tokens_limit=LIMIT, timeout=60) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


MESSAGES = [{"role": "system", "content": "你是一位唐代詩人。"},
            {"role": "user", "content": "写一首关于明月的诗"}]


def test_openai_client_chat_stream_models_completions(client, tiny_tokenizer, ir):
    import openvino_genai

    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).context_length == 1024

    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12,
                                           temperature=0)
    text = reply.choices[0].message.content
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length") and text
    # The prompt is the model's own ChatML template, exactly as transformers renders it.
    ids = tiny_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert reply.usage.prompt_tokens == len(ids)
    assert 1 <= reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model_extra["timings"]["ttft_ms"] > 0  # the server's own timings (extension)

    # Greedy output is what the pipeline itself makes from that prompt: nothing lost or added.
    prompt = tiny_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                                tokenize=False)
    direct = openvino_genai.LLMPipeline(str(ir), "CPU").generate(
        [prompt], max_new_tokens=12, do_sample=False, apply_chat_template=False).texts[0]
    assert text == direct

    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-2].choices[0].finish_reason == reply.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        reply.usage.completion_tokens

    done = client.completions.create(model=MODEL, prompt="床前明月光，", max_tokens=6,
                                     temperature=0)
    assert done.object == "text_completion" and done.usage.completion_tokens <= 6
    pieces = list(client.completions.create(model=MODEL, prompt="床前明月光，", max_tokens=6,
                                            temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == done.choices[0].text


def test_sse_wire_format(server):
    """The exact bytes: `data: {json}` events, one id, and `data: [DONE]` last."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 5, "stream": True})
    conn.request("POST", CHAT, body, {"Authorization": f"Bearer {API_KEY}",
                                      "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = resp.read().decode().split("\n\n")
    conn.close()
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    objs = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert {o["object"] for o in objs} == {"chat.completion.chunk"}
    assert objs[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(o["choices"][0]["finish_reason"] is None for o in objs[:-1])


@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("GET", f"/v1/models/{MODEL}"),
                                         ("POST", CHAT), ("POST", "/v1/completions")])
@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", f"Basic {API_KEY}",
                                  f"Bearer {API_KEY}x", "Bearer "])
def test_missing_or_wrong_key_is_401(server, method, path, auth):
    headers = {"Authorization": auth} if auth is not None else {}
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "prompt": "x"}).encode()
    status, hdrs, data = raw_request(server, method, path, body if method == "POST" else None,
                                     headers)
    assert status == 401
    assert data["error"]["code"] == "invalid_api_key" and data["error"]["type"]
    assert hdrs.get("www-authenticate") == "Bearer"


def test_openai_client_with_wrong_key(server):
    import openai

    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)


def _user(content="寫一首詩", **extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


LONG = "龘" * 400  # 1200 byte-level tokens: more than the tiny model's 1024-token context
BAD_REQUESTS = [
    # (id, path, JSON payload or raw bytes, status, param)
    ("invalid-json", CHAT, b'{"messages": [', 400, None),
    ("not-an-object", CHAT, b"[1, 2]", 400, None),
    ("deep-nesting", CHAT, b"[" * 100000 + b"]" * 100000, 400, None),
    ("empty-body", CHAT, b"", 400, None),
    ("bad-utf8", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None),
    ("lone-surrogate", CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400,
     "messages[0].content"),
    ("missing-messages", CHAT, {"model": MODEL}, 400, "messages"),
    ("messages-string", CHAT, {"messages": "hi"}, 400, "messages"),
    ("messages-empty", CHAT, {"messages": []}, 400, "messages"),
    ("message-not-object", CHAT, {"messages": ["hi"]}, 400, "messages[0]"),
    ("content-number", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content"),
    ("content-image", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "messages[0].content"),
    ("bad-role", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role"),
    ("max-tokens-zero", CHAT, _user(max_tokens=0), 400, "max_tokens"),
    ("max-tokens-negative", CHAT, _user(max_tokens=-5), 400, "max_tokens"),
    ("max-tokens-over-limit", CHAT, _user(max_tokens=LIMIT + 1), 400, "max_tokens"),
    ("max-completion-tokens-over", CHAT, _user(max_completion_tokens=10**30), 400,
     "max_completion_tokens"),
    ("max-tokens-string", CHAT, _user(max_tokens="10"), 400, "max_tokens"),
    ("max-tokens-float", CHAT, _user(max_tokens=1.5), 400, "max_tokens"),
    ("max-tokens-bool", CHAT, _user(max_tokens=True), 400, "max_tokens"),
    ("temperature-nan", CHAT, b'{"messages": [{"role": "user", "content": "x"}], '
     b'"temperature": NaN}', 400, "temperature"),
    ("temperature-infinity", CHAT, b'{"messages": [{"role": "user", "content": "x"}], '
     b'"temperature": Infinity}', 400, "temperature"),
    ("temperature-negative", CHAT, _user(temperature=-0.1), 400, "temperature"),
    ("temperature-string", CHAT, _user(temperature="hot"), 400, "temperature"),
    ("top-p-zero", CHAT, _user(top_p=0), 400, "top_p"),
    ("top-p-over-one", CHAT, _user(top_p=1.01), 400, "top_p"),
    ("stream-string", CHAT, _user(stream="yes"), 400, "stream"),
    ("stop-number", CHAT, _user(stop=7), 400, "stop"),
    ("n-two", CHAT, _user(n=2), 400, "n"),
    ("unknown-model", CHAT, {**_user(), "model": "gpt-4o"}, 404, "model"),
    ("model-number", CHAT, {**_user(), "model": 3}, 400, "model"),
    ("context-exceeded", CHAT, _user(LONG, max_tokens=10), 400, "messages"),
    ("completion-missing-prompt", "/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("completion-prompt-number", "/v1/completions", {"prompt": 12}, 400, "prompt"),
    ("completion-two-prompts", "/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("completion-top-p-negative", "/v1/completions", {"prompt": "a", "top_p": -1}, 400, "top_p"),
]


@pytest.mark.parametrize("name,path,payload,status,param", BAD_REQUESTS,
                         ids=[r[0] for r in BAD_REQUESTS])
def test_bad_input_gets_openai_error(server, name, path, payload, status, param):
    raw = payload if isinstance(payload, bytes) else None
    code, _, body = post_json(server, path, payload, raw=raw)
    assert code == status, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    assert raw_request(server, "GET", "/health")[0] == 200  # still up


def test_context_limit_is_exact(server, client, tiny_tokenizer):
    """prompt + max_tokens == context is served; one token more is refused."""
    messages = [{"role": "user", "content": "龘" * 300}]  # 900 tokens
    n_prompt = len(tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    room = 1024 - n_prompt
    assert 0 < room < 200
    status, _, body = post_json(server, CHAT, {"messages": messages, "max_tokens": room + 1})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=room,
                                           temperature=0)
    assert reply.usage.prompt_tokens == n_prompt


def test_body_over_one_megabyte_is_413(server):
    big = json.dumps(_user("月" * (1 << 20))).encode()
    status, _, body = post_json(server, CHAT, None, raw=big)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    # Chunked, with no Content-Length: the server stops reading past the limit.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    pieces = (big[i:i + 65536] for i in range(0, len(big), 65536))
    conn.request("POST", CHAT, pieces, {"Authorization": f"Bearer {API_KEY}",
                                        "Content-Type": "application/json"},
                 encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413
    conn.close()
    assert raw_request(server, "GET", "/health")[0] == 200


def test_json_content_type_and_loopback_host_required(server):
    """A page on another site can neither post a simple form nor rebind a name to 127.0.0.1."""
    status, _, body = post_json(server, CHAT, _user(max_tokens=2),
                                extra_headers={"Content-Type": "text/plain"})
    assert status == 415 and body["error"]["code"] == "unsupported_media_type"
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
        status, _, body = raw_request(server, "GET", "/", headers={"Host": host})
        assert status == 400 and body["error"]["code"] == "invalid_host"
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", "[::1]:80"):
        assert raw_request(server, "GET", "/health", headers={"Host": host})[0] == 200


def test_unknown_routes_and_methods_answer_json(server):
    status, _, body = raw_request(server, "GET", "/v1/nothing")
    assert status == 404 and "error" in body
    status, _, body = raw_request(server, "GET", CHAT, headers={"Authorization": f"Bearer {API_KEY}"})
    assert status == 405 and "error" in body


def test_web_page_is_self_contained_and_renders_text(server):
    status, headers, page = raw_request(server, "GET", "/")
    assert status == 200 and b"<title>tangquant chat</title>" in page
    assert "default-src 'none'" in headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        status, _, asset = raw_request(server, "GET", f"/web/{name}")
        assert status == 200
        text = asset.decode()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text
    js = raw_request(server, "GET", "/web/app.js")[2].decode()
    for unsafe in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert unsafe not in js
    assert "textContent" in js
    assert "http" not in page.decode().replace("http-equiv", "")
    assert raw_request(server, "GET", "/web/..%2Fserve.py")[0] == 404


def _open_stream(server, payload) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", CHAT, json.dumps(payload), {"Authorization": f"Bearer {API_KEY}",
                                                     "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.fp.readline()  # the first event: the generation is running
    return conn, resp


@pytest.fixture(scope="module")
def one_slot(long_ir):
    """One generation at a time, no queue, and a model whose generations outlast the test's acts."""
    with running_server(long_ir, api_key=API_KEY, max_concurrency=1, queue_size=0,
                        max_tokens_limit=LONG_TOKENS, timeout=60) as srv:
        yield srv


def test_queue_full_is_429_and_disconnect_cancels(one_slot):
    server = one_slot
    before = wait_idle(server)
    long = _user(max_tokens=LONG_TOKENS, temperature=0, ignore_eos=True)
    conn, resp = _open_stream(server, {**long, "stream": True})
    status, headers, body = post_json(server, CHAT, _user(max_tokens=2))
    assert status == 429 and int(headers["retry-after"]) >= 1
    assert body["error"]["type"] == "rate_limit_error"
    resp.close()
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    t0 = time.monotonic()
    after = wait_idle(server)
    assert after["cancelled"] == before["cancelled"] + 1
    assert time.monotonic() - t0 < 10

    # A non-streaming request whose client goes away is cancelled too.
    sock = socket.create_connection(("127.0.0.1", server.port))
    body = json.dumps({**long, "stream": False}).encode()
    sock.sendall(b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                 b"application/json\r\nAuthorization: Bearer " + API_KEY.encode() +
                 b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    end = time.monotonic() + 10
    while raw_request(server, "GET", "/health")[2]["running"] == 0 and time.monotonic() < end:
        time.sleep(0.01)
    sock.close()
    assert wait_idle(server)["cancelled"] == before["cancelled"] + 2
    assert post_json(server, CHAT, _user(max_tokens=2))[0] == 200


def test_timeout(long_ir):
    import openai

    with running_server(long_ir, timeout=0.3, max_tokens_limit=LONG_TOKENS) as srv:
        long = _user(max_tokens=LONG_TOKENS, temperature=0, ignore_eos=True)
        status, _, body = post_json(srv, CHAT, long, key=None)
        assert status == 504 and body["error"]["code"] == "timeout"
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                                max_tokens=LONG_TOKENS,
                                                temperature=0, stream=True,
                                                extra_body={"ignore_eos": True})
        with pytest.raises(openai.APIError, match="timed out"):
            list(stream)
        assert wait_idle(srv)["timed_out"] == 2


def test_public_host_needs_flag_and_warns_without_key(ir, caplog, capsys):
    from tangquant.serve import prepare

    with pytest.raises(ServeError, match="--allow-public"):
        prepare(ir, host="0.0.0.0", port=0)
    srv = prepare(ir, host="0.0.0.0", port=0, allow_public=True)
    srv.close()
    assert "no API key" in caplog.text
    # The CLI turns the refusal into one line and exit status 2 (main reconfigures logging,
    # so it comes last).
    assert main(["serve", "--model", str(ir), "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "--allow-public" in capsys.readouterr().err


def test_bad_settings_are_refused(ir, tmp_path):
    from tangquant.serve import prepare

    with pytest.raises(InputError, match="not an exported OpenVINO model"):
        prepare(tmp_path, port=0)
    for bad in ({"max_concurrency": 0}, {"queue_size": -1}, {"max_tokens_limit": 0},
                {"timeout": 0}, {"port": 70000}):
        with pytest.raises(ParameterError):
            prepare(ir, **{"port": 0, **bad})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ServeError, match="cannot listen"):
            prepare(ir, port=taken.getsockname()[1])


def _load_client(port: int, stop_at: float, seed: int, statuses: list, failures: list) -> None:
    """One client looping until stop_at: streams, whole replies, and streams it abandons."""
    import random

    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    while time.monotonic() < stop_at:
        kind = rng.choice(["stream", "whole", "abandon"])
        payload = _user(rng.choice(["寫一首詩", "明月", "春眠不覺曉"]), max_tokens=rng.randint(8, 48),
                        stream=kind != "whole", temperature=rng.choice([0, 0.7]), seed=seed)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            conn.request("POST", CHAT, json.dumps(payload), headers)
            resp = conn.getresponse()
            statuses.append(resp.status)
            if resp.status == 200 and kind == "abandon":
                resp.fp.readline()
                conn.sock.shutdown(socket.SHUT_RDWR)
            elif resp.status == 200 and kind == "stream":
                if not resp.read().endswith(b"data: [DONE]\n\n"):
                    failures.append("stream without [DONE]")
            elif resp.status == 200:
                json.loads(resp.read())["choices"][0]["message"]["content"]
            else:
                body = json.loads(resp.read())
                if resp.status == 429 and not resp.getheader("Retry-After"):
                    failures.append("429 without Retry-After")
                if "error" not in body:
                    failures.append(f"{resp.status} without an error object")
                time.sleep(0.05)
        except Exception as exc:  # a dropped connection or a bad reply is a failure
            failures.append(repr(exc))
        finally:
            conn.close()


def test_load_twice_max_concurrency_cli_subprocess(ir, tmp_path):
    """`tangquant serve` as a process under 2x max-concurrency clients: only 200/429, flat RSS."""
    import collections
    import os
    import signal
    import subprocess
    import sys
    import threading

    import psutil

    env = {**os.environ, "TANGQUANT_API_KEY": API_KEY}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tangquant", "serve", "--model", str(ir), "--port", "0",
         "--max-concurrency", "2", "--queue-size", "1", "--max-tokens-limit", "64",
         "--timeout", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "serving tiny-poet at http://127.0.0.1:" in line, proc.stderr.read()
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        # the key came from the environment, not the command line
        assert API_KEY not in " ".join(psutil.Process(proc.pid).cmdline())
        statuses, failures, rss = [], [], []
        stop_at = time.monotonic() + 15
        clients = [threading.Thread(target=_load_client, args=(port, stop_at, i, statuses,
                                                               failures)) for i in range(4)]
        for c in clients:
            c.start()
        server = psutil.Process(proc.pid)
        while any(c.is_alive() for c in clients):
            rss.append(server.memory_info().rss)
            time.sleep(0.25)
        for c in clients:
            c.join()
        assert not failures, failures[:5]
        assert set(statuses) <= {200, 429} and statuses.count(200) >= 20, statuses
        # Flat memory: the last quarter of the run holds no more than the second quarter + 24 MiB.
        q = len(rss) // 4
        assert max(rss[3 * q:]) - max(rss[q:2 * q]) < 24 << 20, [r >> 20 for r in rss]
        print(f"statuses {dict(collections.Counter(statuses))}, RSS MiB {[r >> 20 for r in rss]}")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0  # a graceful shutdown
        assert "server stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_serves_the_tangquant_int4_export(tiny_model_dir, tmp_path):
    """The real pipeline's output: quantize --algo rtn, export --format openvino, serve."""
    import openai

    from tangquant.export import export
    from tangquant.quantize import quantize

    quantize(tiny_model_dir, tmp_path / "gptq", algo="rtn", eval_samples=0)
    export(tmp_path / "gptq", tmp_path / "ov")
    with running_server(tmp_path / "ov", model_name=MODEL, max_tokens_limit=64) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        card = client.models.retrieve(MODEL)
        assert card.made_by == "tangquant export" and card.quantization.startswith("INT4")
        reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8)
        assert reply.choices[0].message.content and reply.usage.completion_tokens <= 8
