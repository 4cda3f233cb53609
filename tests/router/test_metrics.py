"""Router metrics from finished request records (the router calls `observe` once per request)."""

from prometheus_client import CollectorRegistry

from router.metrics import RouterMetrics
from router.requests import RequestTrace

LABELS = {"model": "m", "worker": "w"}


def test_observe_records_ttft_tpot_and_status():
    registry = CollectorRegistry()
    metrics = RouterMetrics("m", "w", registry)
    trace = RequestTrace(arrival=100.0, status="OK", completion_tokens=5, first_token_at=100.5, last_token_at=101.5)
    metrics.observe(trace)

    assert registry.get_sample_value("snapkv_router_time_to_first_token_seconds_sum", LABELS) == 0.5
    # Four tokens after the first one, over one second.
    assert registry.get_sample_value("snapkv_router_time_per_output_token_seconds_sum", LABELS) == 0.25
    assert registry.get_sample_value("snapkv_router_requests_total", {**LABELS, "status": "OK"}) == 1


def test_failed_request_without_tokens():
    registry = CollectorRegistry()
    metrics = RouterMetrics("m", "w", registry)
    metrics.observe(RequestTrace(status="UNAVAILABLE"))
    metrics.observe_retry("UNAVAILABLE")

    assert registry.get_sample_value("snapkv_router_requests_total", {**LABELS, "status": "UNAVAILABLE"}) == 1
    assert registry.get_sample_value("snapkv_router_time_to_first_token_seconds_count", LABELS) == 0
    assert registry.get_sample_value("snapkv_router_time_per_output_token_seconds_count", LABELS) == 0
    assert registry.get_sample_value("snapkv_router_retries_total", {**LABELS, "reason": "UNAVAILABLE"}) == 1
