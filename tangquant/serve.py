"""Serve an exported OpenVINO model: an OpenAI-compatible API and a web chat page.

Routes: POST /v1/chat/completions and /v1/completions (streaming SSE ending in
`data: [DONE]`, or one JSON reply with `usage`), GET /v1/models, GET /health,
and the chat page at /. Generation runs on openvino-genai's LLMPipeline, one
pipeline per worker (--max-concurrency); up to --queue-size more requests
wait, and beyond that the server answers 429 with Retry-After. A generation
stops when its client disconnects or its --timeout passes.

The server listens on 127.0.0.1 unless --allow-public is given. Give an API
key through the TANGQUANT_API_KEY environment variable (or --api-key, which
other users can see in `ps`); every /v1 route then needs
`Authorization: Bearer KEY`.

Example:
  TANGQUANT_API_KEY=secret tangquant serve --model out/ov --port 8000
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time
from pathlib import Path

from tangquant.errors import ServeError

logger = logging.getLogger(__name__)

HELP = "serve an exported model: OpenAI-compatible API and a web chat page"
API_KEY_ENV = "TANGQUANT_API_KEY"


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="an exported OpenVINO model directory (tangquant export)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; others need --allow-public)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks one)")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help=f"require this bearer key on /v1 routes (prefer the {API_KEY_ENV} "
                        "environment variable: a flag shows in the process list)")
    parser.add_argument("--max-concurrency", type=int, default=1, metavar="N",
                        help="generations run at once, one pipeline each (default 1)")
    parser.add_argument("--queue-size", type=int, default=8, metavar="N",
                        help="requests that may wait for a worker; beyond this 429 (default 8)")
    parser.add_argument("--max-tokens-limit", type=int, default=1024, metavar="N",
                        help="largest max_tokens a request may ask for (default 1024)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S",
                        help="per-request limit in seconds, queueing included (default 120)")
    parser.add_argument("--allow-public", action="store_true",
                        help="allow listening on a non-loopback address such as 0.0.0.0")
    parser.add_argument("--model-name", default=None,
                        help="the model id clients use (default: the directory's name)")
    parser.add_argument("--device", default="CPU", help="OpenVINO device (default CPU)")


def run(args) -> int:
    api_key = args.api_key
    if api_key:
        logger.warning("warning: --api-key is visible in the process list; "
                       "prefer the %s environment variable", API_KEY_ENV)
    else:
        api_key = os.environ.get(API_KEY_ENV) or None
    serve(args.model, host=args.host, port=args.port, api_key=api_key,
          max_concurrency=args.max_concurrency, queue_size=args.queue_size,
          max_tokens_limit=args.max_tokens_limit, timeout=args.timeout,
          allow_public=args.allow_public, model_name=args.model_name, device=args.device)
    return 0


def serve(model, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_concurrency: int = 1, queue_size: int = 8, max_tokens_limit: int = 1024,
          timeout: float = 120.0, allow_public: bool = False, model_name: str | None = None,
          device: str = "CPU") -> None:
    """Serve ``model`` until interrupted (Ctrl-C or SIGTERM)."""
    server = prepare(model, host=host, port=port, api_key=api_key,
                     max_concurrency=max_concurrency, queue_size=queue_size,
                     max_tokens_limit=max_tokens_limit, timeout=timeout,
                     allow_public=allow_public, model_name=model_name, device=device)
    print(f"serving {server.model_name} at {server.url} ({max_concurrency} worker(s), queue "
          f"{queue_size}, API key {'required' if api_key else 'not required'})", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # uvicorn has already shut down gracefully, then re-raised Ctrl-C / SIGTERM
    logger.info("server stopped")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to a public interface


def _check_settings(host, port, api_key, max_concurrency, queue_size, max_tokens_limit, timeout,
                    allow_public) -> None:
    for name, value, low in (("max_concurrency", max_concurrency, 1), ("queue_size", queue_size, 0),
                             ("max_tokens_limit", max_tokens_limit, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ServeError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value}")
    if not 0 <= port <= 65535:
        raise ServeError(f"--port must be between 0 and 65535, got {port}")
    if not timeout > 0:
        raise ServeError(f"--timeout must be positive, got {timeout}")
    if not _is_loopback(host):
        if not allow_public:
            raise ServeError(f"refusing to listen on {host}, which other machines may reach; "
                             "pass --allow-public to do so (and set an API key)")
        if not api_key:
            logger.warning("warning: listening on %s with no API key: anyone who can reach this "
                           "port can use the model (set %s)", host, API_KEY_ENV)


def _bind(host: str, port: int) -> socket.socket:
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


class Server:
    """A bound, ready server: ``run()`` blocks; ``start()``/``stop()`` run it in a thread."""

    def __init__(self, engine, app, sock: socket.socket, model_name: str, limit: int):
        import uvicorn

        self.engine, self.model_name, self._sock = engine, model_name, sock
        host, port = sock.getsockname()[:2]
        self.port = port
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                server_header=False, timeout_keep_alive=5,
                                timeout_graceful_shutdown=5, limit_concurrency=limit)
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


def prepare(model, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
            max_concurrency: int = 1, queue_size: int = 8, max_tokens_limit: int = 1024,
            timeout: float = 120.0, allow_public: bool = False, model_name: str | None = None,
            device: str = "CPU") -> Server:
    """Check the settings, load the model, bind the socket; return a :class:`Server`."""
    from tangquant.server.api import create_app
    from tangquant.server.engine import Engine, check_model_dir

    _check_settings(host, port, api_key, max_concurrency, queue_size, max_tokens_limit, timeout,
                    allow_public)
    model_dir = check_model_dir(model)
    name = model_name or Path(model_dir).name
    sock = _bind(host, port)
    try:
        engine = Engine(model_dir, name, max_concurrency, queue_size, max_tokens_limit, timeout,
                        device)
    except RuntimeError as exc:  # openvino's load errors
        sock.close()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ServeError(f"cannot load {model_dir} with openvino-genai: {first}") from exc
    except BaseException:
        sock.close()
        raise
    # Connections beyond the queue (plus room for /health and the page) get uvicorn's 503.
    limit = 2 * (max_concurrency + queue_size) + 16
    app = create_app(engine, api_key, loopback_only=_is_loopback(host))
    return Server(engine, app, sock, name, limit)
