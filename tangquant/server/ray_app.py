"""`tangquant serve --ray`: the same FastAPI app as a Ray Serve deployment of N replicas.

Each replica is a Ray actor with its own engine (one continuous-batching
pipeline and its KV cache) and the app ``api.create_app`` builds for it, so the
routes, the API key, the errors and ``/metrics`` are the single server's;
``/health`` names the replica that answered. Ray Serve's proxy spreads requests
over the replicas and listens where the single server would (``--host``,
127.0.0.1 by default). With ``RAY_ADDRESS`` set the deployment goes to that
cluster (every node must see the IR at the same path) and the startup line says
whether the cluster checks tokens; otherwise a local Ray instance is started on
loopback with token authentication (:mod:`tangquant.server.ray_env`, which must
prepare the environment before this module imports Ray), without its dashboard
or usage reporting, and with Ray's logs kept out of the terminal unless ``-v``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from pathlib import Path

import ray
from ray import serve

from tangquant import recipe
from tangquant.errors import ServeError
from tangquant.server.api import create_app
from tangquant.server import ray_env
from tangquant.server.config import ServeConfig

logger = logging.getLogger(__name__)
APP = "tangquant"


@serve.deployment(name="tangquant", max_ongoing_requests=256)
@serve.ingress()
class Replica:
    """One engine and its app; Ray Serve builds the ASGI app after ``__init__``."""

    def __init__(self, model_dir: str, settings: dict):
        from tangquant.server import runner

        _replica_grpc_on_loopback()
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


def _replica_grpc_on_loopback() -> None:
    """On a loopback instance, this replica's inter-deployment gRPC server listens on loopback.

    Ray Serve 2.60 binds that server to "[::]:0" whatever the node's address (``ReplicaActor.
    _on_initialized``, after this class's ``__init__``): the one port of a loopback instance
    that would listen on every interface. No option moves it, so the helper it binds through is
    wrapped, in the replica's process only (the one monkeypatch here: there is no other way).
    """
    from ray.serve._private import replica

    bind = getattr(replica, "add_port_to_grpc_server", None)
    if os.environ.get(ray_env.LOOPBACK_SWITCH) != "0" or bind is None or getattr(bind, "loopback", False):
        return

    def on_loopback(server, address: str):
        return bind(server, address.replace("[::]", "127.0.0.1", 1))

    on_loopback.loopback = True
    replica.add_port_to_grpc_server = on_loopback


def _connect(instance: ray_env.Instance, verbose: bool) -> str:
    """Start or join the Ray instance; returns what the startup line says of its security."""
    ours = signal.getsignal(signal.SIGTERM)
    # "local": a new instance, never one a `ray start` left in /tmp/ray/ray_current_cluster (on a
    # shared machine, anyone's), which ray.init() without an address would join.
    ray.init(address=instance.address or "local",
             include_dashboard=False if not instance.address else None,
             logging_level=logging.INFO if verbose else logging.WARNING,
             log_to_driver=verbose, configure_logging=True)
    # ray.init takes SIGTERM (sys.exit(15) in Python, then its C++ crash handler: a stack trace and
    # abort, no shutdown, the instance's agents orphaned): the run's own handler gets it back, so
    # SIGTERM shuts the deployment down as Ctrl-C does.
    if callable(ours):
        signal.signal(signal.SIGTERM, ours)
    nodes = [n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")]
    if instance.address is None and instance.loopback and not all(map(ray_env.is_loopback, nodes)):
        ray.shutdown()
        raise ServeError(f"the local Ray instance started on {', '.join(nodes)}, not on loopback")
    token = ray_env.requires_token(ray.get_runtime_context().gcs_address)
    if instance.address is not None:
        return (f"the Ray cluster at {instance.address}, which "
                + ("requires token authentication" if token else "does NOT require authentication: "
                   "anyone who reaches its ports can run code there"))
    where = "127.0.0.1" if instance.loopback else ", ".join(nodes)
    return (f"a local Ray instance on {where}, "
            + ("token authentication on" if token else "token authentication OFF (RAY_AUTH_MODE)"))


def deploy(model_dir: Path, cfg: ServeConfig, instance: ray_env.Instance,
           verbose: bool = False) -> tuple[str, str]:
    """Deploy ``cfg.replicas`` replicas of the app on Ray Serve; return its URL and what the
    startup line says of the Ray instance."""
    if not cfg.port:
        raise ServeError("--ray needs a fixed --port (Ray Serve's proxy binds it on every node)")
    security = _connect(instance, verbose)
    serve.start(http_options={"host": cfg.host, "port": cfg.port},
                logging_config={"log_level": "INFO" if verbose else "WARNING",
                                "enable_access_log": verbose})
    settings = {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(cfg).items()}
    settings.update(ray=False, replicas=1, ray_public_head=False)
    app = Replica.options(num_replicas=cfg.replicas).bind(str(model_dir), settings)
    serve.run(app, name=APP, route_prefix="/")
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    return f"http://{host}:{cfg.port}", security


def shutdown() -> None:
    serve.delete(APP)
    if not os.environ.get("RAY_ADDRESS"):
        serve.shutdown()
    ray.shutdown()


def serve_forever(model_dir: Path, cfg: ServeConfig, instance: ray_env.Instance) -> None:
    """Deploy, print where, and keep the deployment until Ctrl-C or SIGTERM (whenever it comes:
    before the deployment is up, the Ray instance is shut down and the interrupt reported)."""
    verbose = logging.getLogger().level <= logging.DEBUG
    deployed = False
    try:
        url, security = deploy(model_dir, cfg, instance, verbose)
        deployed = True
        print(f"serving {cfg.model_name or model_dir.name} at {url} (Ray Serve on {security}, "
              f"{cfg.replicas} replica(s), API key {'required' if cfg.api_key else 'not required'})",
              flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        if not deployed:
            raise
    finally:
        if deployed:
            shutdown()
            logger.info("server stopped")
        else:
            ray.shutdown()  # a local instance's processes end with it
