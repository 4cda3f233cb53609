"""Prometheus metrics of the router, where time to first token is measured as the client sees it
(prefill, KV transfer and admission by the decode worker included). Pass a fresh `CollectorRegistry` in tests."""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from router.requests import RequestTrace
from snapkv.metrics import register_service_info

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class RouterMetrics:
    """Per-request figures at the router, labelled by model and worker name (never by request)."""

    def __init__(self, model: str, worker: str, registry: CollectorRegistry = REGISTRY):
        labels = ("model", "worker")
        register_service_info("router", model, worker, registry)
        self.labels = (model, worker)
        self.ttft = Histogram(
            "snapkv_router_time_to_first_token_seconds", "From a request's arrival to its first token.", labels,
            buckets=LATENCY_BUCKETS, registry=registry,
        ).labels(*self.labels)
        self.tpot = Histogram(
            "snapkv_router_time_per_output_token_seconds", "Mean time per token after the first, per request.",
            labels, buckets=TOKEN_BUCKETS, registry=registry,
        ).labels(*self.labels)
        self.e2e = Histogram(
            "snapkv_router_request_seconds", "From a request's arrival to its end.", labels,
            buckets=LATENCY_BUCKETS, registry=registry,
        ).labels(*self.labels)
        self.requests = Counter(
            "snapkv_router_requests_total", "Finished requests by final gRPC status.", (*labels, "status"),
            registry=registry,
        )
        self.requests.labels(*self.labels, "OK")  # exported as 0 before the first request ends
        self.retries = Counter(
            "snapkv_router_retries_total", "Prefill attempts retried on other workers, by gRPC status.",
            (*labels, "reason"), registry=registry,
        )

    def observe(self, trace: RequestTrace) -> None:
        """Record one finished request."""
        self.requests.labels(*self.labels, trace.status).inc()
        self.e2e.observe(time.perf_counter() - trace.arrival)
        if trace.ttft_s is not None:
            self.ttft.observe(trace.ttft_s)
        if trace.completion_tokens > 1:
            self.tpot.observe((trace.last_token_at - trace.first_token_at) / (trace.completion_tokens - 1))

    def declare_retry_reasons(self, reasons: Iterable[str]) -> None:
        """Export a zero for each reason a retry can have, so that dashboards see the series before the first retry."""
        for reason in reasons:
            self.retries.labels(*self.labels, reason)

    def observe_retry(self, reason: str) -> None:
        self.retries.labels(*self.labels, reason).inc()
