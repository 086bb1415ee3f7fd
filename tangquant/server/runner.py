"""Binding the socket and running uvicorn: a server that is ready before it is started.

The socket is bound before the model loads (connections wait in the backlog),
so a taken port is refused at once; ``Server.run`` blocks, ``start``/``stop``
run it in a thread for tests and benchmarks.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

from tangquant.errors import ServeError
from tangquant.server import adapters as lora
from tangquant.server import sizing
from tangquant.server.api import create_app
from tangquant.server.config import API_KEY_ENV, ServeConfig
from tangquant.server.protocol import GuardedH11Protocol

logger = logging.getLogger(__name__)
MAX_CONNECTIONS = 1000


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

    def __init__(self, engine, app, sock: socket.socket, model_name: str, config: ServeConfig):
        self.engine, self.model_name, self._sock, self.config = engine, model_name, sock, config
        host, port = sock.getsockname()[:2]
        self.port = port
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        # Admission is the engine's (requests, not sockets); the socket cap only bounds file
        # descriptors, and the protocol closes connections that never send a request head.
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                server_header=False, timeout_keep_alive=5,
                                timeout_graceful_shutdown=5, http=GuardedH11Protocol,
                                loop="asyncio", limit_concurrency=MAX_CONNECTIONS)
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
    if cfg.engine == "pipelines":
        from tangquant.server.pool import PoolEngine

        return PoolEngine(model_dir, name, cfg, props)
    from tangquant.server.batch import BatchEngine

    loaded = lora.load(cfg.adapters(), model_dir, taken=(name,))
    return BatchEngine(model_dir, name, cfg, props, loaded)


def build(model_dir, cfg: ServeConfig) -> Server:
    """Bind the socket, load the model; return a :class:`Server` (the socket is closed on failure)."""
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
    return Server(engine, app, sock, name, cfg)
