"""Metric names: the ones PromQL queries use and the ones the services export.

`metric_names` reads names out of a PromQL expression without a full parser. It drops string
literals, Grafana variables, label matchers, range selectors and the label lists after by, without,
on, ignoring, group_left and group_right. Then it keeps the identifiers that are neither function
calls nor keywords. It is meant for the dashboard's and the rules' own queries, and
tests/k8s/test_promql.py pins down what it returns.
"""

from __future__ import annotations

import functools
import re

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "start", "end"}
LABEL_LIST_KEYWORDS = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)"
# Series that Prometheus itself writes for every scrape target.
SCRAPE_SERIES = {
    "up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
}
# The sample names each metric type exposes (prometheus_client 0.26, text format).
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}


def metric_names(expression: str) -> set[str]:
    """Return the metric names that a PromQL expression reads."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', " ", expression)
    text = re.sub(r"\$\{[^}]*\}|\$\w+", " ", text)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = re.sub(LABEL_LIST_KEYWORDS, " ", text)

    names = set()
    for match in re.finditer(r"(?<![\w.:])[A-Za-z_:][\w:]*", text):
        is_call = text[match.end():].lstrip().startswith("(")
        if not is_call and match.group() not in KEYWORDS:
            names.add(match.group())
    return names


def variable_query_names(query: str) -> set[str]:
    """Return the metric names a Grafana template variable query reads (label_values, query_result or PromQL)."""
    label_values = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query, re.DOTALL)
    if label_values:
        return metric_names(label_values.group(1))
    if re.fullmatch(r"\s*label_values\(\s*\w+\s*\)\s*", query):
        return set()
    query_result = re.fullmatch(r"\s*query_result\((.*)\)\s*", query, re.DOTALL)
    return metric_names(query_result.group(1) if query_result else query)


def dashboard_queries(dashboard: dict) -> list[tuple[str, str, set[str]]]:
    """Return (where, query, metric names) for every panel target and template variable of a Grafana dashboard."""
    queries = []

    def visit(panels: list[dict]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if "expr" in target:
                    queries.append((f"panel {panel.get('title')!r}", target["expr"], metric_names(target["expr"])))
            visit(panel.get("panels", []))

    visit(dashboard.get("panels", []))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            queries.append((f"variable {variable['name']!r}", query, variable_query_names(query)))
    return queries


@functools.cache
def exported_metric_names() -> frozenset[str]:
    """Return every sample name the three services export, with the process collectors' and scrape series."""
    from decode_service.metrics import DecodeMetrics
    from prefill_service.metrics import PrefillMetrics
    from router.metrics import RouterMetrics

    registries = []
    for metrics_class in (DecodeMetrics, PrefillMetrics, RouterMetrics):
        # One registry each, as in the services, which run in their own processes.
        registry = CollectorRegistry()
        metrics_class("model", "worker", registry)
        registries.append(registry)

    # prometheus_client's default registry, which the services serve, also contains these collectors.
    # ProcessCollector reports process_* only where /proc exists, as in the Linux containers.
    defaults = CollectorRegistry()
    ProcessCollector(registry=defaults)
    PlatformCollector(registry=defaults)
    GCCollector(registry=defaults)
    registries.append(defaults)

    names = set(SCRAPE_SERIES)
    for registry in registries:
        for family in registry.collect():
            names.update(family.name + suffix for suffix in SAMPLE_SUFFIXES[family.type])
    return frozenset(names)
