"""`tangquant serve --ray`: the same FastAPI app as a Ray Serve deployment of N replicas.

Each replica is a Ray actor with its own engine (one continuous-batching
pipeline and its KV cache) and the app ``api.create_app`` builds for it, so the
routes, the API key, the errors and ``/metrics`` are the single server's;
``/health`` names the replica that answered. Ray Serve's proxy spreads requests
over the replicas. With ``RAY_ADDRESS`` set the deployment goes to that
cluster (every node must see the IR at the same path); otherwise a local Ray
instance is started, without its dashboard, usage reporting or token
authentication (``RAY_AUTH_MODE=disabled`` unless set: a local instance need
not write ``~/.ray/auth_token``), and with Ray's logs kept out of the terminal
unless ``-v``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import ray
from ray import serve

import tangquant
from tangquant import recipe
from tangquant.errors import ServeError
from tangquant.server.api import create_app
from tangquant.server.config import ServeConfig

logger = logging.getLogger(__name__)
APP = "tangquant"


@serve.deployment(name="tangquant", max_ongoing_requests=256)
@serve.ingress()
class Replica:
    """One engine and its app; Ray Serve builds the ASGI app after ``__init__``."""

    def __init__(self, model_dir: str, settings: dict):
        from tangquant.server import runner

        self.cfg = recipe.from_dict(ServeConfig, settings)
        self.name = self.cfg.model_name or Path(model_dir).name
        self.engine = runner.open_engine(Path(model_dir), self.cfg, self.name)
        context = serve.get_replica_context()
        self.replica = f"{context.replica_tag}@{os.uname().nodename}:{os.getpid()}"

    def __serve_build_asgi_app__(self):
        return create_app(self.engine, self.cfg.api_key, loopback_only=self.cfg.loopback,
                          metrics_public=self.cfg.metrics_public, replica=self.replica)

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def _connect(verbose: bool) -> None:
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # The local instance's workers inherit this environment: they import this tangquant.
        root = str(Path(tangquant.__file__).resolve().parents[1])
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    ray.init(address=address or None, include_dashboard=False if not address else None,
             logging_level=logging.INFO if verbose else logging.WARNING,
             log_to_driver=verbose, configure_logging=True)


def deploy(model_dir: Path, cfg: ServeConfig, verbose: bool = False) -> str:
    """Deploy ``cfg.replicas`` replicas of the app on Ray Serve; return its URL."""
    if not cfg.port:
        raise ServeError("--ray needs a fixed --port (Ray Serve's proxy binds it on every node)")
    _connect(verbose)
    serve.start(http_options={"host": cfg.host, "port": cfg.port},
                logging_config={"log_level": "INFO" if verbose else "WARNING",
                                "enable_access_log": verbose})
    settings = {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(cfg).items()}
    settings.update(ray=False, replicas=1)
    app = Replica.options(num_replicas=cfg.replicas).bind(str(model_dir), settings)
    serve.run(app, name=APP, route_prefix="/")
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    return f"http://{host}:{cfg.port}"


def shutdown() -> None:
    serve.delete(APP)
    if not os.environ.get("RAY_ADDRESS"):
        serve.shutdown()
    ray.shutdown()


def serve_forever(model_dir: Path, cfg: ServeConfig) -> None:
    """Deploy, print where, and keep the deployment until Ctrl-C or SIGTERM."""
    verbose = logging.getLogger().level <= logging.DEBUG
    url = deploy(model_dir, cfg, verbose)
    name = cfg.model_name or model_dir.name
    where = os.environ.get("RAY_ADDRESS") or "a local Ray instance"
    print(f"serving {name} at {url} (Ray Serve on {where}, {cfg.replicas} replica(s), "
          f"API key {'required' if cfg.api_key else 'not required'})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        shutdown()
        logger.info("server stopped")
