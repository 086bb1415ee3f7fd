"""Binding the socket and running uvicorn: a server that is ready before it is started.

The socket is bound before the model loads (connections wait in the backlog),
so a taken port is refused at once; ``Server.run`` blocks, ``start``/``stop``
run it in a thread for tests and benchmarks.

Slow or idle clients cannot lock others out: there is no limit on open sockets
(uvicorn's ``limit_concurrency`` counts idle ones too and answers everyone 503),
only on requests, in the engine's queue (429); a connection whose request line and
headers do not arrive within ``HEAD_TIMEOUT_S``, or whose body stalls for
``BODY_TIMEOUT_S``, is closed (uvicorn has a keep-alive timeout, but nothing times
out a connection that never finishes its first request).
"""

from __future__ import annotations

import logging
import resource
import socket
import threading
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from tangquant import host
from tangquant.errors import ServeError
from tangquant.server import adapters as lora
from tangquant.server import sizing
from tangquant.server.api import create_app
from tangquant.server.config import API_KEY_ENV, ServeConfig

logger = logging.getLogger(__name__)

HEAD_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request to arrive (head, then body)."""

    head_timeout = HEAD_TIMEOUT_S
    body_timeout = BODY_TIMEOUT_S
    _timer = None
    _armed_cycle = None

    def _arm(self, seconds: float, callback) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_cycle = self.cycle
        self._timer = self.loop.call_later(seconds, callback)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm(self.head_timeout, self._head_due)

    def on_response_complete(self) -> None:
        self._arm(self.head_timeout, self._head_due)  # before a pipelined request starts a cycle
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        super().connection_lost(exc)

    def _head_due(self) -> None:
        if self.transport.is_closing():
            return
        if self.cycle is self._armed_cycle:  # no request line and headers since the timer started
            self.transport.close()
        elif self.conn.their_state is h11.SEND_BODY:
            self._arm(self.body_timeout, self._body_due)

    def _body_due(self) -> None:
        if not self.transport.is_closing() and self.conn.their_state is h11.SEND_BODY \
                and self.cycle is self._armed_cycle:
            self.transport.close()


def bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # connections wait in the backlog while the model loads
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def check_exposure(cfg: ServeConfig) -> None:
    if cfg.loopback:
        return
    if not cfg.allow_public:
        raise ServeError(f"refusing to listen on {cfg.host}, which other machines may reach; "
                         "pass --allow-public to do so (and set an API key)")
    if not cfg.api_key:
        logger.warning("warning: listening on %s with no API key: anyone who can reach this "
                       "port can use the model (set %s)", cfg.host, API_KEY_ENV)


class Server:
    """A bound, ready server: ``run()`` blocks; ``start()``/``stop()`` run it in a thread."""

    def __init__(self, engine, app, sock: socket.socket, model_name: str, config: ServeConfig,
                 head_timeout: float = HEAD_TIMEOUT_S, body_timeout: float = BODY_TIMEOUT_S):
        self.engine, self.model_name, self._sock, self.config = engine, model_name, sock, config
        host, port = sock.getsockname()[:2]
        self.port = port
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        protocol = type("GuardedH11", (GuardedH11,), {"head_timeout": head_timeout,
                                                      "body_timeout": body_timeout})
        _raise_open_files_limit()
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                server_header=False, timeout_keep_alive=5,
                                timeout_graceful_shutdown=5, http=protocol, loop="asyncio")
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        finally:
            self._sock.close()
            self.engine.close()

    def start(self, wait_s: float = 30.0) -> "Server":
        self._thread = threading.Thread(target=self.run, name="tangquant-serve", daemon=True)
        self._thread.start()
        end = time.monotonic() + wait_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                raise ServeError("the server did not start")
            time.sleep(0.02)
        return self

    def close(self) -> None:
        """Release the socket and the model of a server that was never run."""
        self._sock.close()
        self.engine.close()

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)


def open_engine(model_dir, cfg: ServeConfig, name: str):
    """The engine ``cfg.engine`` names, with the IR's runtime options and ``--ov-config``."""
    props, skipped = sizing.plugin_properties(model_dir, cfg.device, cfg.ov_properties())
    for key, why in skipped.items():  # e.g. optimum's ACTIVATIONS_SCALE_FACTOR, a GPU hint
        logger.debug("runtime option %s left out: %s", key, why)
    # Checked here, where OpenVINO runs, not in plugin_properties (an OVMS repo may run elsewhere).
    crash = sizing.single_thread_crash(props, cfg.device, host.cpu_flags())
    if crash:
        logger.warning("INFERENCE_NUM_THREADS=1 left out: %s", crash)
        del props["INFERENCE_NUM_THREADS"]
    if cfg.engine == "pipelines":
        from tangquant.server.pool import PoolEngine

        return PoolEngine(model_dir, name, cfg, props)
    from tangquant.server.batch import BatchEngine

    loaded = lora.load(cfg.adapters(), model_dir, taken=(name,))
    return BatchEngine(model_dir, name, cfg, props, loaded)


def build(model_dir, cfg: ServeConfig, open_engine=open_engine, **timeouts) -> Server:
    """Bind the socket, load the model; return a :class:`Server` (the socket is closed on failure).

    ``open_engine`` is the engine row's factory (``engines.ENGINES[...].serve``); ``timeouts``:
    ``head_timeout``/``body_timeout`` seconds for a connection's request to arrive."""
    name = cfg.model_name or model_dir.name
    sock = bind(cfg.host, cfg.port)
    try:
        engine = open_engine(model_dir, cfg, name)
    except RuntimeError as exc:  # openvino's load errors
        sock.close()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ServeError(f"cannot load {model_dir} with openvino-genai: {first}") from exc
    except BaseException:
        sock.close()
        raise
    app = create_app(engine, cfg.api_key, loopback_only=cfg.loopback,
                     metrics_public=cfg.metrics_public)
    return Server(engine, app, sock, name, cfg, **timeouts)


def _raise_open_files_limit() -> None:
    """Idle sockets are reaped by the timeouts, not refused: give them the hard limit's room."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            logger.debug("cannot raise the open-files limit from %d", soft)
