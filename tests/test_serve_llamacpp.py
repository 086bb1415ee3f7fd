"""`tangquant serve` and `chat` through a GGUF: llama.cpp behind the same API, limits and hardening."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest
from _serve_fixtures import API_KEY, post_json, raw_request, running_server, wait_idle

from tangquant.cli import main

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "写一首关于明月的诗"}]
LONG = 12000  # outlasts any act of the test (the 16k-context GGUF), as in test_serve.py


def _gguf(d):
    (f,) = d.glob("*.gguf")
    return f


def _greedy_reply(gguf_dir, tokenizer, n: int) -> tuple[str, int]:
    """llama.cpp's own greedy continuation of the chat prompt (text, tokens), stopped where the
    model's generation config says EOS."""
    from tangquant.gguf.runtime import Session

    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    eos = json.loads((gguf_dir / "generation_config.json").read_text())["eos_token_id"]
    s = Session(_gguf(gguf_dir), threads=2, n_ctx=256)
    try:
        tokens = s.greedy(list(ids), n)
    finally:
        s.close()
    stop = next((i for i, t in enumerate(tokens) if t in eos), None)
    kept = tokens if stop is None else tokens[:stop + 1]
    return tokenizer.decode(kept, skip_special_tokens=True), len(kept)


def _stream(server, max_tokens: int) -> socket.socket:
    """A raw streaming request whose response has started (its generation is running)."""
    body = json.dumps({"messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                 b"application/json\r\nAuthorization: Bearer " + API_KEY.encode() +
                 b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    sock.recv(1)
    return sock


@pytest.fixture(scope="module")
def server(tiny_gguf):
    with running_server(tiny_gguf, api_key=API_KEY, max_num_seqs=2, queue_size=2,
                        max_tokens_limit=500, timeout=60) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_chat_and_completions_are_llama_cpp_greedy(client, tiny_gguf, tiny_tokenizer):
    """The reply is llama.cpp's own greedy decoding of the model's chat prompt; streamed the same;
    max_tokens and stop strings hold; the model card names the engine."""
    (card,) = client.models.list().data
    assert card.id == "tiny-gguf" and card.model_extra["engine"] == "llamacpp"
    assert card.model_extra["context_length"] == 1024
    want, n = _greedy_reply(tiny_gguf, tiny_tokenizer, 12)
    reply = client.chat.completions.create(model="tiny-gguf", messages=MESSAGES, max_tokens=12,
                                           temperature=0)
    assert reply.choices[0].message.content == want and reply.usage.completion_tokens == n
    assert reply.usage.prompt_tokens == len(tiny_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True))
    assert reply.choices[0].finish_reason == ("length" if n == 12 else "stop")
    chunks = list(client.chat.completions.create(model="tiny-gguf", messages=MESSAGES, max_tokens=12,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    # A stop string inside the reply ends it just before, and says so.
    stop = want[len(want) // 2:len(want) // 2 + 2]
    cut = client.chat.completions.create(model="tiny-gguf", messages=MESSAGES, max_tokens=12,
                                         temperature=0, stop=[stop])
    assert cut.choices[0].message.content == want[:want.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    done = client.completions.create(model="tiny-gguf", prompt="床前明月光，", max_tokens=5, temperature=0)
    assert done.object == "text_completion" and 1 <= done.usage.completion_tokens <= 5


def test_json_schema_through_llama_grammar(server):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string", "maxLength": 4}},
              "required": ["n", "s"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    status, _, body = post_json(server, CHAT, {"messages": MESSAGES, "max_tokens": 60, "temperature": 0,
                                               "response_format": fmt})
    assert status == 200, body
    value = json.loads(body["choices"][0]["message"]["content"])
    assert isinstance(value["n"], int) and isinstance(value["s"], str) and len(value["s"]) <= 4
    # A grammar that has ended allows only EOS: refused with ignore_eos, naming the field.
    status, _, body = post_json(server, CHAT, {"messages": MESSAGES, "response_format": fmt,
                                               "ignore_eos": True})
    assert status == 400 and body["error"]["param"] == "ignore_eos"


def test_a_llama_cpp_crash_fails_its_request_not_the_server(server):
    """The llama.cpp process dies mid-generation: that request gets 503, the model loads again,
    the next request is answered."""
    engine = server.engine
    before = engine.proc.restarts
    sock = _stream(server, 500)
    os.kill(engine.proc.pid, signal.SIGKILL)
    data = b""
    while b"data: [DONE]" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    sock.close()
    assert b"generation_failed" in data and b"signal 9" in data
    status, _, reply = post_json(server, CHAT, {"messages": MESSAGES, "max_tokens": 3})
    assert status == 200 and reply["usage"]["completion_tokens"] >= 1
    assert engine.proc.restarts == before + 1
    assert wait_idle(server)["failed"] >= 1


@pytest.fixture(scope="module")
def one_slot(long_gguf):
    with running_server(long_gguf, api_key=API_KEY, max_num_seqs=1, queue_size=0,
                        max_tokens_limit=LONG, timeout=60) as srv:
        yield srv


def test_queue_full_is_429_disconnect_cancels_and_metrics(one_slot):
    server = one_slot
    before = wait_idle(server)
    sock = _stream(server, LONG)
    status, headers, refused = post_json(server, CHAT, {"messages": MESSAGES, "max_tokens": 2})
    assert status == 429 and int(headers["retry-after"]) >= 1
    assert refused["error"]["type"] == "rate_limit_error"
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    t0 = time.monotonic()
    after = wait_idle(server)
    assert after["cancelled"] == before["cancelled"] + 1 and time.monotonic() - t0 < 10
    assert post_json(server, CHAT, {"messages": MESSAGES, "max_tokens": 2})[0] == 200
    metrics = raw_request(server, "GET", "/metrics", headers={"Authorization": f"Bearer {API_KEY}"})[2].decode()
    assert "tangquant_requests_refused_total 1.0" in metrics
    assert "tangquant_requests_cancelled_total 1.0" in metrics
    assert 'tangquant_generation_tokens_total{model="tiny-poet"}' in metrics
    assert "tangquant_kv_cache_bytes" in metrics


def test_timeout(long_gguf):
    with running_server(long_gguf, timeout=0.3, max_tokens_limit=LONG) as srv:
        status, _, body = post_json(srv, CHAT, {"messages": MESSAGES, "max_tokens": LONG, "ignore_eos": True},
                                    key=None)
        assert status == 504 and body["error"]["code"] == "timeout"
        assert wait_idle(srv)["timed_out"] == 1


@pytest.mark.parametrize("flags,field", [
    (["--adapter", "x=DIR"], "--adapter"), (["--enable-prefix-caching"], "--enable-prefix-caching"),
    (["--ov-config", "KV_CACHE_PRECISION=u8"], "--ov-config"), (["--engine", "pipelines"], "--engine"),
    (["--ray"], "--ray")])
def test_what_llama_cpp_lacks_is_one_line(tiny_gguf, capsys, flags, field):
    rc = main(["serve", "--model", str(tiny_gguf), "--port", "0", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and field in err, err


def test_chat_through_a_gguf(tiny_gguf, tiny_tokenizer, capsys, qv_adapter_dir):
    want, _ = _greedy_reply(tiny_gguf, tiny_tokenizer, 8)
    assert main(["chat", "--model", str(tiny_gguf), "--prompt", MESSAGES[0]["content"],
                 "--temperature", "0", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == want + "\n"
    assert main(["chat", "--model", str(tiny_gguf), "--adapter", str(qv_adapter_dir), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--adapter" in err and "llama.cpp" in err


@pytest.mark.fast
def test_text_stream_holds_back_characters_and_stop_strings():
    from tangquant.gguf.text import TextStream

    pieces = {1: b"ab", 2: b"c", 3: b"d", 4: "明".encode()[:1], 5: "明".encode()[1:], 6: b"\n"}

    def decode(ids):
        return b"".join(pieces[i] for i in ids).decode("utf-8", "replace")

    t = TextStream(decode, stop=("bc",))  # split over two tokens; never sent, nor what follows
    assert [t.write([1]), t.write([2]), t.write([3]), t.end()] == ["a", "", "", ""]
    assert t.stopped and t.text == "a"
    t = TextStream(decode, stop=("cx",))  # a tail that began a stop string is sent at the end
    assert [t.write([1]), t.write([2]), t.end()] == ["ab", "", "c"] and not t.stopped
    t = TextStream(decode)  # half a character waits for its other half
    assert [t.write([4]), t.write([5]), t.write([6]), t.write([1])] == ["", "明", "\n", "ab"]
    assert t.text == "明\nab"


def test_a_deployment_runs_in_chat_serve_and_bench(tmp_path, tiny_gguf, ov_export, capsys):
    """chat, serve and bench given a deployment directory run its `use` workload's engine, model
    and settings (hand-written here; tune writes it in test_tune.py's slow test)."""
    from tangquant import deploy
    from tangquant.bench import bench
    from tangquant.errors import BenchError
    from tangquant.serve import prepare

    root = tmp_path / "poet"
    workloads = {"pp32+tg256": deploy.entry(root, "llamacpp", _gguf(tiny_gguf), {"ctk": "q8_0", "ctv": "q8_0"}, 1),
                 "pp512+tg128": deploy.entry(root, "ov", ov_export[0], {"KV_CACHE_PRECISION": "u8"}, 1)}
    deploy.write(root, {"use": "pp32+tg256", "workloads": workloads})
    srv = prepare(root, port=0)
    try:
        assert srv.engine.kind == "llamacpp" and srv.engine.models() == ("poet",)
        assert srv.engine.proc.spec["options"] == {"ctk": "q8_0", "ctv": "q8_0"}
        assert srv.engine.proc.spec["threads"] == 1
    finally:
        srv.close()
    assert main(["chat", "--model", str(root), "--prompt", "写诗", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    res = bench([f"d=deploy:{root}"], prompt_tokens=8, gen_tokens=4, repetitions=1, threads=(1,),
                bandwidth_mb=16, results_dir=str(tmp_path / "b.jsonl"))
    (row,) = res["records"]
    assert row["status"] == "ok" and row["kind"] == "llamacpp" and row["options"] == {"ctk": "q8_0", "ctv": "q8_0"}
    with pytest.raises(BenchError, match="settings are its own"):
        bench([f"d=deploy:{root},ctk=f16"])
    deploy.write(root, {"use": "pp512+tg128", "workloads": workloads}, force=True)
    srv = prepare(root, port=0)
    try:
        assert srv.engine.properties["KV_CACHE_PRECISION"] == "u8"
        assert str(srv.engine.properties["INFERENCE_NUM_THREADS"]) == "1"
    finally:
        srv.close()


def test_an_empty_prompt_is_400_and_the_engine_goes_on(server):
    status, _, body = post_json(server, "/v1/completions", {"prompt": "", "max_tokens": 2})
    assert status == 400 and body["error"]["param"] == "prompt"
    assert post_json(server, "/v1/completions", {"prompt": "床", "max_tokens": 2})[0] == 200
