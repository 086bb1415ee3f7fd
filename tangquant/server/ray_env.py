"""The environment of the Ray instance `tangquant serve --ray` starts: loopback ports and a token.

A Ray instance that accepts unauthenticated connections runs any task it is sent, and Ray's
defaults bind its GCS, raylet, object manager, agents and workers to every interface (issue 32).
An instance tangquant starts (no ``RAY_ADDRESS``) therefore:

- listens on loopback only. ``ray.init(_node_ip_address="127.0.0.1")`` is not enough: Ray turns
  a loopback address back into the node's network address; its single-node switch,
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, keeps the node's address 127.0.0.1, and every Ray
  server binds the node's address. Ray reads the switch once, when it is imported, so this runs
  before ``ray`` is imported (a process that imported it already is refused).
  ``--ray-public-head`` lets the instance listen on the node's address for other nodes to join,
  with a warning line;
- requires Ray's token authentication (``RAY_AUTH_MODE=token``): a fresh token of this run in a
  0600 file of a 0700 directory (``RAY_AUTH_TOKEN_PATH``, where Ray looks for it), removed when
  the run ends (``tangquant clean``, or the next run, removes what a killed one left). A
  ``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH`` the user set is kept;
  ``RAY_AUTH_MODE=disabled`` with a warning line.

With ``RAY_ADDRESS`` nothing is changed, and :func:`requires_token` tells whether that cluster
checks tokens, for the startup line. Standard library only (grpc is imported by the probe).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import tangquant
from tangquant import claim
from tangquant.errors import ServeError, short

logger = logging.getLogger(__name__)

LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_MODES = ("token", "disabled")
TOKEN_ENV = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@dataclass(frozen=True)
class Instance:
    """What the startup line says of the Ray instance: where it is and who may use it."""

    address: str | None      # RAY_ADDRESS, or None for an instance this run starts
    loopback: bool           # its ports listen on loopback only
    auth: str                # how it authenticates ("token", "token (yours)", "disabled")


@contextlib.contextmanager
def prepared(public_head: bool = False) -> Iterator[Instance]:
    """The environment of this run's Ray instance, set for the block and restored after it."""
    address = os.environ.get("RAY_ADDRESS")
    if address:
        if public_head:
            raise ServeError("--ray-public-head starts a Ray instance; with RAY_ADDRESS the "
                             "deployment goes to that existing cluster instead")
        yield Instance(address, False, "")
        return
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() not in AUTH_MODES:
        raise ServeError(f"RAY_AUTH_MODE={short(mode)}: Ray takes {' or '.join(AUTH_MODES)}")
    if "ray" in sys.modules:
        raise ServeError("Ray was imported before tangquant could keep its instance on loopback "
                         f"({LOOPBACK_SWITCH} is read at import); run `tangquant serve --ray` in "
                         "a process of its own")
    root = str(Path(tangquant.__file__).resolve().parents[1])
    env = {"RAY_USAGE_STATS_ENABLED": os.environ.get("RAY_USAGE_STATS_ENABLED", "0"),
           # the instance's workers inherit this environment: they import this tangquant
           "PYTHONPATH": os.pathsep.join([root, *filter(None, os.environ.get("PYTHONPATH", "").split(
               os.pathsep))])}
    if not public_head:
        env[LOOPBACK_SWITCH] = "0"
    else:
        logger.warning("warning: --ray-public-head: the Ray instance listens on this node's network "
                       "address for other nodes to join; keep it on a private network")
    with contextlib.ExitStack() as stack:
        if mode is None:
            env["RAY_AUTH_MODE"] = "token"
        elif mode.lower() == "disabled":
            logger.warning("warning: RAY_AUTH_MODE=disabled: the Ray instance takes tasks without a "
                           "token; anyone who reaches its ports can run code as this user")
        user_token = any(os.environ.get(k) for k in TOKEN_ENV)
        if env.get("RAY_AUTH_MODE", mode) == "token" and not user_token:
            env["RAY_AUTH_TOKEN_PATH"] = str(_token_file(stack.enter_context(
                claim.scratch_dir("tangquant-ray"))))
        stack.enter_context(_environment(env))
        auth = "disabled" if (mode or "").lower() == "disabled" else (
            "token (yours)" if user_token else "token")
        yield Instance(None, not public_head, auth)


def _token_file(directory: Path) -> Path:
    """A fresh random token, readable by this user only (the directory is 0700 already)."""
    path = directory / "auth_token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(secrets.token_hex(32))
    return path


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def is_loopback(address: str) -> bool:
    """127.0.0.1, ::1, and IPv4 loopback mapped into IPv6 (how an IPv6 socket shows it)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def requires_token(gcs_address: str, timeout: float = 10.0) -> bool:
    """Whether the cluster's GCS refuses a call that carries no token (asked with one call)."""
    import grpc

    with grpc.insecure_channel(gcs_address) as channel:
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")
        try:
            call(b"", timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                return True
            raise ServeError(f"cannot ask the Ray cluster at {gcs_address} whether it checks tokens: "
                             f"{exc.code().name}") from None
    return False
