"""What every service's metrics share: the `snapkv_service_info` series that names the process.

Each service exports its own metrics (`decode_service.metrics`, `prefill_service.metrics`,
`router.metrics`). Process-wide series such as `process_resident_memory_bytes` come from
prometheus_client's default collectors and carry no service labels. Dashboards join them to this
series on `instance` to label memory by service, model and worker:

    process_resident_memory_bytes * on (instance) group_left (service, model, worker) snapkv_service_info
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

SERVICES = ("router", "prefill", "decode")


def register_service_info(service: str, model: str, worker: str, registry: CollectorRegistry) -> None:
    """Export `snapkv_service_info{service, model, worker} 1` in `registry`."""
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}; expected one of {', '.join(SERVICES)}")
    info = Gauge(
        "snapkv_service_info", "Always 1; its labels name the service, model and worker of this process.",
        ("service", "model", "worker"), registry=registry,
    )
    info.labels(service, model, worker).set(1)
