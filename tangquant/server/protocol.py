"""Connection-level guards: uvicorn's h11 protocol with a deadline for a request's head, and
the loopback Host check.

uvicorn times out idle keep-alive connections only after a first response; a
connection that sends nothing, or half a request line, waits forever. Such
connections cost a socket each and nothing else here (admission counts requests
in the engine, not sockets), but they must not pile up: this subclass closes a
connection whose request head has not arrived ``HEAD_TIMEOUT_S`` after it
opened or after its previous response. The body has its own deadline
(``schema.BODY_TIMEOUT_S``).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from tangquant.server.schema import ApiError

HEAD_TIMEOUT_S = 10.0


class GuardedH11Protocol(H11Protocol):
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        waiting_after = self.cycle  # the head of the next request must replace this cycle
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_timeout, waiting_after)

    def _head_timeout(self, waiting_after) -> None:
        if self.cycle is waiting_after and not self.transport.is_closing():
            self.transport.close()

    def _cancel_head_timer(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        super().data_received(data)
        if self.cycle is not before:
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._cancel_head_timer()
            self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)


class HostGuard:
    """Answer 400 unless the Host header names this machine's loopback (DNS rebinding).

    A web page elsewhere can make a browser send requests to 127.0.0.1 through a
    name it controls; such requests carry that name, never a loopback one.
    """

    def __init__(self, app, hosts: frozenset[str]):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
            name = host if host.endswith("]") else host.rsplit(":", 1)[0]
            if name not in self.hosts:

                error = ApiError(400, "this server answers only to a loopback Host header "
                                 "(listen with --allow-public to serve other names)",
                                 code="invalid_host")
                await JSONResponse(error.body(), status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
