"""The loopback Host check (DNS rebinding); connection deadlines are ``runner.GuardedH11``'s."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from tangquant.server.schema import ApiError

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
