"""``/metrics`` in Prometheus' text format, from one registry per server (no global state).

Counted as requests happen: HTTP requests by route and status, prompt and
generated tokens, and TTFT / time-per-output-token / queue-wait histograms (per
model name, base or adapter). Read from the engine at each scrape: queue depth,
running sequences, KV cache use, and the refused, cancelled, timed-out and
failed counts. Metric names follow vLLM's and llama.cpp's where one exists,
under the ``tangquant_`` prefix; :mod:`.metric_aliases` adds the same figures under vLLM's
and llama-server's own names.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tangquant.server.metric_aliases import PeerMetrics

# Routes are labelled by their template; anything else is "other" (no label per bad URL).
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/",
          "/tokenize", "/detokenize")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
CONTENT_TYPE = CONTENT_TYPE_LATEST


def route_of(path: str) -> str:
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    if path.startswith("/web/"):
        return "/web/{file}"
    return path if path in ROUTES else "other"


class _EngineCollector:
    """Gauges and counters read from the engine when Prometheus scrapes."""
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        status, cache = self.engine.status(), self.engine.cache_usage()
        yield GaugeMetricFamily("tangquant_queue_depth", "requests admitted and waiting to start",
                                value=status["queued"])
        yield GaugeMetricFamily("tangquant_running_sequences", "requests generating now",
                                value=status["running"])
        yield GaugeMetricFamily("tangquant_kv_cache_usage_ratio",
                                "fraction of the KV cache in use (0 when unknown)",
                                value=cache.get("fraction", 0.0))
        yield GaugeMetricFamily("tangquant_kv_cache_bytes", "bytes of KV cache allocated",
                                value=cache.get("bytes", 0))
        for key, name, text in (("refused_busy", "refused", "requests refused with 429"),
                                ("cancelled", "cancelled", "generations cancelled by a "
                                 "client that went away"),
                                ("timed_out", "timed_out", "generations stopped by --timeout"),
                                ("failed", "failed", "generations the engine could not finish"),
                                ("completed", "completed", "generations completed")):
            yield CounterMetricFamily(f"tangquant_requests_{name}", text, value=status[key])


class Metrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("tangquant_http_requests", "HTTP requests by route and status",
                                ("route", "status"), registry=self.registry)
        self.prompt_tokens = Counter("tangquant_prompt_tokens", "prompt tokens processed",
                                     ("model",), registry=self.registry)
        self.generated = Counter("tangquant_generation_tokens", "tokens generated",
                                 ("model",), registry=self.registry)
        self.ttft = Histogram("tangquant_time_to_first_token_seconds",
                              "generation start to first token", ("model",),
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("tangquant_time_per_output_token_seconds",
                              "mean time per token after the first, per request", ("model",),
                              buckets=TOKEN_BUCKETS, registry=self.registry)
        self.queue = Histogram("tangquant_queue_time_seconds", "admission to generation start",
                               ("model",), buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine))
        engine.observers.append(self.observe)
        engine.observers.append(PeerMetrics(self.registry, engine).observe)

    def observe(self, result, timed_out: bool) -> None:
        model = result.model
        self.prompt_tokens.labels(model).inc(result.prompt_tokens)
        self.generated.labels(model).inc(result.completion_tokens)
        self.queue.labels(model).observe(max(0.0, result.queue_s))
        if result.completion_tokens:
            self.ttft.labels(model).observe(max(0.0, result.ttft_s))
        if result.completion_tokens > 1:
            self.tpot.labels(model).observe(max(0.0, result.tpot_s))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CountRequests:
    """ASGI middleware: count every HTTP response by route template and status, and name the
    replica that answered in an ``X-Tangquant-Replica`` header (Ray Serve runs several)."""
    def __init__(self, app, metrics: Metrics, replica: str):
        self.app, self.metrics = app, metrics
        self.header = (b"x-tangquant-replica", replica.encode("latin-1", "replace"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen = {"status": None}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            status = seen["status"] or 499  # the client went away before a response started
            self.metrics.requests.labels(route_of(scope["path"]), str(status)).inc()
