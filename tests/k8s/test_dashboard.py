"""The Grafana dashboard ships as a ConfigMap that Grafana's sidecar picks up. The dashboard and the
Prometheus rules query only metrics that the services export or that the rules record."""

from __future__ import annotations

import json

import yaml

from tests.k8s.manifests import K8S, find
from tests.k8s.promql import dashboard_queries, exported_metric_names, metric_names

DASHBOARD = K8S / "dashboards" / "snapkv-serve.json"
RULES = K8S / "base" / "prometheus-rules.yaml"
# `kubectl apply` (client side) stores the whole object in the last-applied-configuration
# annotation, and the API server rejects annotations larger than 256 KiB in total.
ANNOTATION_LIMIT_BYTES = 262144


def rule_groups() -> list[dict]:
    return yaml.safe_load(RULES.read_text())["spec"]["groups"]


def recorded_names() -> set[str]:
    return {rule["record"] for group in rule_groups() for rule in group["rules"] if "record" in rule}


def unknown_names(queries: list[tuple[str, str, set[str]]], known: set[str]) -> dict[str, set[str]]:
    """Map each query that reads a name outside `known` to those names."""
    return {f"{where}: {query}": names - known for where, query, names in queries if names - known}


def test_dashboard_configmap_has_sidecar_label(resources):
    configmap = find(resources, "ConfigMap", "snapkv-serve-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["data"] == {"snapkv-serve.json": DASHBOARD.read_text()}
    assert json.loads(configmap["data"]["snapkv-serve.json"])["uid"]


def test_dashboard_configmap_fits_apply_annotation(resources):
    configmap = find(resources, "ConfigMap", "snapkv-serve-dashboard")
    assert len(json.dumps(configmap).encode()) < ANNOTATION_LIMIT_BYTES


def squeeze_whitespace(value):
    """Collapse whitespace runs in every string of a YAML value."""
    if isinstance(value, dict):
        return {key: squeeze_whitespace(item) for key, item in value.items()}
    if isinstance(value, list):
        return [squeeze_whitespace(item) for item in value]
    return " ".join(value.split()) if isinstance(value, str) else value


def test_rendered_rules_match_rules_file(resources):
    # tests/observability checks the rules file with promtool, and this is the rule set that gets
    # applied. Whitespace is compared loosely because kustomize 5.8 adds a blank line when it
    # re-folds a `>-` scalar whose lines are indented more than the first, which PromQL ignores.
    rule = find(resources, "PrometheusRule", "snapkv-serve")
    assert squeeze_whitespace(rule["spec"]) == squeeze_whitespace(yaml.safe_load(RULES.read_text())["spec"])


def test_dashboard_queries_use_exported_metrics():
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    assert len(queries) >= 10

    known = exported_metric_names() | recorded_names()
    assert unknown_names(queries, known) == {}


def test_rules_use_exported_metrics():
    queries = [
        (rule.get("record") or rule["alert"], str(rule["expr"]), metric_names(str(rule["expr"])))
        for group in rule_groups()
        for rule in group["rules"]
    ]
    assert unknown_names(queries, exported_metric_names() | recorded_names()) == {}


def test_exported_names_cover_each_service():
    names = exported_metric_names()
    for expected in (
        "snapkv_router_time_to_first_token_seconds_bucket",
        "snapkv_prefill_kv_sent_bytes_total",
        "snapkv_decode_kv_budget_bytes",
        "snapkv_service_info",
        "process_resident_memory_bytes",
        "up",
    ):
        assert expected in names
    # Counters are exposed with their _total suffix only.
    assert "snapkv_prefill_kv_sent_bytes" not in names
