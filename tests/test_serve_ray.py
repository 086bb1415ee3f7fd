"""`tangquant serve --ray`: two Ray Serve replicas on 127.0.0.1 answer the official openai client."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import pytest
from _serve_fixtures import API_KEY, free_port, raw_request, tiny_ir

pytest.importorskip("ray.serve", reason="the [ray] extra is not installed")

PROMPT = [{"role": "user", "content": "写一首关于明月的诗"}]
MODEL_NAME = "tiny-poet"
TOKEN = Path.home() / ".ray" / "auth_token"


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory, tiny_model_dir, monkeypatch_module):
    from tangquant.server import ray_app
    from tangquant.server.config import ServeConfig

    monkeypatch_module.delenv("RAY_ADDRESS", raising=False)
    monkeypatch_module.setenv("RAY_AUTH_MODE", "disabled")
    had_token = TOKEN.exists()
    ir = tiny_ir(tmp_path_factory, tiny_model_dir)
    cfg = ServeConfig(port=free_port(), api_key=API_KEY, ray=True, replicas=2, max_num_seqs=4,
                      max_tokens_limit=64, timeout=60)
    url = ray_app.deploy(ir, cfg)
    try:
        yield url, cfg.port
    finally:
        ray_app.shutdown()
    assert had_token or not TOKEN.exists()  # a local instance writes no ~/.ray/auth_token


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


class _Port:
    def __init__(self, port):
        self.port = port


def test_two_replicas_answer_concurrent_openai_requests(ray_server):
    import openai

    url, port = ray_server
    client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=2, timeout=60)
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]

    def ask(i):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL_NAME, messages=PROMPT, max_tokens=6, temperature=0)
        reply = raw.parse()
        return (reply.choices[0].message.content, reply.usage.completion_tokens,
                raw.headers["x-tangquant-replica"])

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(24)))
    assert len({text for text, _, _ in replies}) == 1  # greedy: every replica says the same
    assert all(1 <= n <= 6 for _, n, _ in replies)
    # Both replicas answered: Ray Serve's proxy spreads requests over them.
    assert len({replica for _, _, replica in replies}) == 2, replies
    seen, end = set(), time.monotonic() + 60
    while len(seen) < 2 and time.monotonic() < end:
        status, _, body = raw_request(_Port(port), "GET", "/health")
        assert status == 200 and body["status"] == "ok"
        seen.add(body["replica"])
    assert len(seen) == 2, seen
    # The same keys and errors as the single server.
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=PROMPT, max_tokens=2)
    assert raw_request(_Port(port), "GET", "/metrics")[0] == 401
