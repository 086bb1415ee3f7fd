"""`tangquant serve --ray`: two Ray Serve replicas on 127.0.0.1 answer the official openai client,
and the Ray instance it starts is no open door (issue 32): every port on loopback, token
authentication on, the token in a 0600 file that goes with the run.

The server runs as `tangquant serve --ray` in its own process (Ray reads its loopback switch
once, at import, before tangquant could set it in this one). Ray's start-up and two replicas
take about 35 s on the 2-core development machine, paid once by the module.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from _serve_fixtures import API_KEY, free_port, raw_request, tiny_ir

pytest.importorskip("ray.serve", reason="the [ray] extra is not installed")
psutil = pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [{"role": "user", "content": "写一首关于明月的诗"}]
MODEL_NAME = "tiny-poet"


@dataclass
class RayServer:
    proc: subprocess.Popen
    url: str
    port: int
    startup: str
    home: Path

    def processes(self) -> list:
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory, tiny_model_dir):
    ir = tiny_ir(tmp_path_factory, tiny_model_dir)
    home = tmp_path_factory.mktemp("home")  # where Ray would write ~/.ray/auth_token by default
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # tangquant's defaults
    env.update(PYTHONPATH=str(ROOT), TANGQUANT_API_KEY=API_KEY, HOME=str(home))
    proc = subprocess.Popen([sys.executable, "-m", "tangquant", "serve", "--ray", "--replicas", "2",
                             "--model", str(ir), "--port", str(port), "--max-num-seqs", "4",
                             "--max-tokens-limit", "64", "--timeout", "60"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    startup = proc.stdout.readline()  # printed once the replicas are ready
    try:
        assert startup, proc.communicate(timeout=60)[1][-3000:]
        yield RayServer(proc, f"http://127.0.0.1:{port}", port, startup, home)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class _Port:
    def __init__(self, port):
        self.port = port


def test_the_ray_instance_listens_on_loopback_and_requires_a_token(ray_server):
    from tangquant.server.ray_env import is_loopback, requires_token

    assert "Ray Serve on a local Ray instance on 127.0.0.1, token authentication on" in ray_server.startup
    assert "API key required" in ray_server.startup
    listening, gcs = [], None
    for p in ray_server.processes():
        try:
            sockets = [c for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
            name = p.name()
        except psutil.NoSuchProcess:  # a short-lived helper that is gone already
            continue
        for c in sockets:
            listening.append((name, c.laddr.ip, c.laddr.port))
            gcs = f"127.0.0.1:{c.laddr.port}" if name == "gcs_server" else gcs
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names and any("ServeReplica" in n for n in names), listening
    assert ray_server.port in {port for _, _, port in listening}  # Serve's HTTP proxy is among them
    assert [s for s in listening if not is_loopback(s[1])] == [], listening
    # Token authentication on: the GCS refuses a call that carries no token.
    assert gcs is not None and requires_token(gcs)
    # The token: a file of this run, 0600 in a 0700 directory, where Ray looks (RAY_AUTH_TOKEN_PATH).
    (gcs_proc,) = [p for p in ray_server.processes() if p.name() == "gcs_server"]
    token = Path(gcs_proc.environ()["RAY_AUTH_TOKEN_PATH"])
    assert gcs_proc.environ()["RAY_AUTH_MODE"] == "token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    assert len(token.read_text()) == 64 and not (ray_server.home / ".ray" / "auth_token").exists()
    # And a request still gets its answer.
    import openai

    client = openai.OpenAI(base_url=ray_server.url + "/v1", api_key=API_KEY, max_retries=2, timeout=60)
    reply = client.chat.completions.create(model=MODEL_NAME, messages=PROMPT, max_tokens=4, temperature=0)
    assert reply.choices[0].message.content is not None and 1 <= reply.usage.completion_tokens <= 4


def test_two_replicas_answer_concurrent_openai_requests(ray_server):
    import openai

    url, port = ray_server.url, ray_server.port
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


def test_sigterm_shuts_the_instance_down_and_leaves_nothing(ray_server):
    processes = ray_server.processes()
    (gcs_proc,) = [p for p in processes if p.name() == "gcs_server"]
    token = Path(gcs_proc.environ()["RAY_AUTH_TOKEN_PATH"])
    ray_server.proc.send_signal(signal.SIGTERM)
    assert ray_server.proc.wait(timeout=120) == 0  # a graceful shutdown, as the single server's
    assert "server stopped" in ray_server.proc.stderr.read()
    gone, alive = psutil.wait_procs(processes[1:], timeout=30)
    assert alive == [], alive  # no Ray process outlives the run
    assert not token.parent.exists()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["token", "disabled"])
def test_the_startup_line_says_whether_an_existing_cluster_checks_tokens(mode, tmp_path_factory, tiny_model_dir):
    """With RAY_ADDRESS the deployment goes to that cluster, and the startup line says whether it
    requires a token (asked of its GCS with a call that carries none). The cluster here is a
    `ray start --head` on loopback; about 60 s each."""
    ir = tiny_ir(tmp_path_factory, tiny_model_dir)
    token = tmp_path_factory.mktemp("token") / "token"
    token.write_text("0123456789abcdef" * 4)
    token.chmod(0o600)
    gcs_port, port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE=mode, RAY_AUTH_TOKEN_PATH=str(token),
               RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT), TANGQUANT_API_KEY=API_KEY)
    # Its own --temp-dir: `ray start` records its address there, not in the machine's /tmp/ray.
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                             "--port", str(gcs_port), "--num-cpus", "2", "--include-dashboard=false",
                             "--temp-dir", str(token.parent / "ray")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        server = subprocess.Popen([sys.executable, "-m", "tangquant", "serve", "--ray", "--model", str(ir),
                                   "--port", str(port)], cwd=ROOT, env={**env, "RAY_ADDRESS": f"127.0.0.1:{gcs_port}"},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        startup = server.stdout.readline()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 0, server.stderr.read()[-2000:]
        expected = ("which requires token authentication" if mode == "token" else
                    "which does NOT require authentication")
        assert f"on the Ray cluster at 127.0.0.1:{gcs_port}, {expected}" in startup, startup
    finally:
        tree = [psutil.Process(head.pid), *psutil.Process(head.pid).children(recursive=True)]
        head.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=60)
        for p in alive:
            p.kill()
