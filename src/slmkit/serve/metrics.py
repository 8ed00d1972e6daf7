"""Prometheus metrics of one server, in its own registry (prometheus-client; no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("slm_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("slm_prompt_tokens", "prompt tokens processed", registry=r)
        self.completion_tokens = Counter("slm_completion_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("slm_time_to_first_token_seconds", "arrival to the first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("slm_time_per_output_token_seconds", "mean time per generated token after the first",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.routed = Counter("slm_cascade_routed", "cascade answers, by the model that gave them", ["model"],
                              registry=r)
        Gauge("slm_queue_depth", "requests waiting for a row", registry=r).set_function(lambda: engine.queue_depth)
        Gauge("slm_active_sequences", "sequences decoding now", registry=r).set_function(lambda: engine.n_active)
        Gauge("slm_spec_drafted_tokens", "tokens drafted by prompt lookup so far", registry=r).set_function(
            lambda: engine.drafted)
        Gauge("slm_spec_accepted_tokens", "drafted tokens the model kept so far", registry=r).set_function(
            lambda: engine.accepted)
        Gauge("slm_max_active_sequences", "rows of the batch", registry=r).set(engine.max_active)

    def finished(self, event) -> None:
        """Account a request's final engine event."""
        self.prompt_tokens.inc(event.prompt_tokens)
        self.completion_tokens.inc(event.completion_tokens)
        if event.ttft_s is not None:
            self.ttft.observe(event.ttft_s)
        if event.tpot_s is not None:
            self.tpot.observe(event.tpot_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
