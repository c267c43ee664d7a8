"""Prometheus metrics of one server (prometheus_client, in its own registry so that two servers in
one process, as in tests, do not share counters). Names follow Prometheus' conventions under the
`edgepeft_` prefix; `model` is the base's name, an adapter's or an `a+b` combination, always one
the server knows (unknown names are counted under model="")."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds: decode steps of small models on a CPU are ms; a long generation is minutes.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, resident_adapters):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("edgepeft_requests", "Requests by endpoint, model and HTTP status",
                                ["endpoint", "model", "status"], registry=r)
        self.prompt_tokens = Counter("edgepeft_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("edgepeft_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram("edgepeft_time_to_first_token_seconds", "Request start to its first generated token",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.latency = Histogram("edgepeft_request_latency_seconds", "Request start to its last token",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("edgepeft_requests_running", "Generation requests in progress", registry=r)
        self.cancelled = Counter("edgepeft_requests_cancelled", "Streams ended early because the client left",
                                 ["model"], registry=r)
        resident = Gauge("edgepeft_adapters_resident", "Adapters in memory now", registry=r)
        resident.set_function(lambda: len(resident_adapters()))

    def render(self) -> bytes:
        return generate_latest(self.registry)
