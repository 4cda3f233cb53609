"""Prometheus metrics of a prefill server. Pass a fresh `CollectorRegistry` in tests."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from snapkv.metrics import register_service_info

from snapkv.proto import serving_pb2 as pb

TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
RATIO_BUCKETS = (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 32, 64)
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class PrefillMetrics:
    """Metrics of one prefill server, labelled by model and worker name (never by request)."""

    def __init__(self, model: str, worker: str, registry: CollectorRegistry = REGISTRY):
        labels = ("model", "worker")
        register_service_info("prefill", model, worker, registry)
        self.labels = (model, worker)

        def histogram(name: str, text: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, text, labels, buckets=buckets, registry=registry).labels(model, worker)

        def counter(name: str, text: str) -> Counter:
            return Counter(name, text, labels, registry=registry).labels(model, worker)

        self.prompt_tokens = histogram("snapkv_prefill_prompt_tokens", "Prompt length of prefilled requests.", TOKEN_BUCKETS)
        self.kept_tokens = histogram("snapkv_prefill_kept_tokens", "Positions per KV head kept by SnapKV.", TOKEN_BUCKETS)
        self.compression_ratio = histogram(
            "snapkv_prefill_compression_ratio", "Prompt tokens divided by kept tokens.", RATIO_BUCKETS
        )
        self.prefill_seconds = histogram(
            "snapkv_prefill_seconds", "Forward pass, compression and first token.", SECONDS_BUCKETS
        )
        self.transfer_seconds = histogram(
            "snapkv_prefill_kv_transfer_seconds", "Encoding and sending a cache with Decode.LoadKV.", SECONDS_BUCKETS
        )
        self.queue_seconds = histogram(
            "snapkv_prefill_queue_seconds", "Waiting for a free actor, Ray dispatch included.", SECONDS_BUCKETS
        )
        self.kv_bytes_full = counter("snapkv_prefill_kv_full_bytes_total", "Uncompressed size of the prompt caches.")
        self.kv_bytes_sent = counter("snapkv_prefill_kv_sent_bytes_total", "Serialized bytes of the LoadKV streams sent.")
        self.actor_restarts = counter(
            "snapkv_prefill_actor_restarts_total", "Prefill actors that a failed request found dead or restarting."
        )
        self.requests = Counter(
            "snapkv_prefill_requests_total", "Finished Prefill calls by gRPC status.", (*labels, "code"), registry=registry
        )
        self.requests.labels(model, worker, "OK")  # exported as 0 before the first call ends
        self.in_flight = Gauge("snapkv_prefill_in_flight", "Prefill calls in progress.", labels, registry=registry)
        self.in_flight = self.in_flight.labels(model, worker)
        self.ready_actors = Gauge("snapkv_prefill_ready_actors", "Actors in the rotation.", labels, registry=registry)
        self.ready_actors = self.ready_actors.labels(model, worker)
        self.actor_resident_bytes = Gauge(
            "snapkv_prefill_actor_resident_bytes", "Resident memory of each Ray prefill actor after its last request.",
            (*labels, "actor"), registry=registry,
        )

    def observe_actor(self, actor_index: int, response: pb.PrefillResponse) -> None:
        """Record what actor `actor_index` reported about itself with a response."""
        self.actor_resident_bytes.labels(*self.labels, str(actor_index)).set(response.actor_resident_bytes)

    def observe(self, response: pb.PrefillResponse) -> None:
        """Record the figures of one successful request."""
        self.prompt_tokens.observe(response.prompt_tokens)
        self.kept_tokens.observe(response.kept_tokens)
        self.compression_ratio.observe(response.prompt_tokens / response.kept_tokens)
        self.prefill_seconds.observe(response.prefill_s)
        self.queue_seconds.observe(response.queue_s)
        if response.handle:
            self.transfer_seconds.observe(response.transfer_s)
        self.kv_bytes_full.inc(response.kv_bytes_full)
        self.kv_bytes_sent.inc(response.kv_bytes_sent)

    def count(self, code_name: str) -> None:
        self.requests.labels(*self.labels, code_name).inc()
