"""Router metrics and log lines from finished request records (the router calls `observe` and
`log_finished` once per request)."""

import logging

from prometheus_client import CollectorRegistry

from router.metrics import RouterMetrics
from router.requests import RequestTrace, log_finished
from snapkv.proto import serving_pb2 as pb

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


def test_log_line_of_a_request_rejected_before_prefill(caplog):
    # No prefill ran, so the line reports no compression figures, and an unparsed request has no id.
    trace = RequestTrace(status="INVALID_ARGUMENT", error="invalid max_tokens=0: expected an integer >= 1")
    with caplog.at_level(logging.INFO, logger="router.requests"):
        log_finished(trace)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith("request (unparsed) finished with INVALID_ARGUMENT before prefill after ")
    assert record.getMessage().endswith(": invalid max_tokens=0: expected an integer >= 1")
    assert "ratio" not in record.getMessage()


def test_log_line_of_a_served_request(caplog):
    trace = RequestTrace(request_id="r1", status="OK", prompt_tokens=4096, completion_tokens=3,
                         prefill=pb.PrefillResponse(kept_tokens=1024))
    with caplog.at_level(logging.INFO, logger="router.requests"):
        log_finished(trace)
    assert caplog.records[0].getMessage().startswith(
        "request r1 finished with OK: 4096 prompt tokens, 1024 kept, ratio 4.00, ttft -, 3 tokens, e2e ")
