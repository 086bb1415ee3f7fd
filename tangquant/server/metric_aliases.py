"""``/metrics`` under vLLM's and llama-server's names too, so their dashboards and autoscalers work.

vLLM's series carry its ``model_name`` label (the served model's name; an adapter's requests count
under the base, as vLLM counts LoRA requests) and its meanings: time to first token from
admission (vLLM's arrival), inter-token latency per engine step that gave tokens. llama-server's
are unlabelled, its throughput gauges computed over the time since the previous scrape, as
llama-server resets its window at each. docs/commands.md maps every name to tangquant's own.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

SECONDS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
           10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
GAP_SECONDS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
# Finish reasons as vLLM labels them: a client that left or a deadline is an abort.
FINISHED = {"stop": "stop", "length": "length", "cancelled": "abort"}


def token_buckets(context: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to the context (vLLM's build_1_2_5_buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > context:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


class PeerMetrics:
    """The vLLM and llama-server series, in the server's registry."""

    def __init__(self, registry, engine):
        self.engine, self.model, self.registry = engine, engine.name, registry
        self.prompt = self._counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation = self._counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.success = self._counter("vllm:request_success", "Count of finished requests, by finish reason.",
                                     ("model_name", "finished_reason"))
        self.ttft = self._histogram("vllm:time_to_first_token_seconds", "Time to first token, from admission.")
        self.itl = [self._histogram(name, "Time between engine steps that gave the request tokens.", GAP_SECONDS)
                    for name in ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds")]
        self.tpot = self._histogram("vllm:request_time_per_output_token_seconds",
                                    "Mean time per output token after the first, per request.", GAP_SECONDS)
        self.times = {key: self._histogram(f"vllm:{name}_seconds", text) for key, name, text in (
            ("e2e", "e2e_request_latency", "End-to-end request latency, admission to the last token."),
            ("queue", "request_queue_time", "Time in the queue, admission to generation start."),
            ("prefill", "request_prefill_time", "Generation start to the first token."),
            ("decode", "request_decode_time", "First token to the last."),
            ("inference", "request_inference_time", "Generation start to the end."))}
        tokens = token_buckets(engine.context_length)
        self.lengths = {key: self._histogram(f"vllm:request_{key}_tokens", f"Number of {key} tokens per request.",
                                             tokens) for key in ("prompt", "generation")}
        self.llama = {key: Counter(name, text, registry=registry) for key, name, text in (
            ("prompt", "llamacpp:prompt_tokens", "Number of prompt tokens processed"),
            ("prompt_s", "llamacpp:prompt_seconds", "Total time spent processing prompts"),
            ("predicted", "llamacpp:tokens_predicted", "Number of generation tokens processed"),
            ("predicted_s", "llamacpp:tokens_predicted_seconds", "Total time spent generating tokens"))}
        self.totals = dict.fromkeys(self.llama, 0.0)   # the llama-server counters' values
        self._window = dict.fromkeys(("prompt", "predicted"), (0.0, 0.0))  # at the previous scrape
        registry.register(self)

    def _counter(self, name: str, text: str, labels=("model_name",)):
        return Counter(name, text, labels, registry=self.registry)

    def _histogram(self, name: str, text: str, buckets=SECONDS):
        return Histogram(name, text, ("model_name",), buckets=buckets, registry=self.registry)

    def observe(self, result, timed_out: bool) -> None:
        model, n = self.model, result.completion_tokens
        decode = result.tpot_s * (n - 1) if n > 1 else 0.0
        self.prompt.labels(model).inc(result.prompt_tokens)
        self.generation.labels(model).inc(n)
        reason = "error" if result.error else "abort" if timed_out else FINISHED.get(result.finish_reason, "abort")
        self.success.labels(model, reason).inc()
        for key, seconds in (("e2e", result.queue_s + result.duration_s), ("queue", result.queue_s),
                             ("inference", result.duration_s)):
            self.times[key].labels(model).observe(max(0.0, seconds))
        self.lengths["prompt"].labels(model).observe(result.prompt_tokens)
        self.lengths["generation"].labels(model).observe(n)
        if n:
            self.ttft.labels(model).observe(max(0.0, result.queue_s + result.ttft_s))
            self.times["prefill"].labels(model).observe(max(0.0, result.ttft_s))
            self.times["decode"].labels(model).observe(max(0.0, decode))
        if n > 1:
            self.tpot.labels(model).observe(max(0.0, result.tpot_s))
        for hist in self.itl:
            for gap in result.gaps:
                hist.labels(model).observe(max(0.0, gap))
        for key, value in (("prompt", result.prompt_tokens), ("prompt_s", max(0.0, result.ttft_s) if n else 0.0),
                           ("predicted", n), ("predicted_s", max(0.0, decode))):
            self.llama[key].inc(value)
            self.totals[key] += value

    def _rate(self, key: str) -> float:
        """Tokens per second since the previous scrape (llama-server's window)."""
        tokens, seconds = self.totals[key], self.totals[key + "_s"]
        last_tokens, last_seconds = self._window[key]
        self._window[key] = (tokens, seconds)
        return (tokens - last_tokens) / (seconds - last_seconds) if seconds > last_seconds else 0.0

    def collect(self):
        status, cache = self.engine.status(), self.engine.cache_usage()
        running, waiting, used = status["running"], status["queued"], cache.get("fraction", 0.0)
        for name, text, value in (
                ("vllm:num_requests_running", "Number of requests generating now.", running),
                ("vllm:num_requests_waiting", "Number of requests admitted and waiting.", waiting),
                ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", used)):
            family = GaugeMetricFamily(name, text, labels=["model_name"])
            family.add_metric([self.model], value)
            yield family
        for name, text, value in (
                ("llamacpp:requests_processing", "Number of requests processing.", running),
                ("llamacpp:requests_deferred", "Number of requests deferred.", waiting),
                ("llamacpp:kv_cache_usage_ratio", "KV-cache usage. 1 means 100 percent usage.", used),
                ("llamacpp:prompt_tokens_seconds", "Average prompt throughput in tokens/s.", self._rate("prompt")),
                ("llamacpp:predicted_tokens_seconds", "Average generation throughput in tokens/s.",
                 self._rate("predicted"))):
            yield GaugeMetricFamily(name, text, value=value)

    def describe(self):
        return []  # read at each scrape; registering must not take a window's reading
