"""Every setting of ``tangquant serve``, declared once (flags and recipe keys derive from it).

The scheduler's settings carry OpenVINO Model Server's names (``--cache-size`` in GB,
``--max-num-seqs``, ``--max-num-batched-tokens``, ``--enable-prefix-caching``) and map
one-to-one onto openvino-genai's ``SchedulerConfig``; ``--max-concurrency`` is the old
name of ``--max-num-seqs``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from tangquant.recipe import param, require

API_KEY_ENV = "TANGQUANT_API_KEY"
ENGINES = ("batch", "pipelines")
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


@dataclass(frozen=True)
class ServeConfig:
    host: str = param("127.0.0.1", "address to listen on (others than loopback need --allow-public)")
    port: int = param(8000, "port (0 picks a free one)")
    api_key: str | None = param(None, f"require this bearer key on /v1 routes (prefer the {API_KEY_ENV} "
                                "environment variable: a flag shows in the process list)", metavar="KEY")
    engine: str = param("batch", "batch: one continuous-batching pipeline shared by all requests; "
                        "pipelines: the old design, one LLMPipeline per sequence (for comparison)",
                        choices=ENGINES)
    max_num_seqs: int = param(8, "sequences generated at once (SchedulerConfig.max_num_seqs; with "
                              "--engine pipelines, the number of pipelines)", metavar="N",
                              alias="max_concurrency")
    cache_size: int | None = param(None, "KV cache in GB (SchedulerConfig.cache_size; 0: grow as "
                                   "needed; default: sized from the model's KV bytes per token "
                                   "and the free memory, printed at start)", metavar="GB")
    max_num_batched_tokens: int | None = param(None, "tokens one step may process (prompt chunks "
                                               "included; default openvino-genai's 256)",
                                               metavar="N")
    enable_prefix_caching: bool = param(False, "keep the KV blocks of earlier prompts for reuse")
    adapter: tuple[str, ...] = param((), "serve a peft LoRA adapter on the base as model NAME "
                                     "(repeatable; requests pick it with \"model\": NAME)",
                                     metavar="NAME=DIR", repeat=True)
    ov_config: tuple[str, ...] = param((), "OpenVINO property for the model (repeatable), on top "
                                       "of the IR's own runtime_options", metavar="KEY=VALUE",
                                       repeat=True)
    queue_size: int = param(8, "requests that may wait beyond --max-num-seqs; beyond this 429",
                            metavar="N")
    max_tokens_limit: int = param(1024, "largest max_tokens a request may ask for", metavar="N")
    timeout: float = param(120.0, "per-request limit in seconds, queueing included", metavar="S")
    metrics_public: bool = param(False, "serve /metrics without the API key (for a scraper "
                                 "on a trusted network)")
    allow_public: bool = param(False, "allow listening on a non-loopback address such as 0.0.0.0")
    model_name: str | None = param(None, "the model id clients use (default: the directory's name)")
    device: str = param("CPU", "OpenVINO device")
    ray: bool = param(False, "deploy on Ray Serve (an existing cluster when RAY_ADDRESS is set, "
                      "else a local one); needs the [ray] extra")
    replicas: int = param(1, "Ray Serve replicas, each with its own engine (with --ray)",
                          metavar="N")
    ray_public_head: bool = param(False, "with --ray and no RAY_ADDRESS: let the local Ray instance "
                                  "listen on this node's network address (for other nodes to join) "
                                  "instead of loopback only; it still requires Ray's token")
    draft: str | None = param(None, "a draft model for speculative decoding: an exported IR with the "
                              "model's tokenizer and chat template (checked)", metavar="DIR")
    draft_tokens: int | None = param(None, "tokens the --draft model proposes per step (default 4)",
                                     metavar="K")

    def __post_init__(self):
        for name, low in (("max_num_seqs", 1), ("queue_size", 0), ("max_tokens_limit", 1),
                          ("replicas", 1)):
            value = getattr(self, name)
            require(not isinstance(value, bool) and isinstance(value, int) and value >= low,
                    f"--{name.replace('_', '-')} must be an integer >= {low}, got {value}")
        for name, low in (("cache_size", 0), ("max_num_batched_tokens", 1)):
            value = getattr(self, name)
            require(value is None or (not isinstance(value, bool) and value >= low),
                    f"--{name.replace('_', '-')} must be an integer >= {low}, got {value}")
        require(0 <= self.port <= 65535, f"--port must be between 0 and 65535, got {self.port}")
        require(self.timeout > 0, f"--timeout must be positive, got {self.timeout}")
        require(self.engine in ENGINES, f"--engine must be one of {', '.join(ENGINES)}")
        require(self.replicas == 1 or self.ray, "--replicas needs --ray")
        require(self.ray or not self.ray_public_head, "--ray-public-head needs --ray")
        require(self.draft_tokens is None or (not isinstance(self.draft_tokens, bool)
                                              and self.draft_tokens >= 1),
                f"--draft-tokens must be an integer >= 1, got {self.draft_tokens}")
        require(self.draft_tokens is None or self.draft, "--draft-tokens needs --draft DIR")
        require(not (self.draft and self.engine == "pipelines"), "--draft needs --engine batch")
        # openvino-genai applies an adapter to the whole pipeline; a draft would not see it.
        require(not (self.draft and self.adapter), "--draft cannot be combined with --adapter")
        require(not (self.adapter and self.engine == "pipelines"),
                "--adapter needs --engine batch")
        # Cached KV blocks of one adapter are wrong for another (LoRA changes k and v).
        require(not (self.adapter and self.enable_prefix_caching),
                "--enable-prefix-caching cannot be combined with --adapter")
        for spec in self.adapter:
            name, sep, path = spec.partition("=")
            require(sep and path and MODEL_NAME.match(name),
                    f"--adapter must be NAME=DIR with a NAME of letters, digits and ._:/-, "
                    f"got {spec[:80]!r}")
        names = [s.partition("=")[0] for s in self.adapter]
        require(len(set(names)) == len(names), "--adapter names must be different")
        for spec in self.ov_config:
            key, sep, value = spec.partition("=")
            require(sep and re.match(r"^[A-Z][A-Z0-9_]*$", key) and value,
                    f"--ov-config must be KEY=VALUE with an upper-case KEY, got {spec[:80]!r}")

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def adapters(self) -> dict[str, str]:
        return dict(s.partition("=")[::2] for s in self.adapter)

    def ov_properties(self) -> dict[str, str]:
        return dict(s.partition("=")[::2] for s in self.ov_config)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to a public interface
