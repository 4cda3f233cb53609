"""The metric-name reader that the dashboard checks rely on."""

from __future__ import annotations

import pytest

from tests.k8s.promql import dashboard_queries, metric_names, variable_query_names


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("up", {"up"}),
        (
            'histogram_quantile(0.99, sum by (le) (rate(a_seconds_bucket{model=~"$model"}[$__rate_interval])))',
            {"a_seconds_bucket"},
        ),
        ("sum(rate(a_total[5m])) by (worker) / ignoring (code) b_total offset 1h", {"a_total", "b_total"}),
        (
            'process_resident_memory_bytes * on (job, instance) group_left (service, model) info{worker=~"${worker}"}',
            {"process_resident_memory_bytes", "info"},
        ),
        ('label_replace(a, "dst", "$1", "src", "(.*)") > bool 0.5', {"a"}),
        ("rate(a_total[5m:30s]) and on () vector(1) unless b == inf", {"a_total", "b"}),
        ("snapkv:ratio:rate5m > 0.05", {"snapkv:ratio:rate5m"}),
        ("sum without (instance) (x) @ end()", {"x"}),
    ],
)
def test_metric_names(expression, expected):
    assert metric_names(expression) == expected


def test_misspelt_metric_name_is_read():
    # A query with a typo reads the misspelt name, which the dashboard test then reports as unknown.
    assert metric_names("rate(snapkv_prefil_seconds_count[5m])") == {"snapkv_prefil_seconds_count"}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ('label_values(a_info{model=~"$model"}, worker)', {"a_info"}),
        ("label_values(model)", set()),
        ("query_result(topk(3, b_total))", {"b_total"}),
        ("c_bytes", {"c_bytes"}),
    ],
)
def test_variable_query_names(query, expected):
    assert variable_query_names(query) == expected


def test_dashboard_queries_include_rows_and_variables():
    dashboard = {
        "panels": [
            {"title": "A", "targets": [{"expr": "a"}]},
            {"title": "Row", "type": "row", "panels": [{"title": "B", "targets": [{"expr": "b"}, {"refId": "x"}]}]},
        ],
        "templating": {"list": [
            {"name": "model", "type": "query", "query": {"query": "label_values(c, model)"}},
            {"name": "ds", "type": "datasource", "query": "prometheus"},
        ]},
    }
    assert dashboard_queries(dashboard) == [
        ("panel 'A'", "a", {"a"}),
        ("panel 'B'", "b", {"b"}),
        ("variable 'model'", "label_values(c, model)", {"c"}),
    ]
