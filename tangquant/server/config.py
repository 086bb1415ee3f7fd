"""Every setting of ``tangquant serve``, declared once (flags and recipe keys derive from it)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from tangquant.recipe import param, require

API_KEY_ENV = "TANGQUANT_API_KEY"


@dataclass(frozen=True)
class ServeConfig:
    host: str = param("127.0.0.1", "address to listen on (others than loopback need --allow-public)")
    port: int = param(8000, "port (0 picks a free one)")
    api_key: str | None = param(None, f"require this bearer key on /v1 routes (prefer the {API_KEY_ENV} "
                                "environment variable: a flag shows in the process list)", metavar="KEY")
    max_concurrency: int = param(1, "generations run at once, one pipeline each", metavar="N")
    queue_size: int = param(8, "requests that may wait for a worker; beyond this 429", metavar="N")
    max_tokens_limit: int = param(1024, "largest max_tokens a request may ask for", metavar="N")
    timeout: float = param(120.0, "per-request limit in seconds, queueing included", metavar="S")
    allow_public: bool = param(False, "allow listening on a non-loopback address such as 0.0.0.0")
    model_name: str | None = param(None, "the model id clients use (default: the directory's name)")
    device: str = param("CPU", "OpenVINO device")

    def __post_init__(self):
        for name, low in (("max_concurrency", 1), ("queue_size", 0), ("max_tokens_limit", 1)):
            value = getattr(self, name)
            require(not isinstance(value, bool) and isinstance(value, int) and value >= low,
                    f"--{name.replace('_', '-')} must be an integer >= {low}, got {value}")
        require(0 <= self.port <= 65535, f"--port must be between 0 and 65535, got {self.port}")
        require(self.timeout > 0, f"--timeout must be positive, got {self.timeout}")

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to a public interface
