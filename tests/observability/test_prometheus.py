"""The Grafana dashboard and the Prometheus rules, checked against a real Prometheus server.

A real stack (decode, prefill on local Ray, router; tiny model) runs on loopback with its metrics
ports. A real Prometheus (Debian's `prometheus`, installed by `make test`) scrapes the three services
every second and evaluates the shipped rules. After a few real requests, every panel query and every
rule is run through Prometheus's HTTP API, and the counts are compared with what the client saw.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from router.client import SnapKVClient, SnapKVError, Summary
from snapkv.cli_services import LOOPBACK, LocalStack, free_port

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "k8s" / "dashboards" / "snapkv-serve.json"
DASHBOARD_BUILDER = ROOT / "k8s" / "dashboards" / "build.py"
RULES = ROOT / "k8s" / "base" / "prometheus-rules.yaml"

TINY = "tiny-llama"
COMPRESSION = dict(budget=64, window=8, kernel=5)
PROMPTS = ["the quick brown fox jumps over the lazy dog " * repeat for repeat in (3, 6, 9, 12)]
MAX_TOKENS = 12
# Grafana's built-in variables, replaced the way Grafana would for a short time range of a test.
VARIABLES = {"$__rate_interval": "1m", "$__range": "5m", "$model": ".*", "$worker": ".*"}


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} not found: `make test` installs Debian's prometheus package, which provides it"
    return path


def query(base: str, expr: str) -> list[dict]:
    """Evaluate `expr` now; fail on a Prometheus error; return the result vector."""
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
    except urllib.error.HTTPError as error:
        pytest.fail(f"Prometheus rejected {expr!r}: {error.read().decode()}")
    assert body["status"] == "success", body
    return body["data"]["result"]


def scalar(base: str, expr: str) -> float:
    result = query(base, expr)
    assert len(result) == 1, f"{expr!r} returned {result}"
    return float(result[0]["value"][1])


def wait_for(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def substitute(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def panel_targets(dashboard: dict) -> list[tuple[str, list[str]]]:
    return [
        (panel["title"], [target["expr"] for target in panel["targets"]])
        for panel in dashboard["panels"]
        if panel["type"] != "row"
    ]


def rule_groups() -> list[dict]:
    """The groups of the shipped PrometheusRule, evaluated every second for the test."""
    groups = yaml.safe_load(RULES.read_text())["spec"]["groups"]
    return [dict(group, interval="1s") for group in groups]


@pytest.fixture(scope="module")
def stack():
    with LocalStack(TINY, metrics_port=free_port()) as running:
        running.start(timeout_s=300)
        yield running


@pytest.fixture(scope="module")
def prometheus(stack, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prometheus")
    (folder / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(folder / "rules.yaml")],
        "scrape_configs": [
            {"job_name": f"snapkv-{name}", "static_configs": [{"targets": [f"{LOOPBACK}:{port}"]}]}
            for name, port in stack.metrics_ports.items()
        ],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(folder / "prometheus.log", "wb")
    process = subprocess.Popen(
        [
            tool("prometheus"), f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address={LOOPBACK}:{port}", "--log.level=warn",
        ],
        stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://{LOOPBACK}:{port}"
    try:
        def ready() -> bool:
            assert process.poll() is None, (folder / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_for(ready, "Prometheus to start")
        wait_for(lambda: query(base, "sum(up)") and scalar(base, "sum(up)") == 3, "three healthy scrape targets")
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def traffic(stack, prometheus):
    """Send real requests once Prometheus has a zero sample of every counter; return their summaries."""
    time.sleep(2)  # two scrapes of the idle stack, so that rates start from zero
    summaries = []
    with SnapKVClient(stack.address("router"), timeout_s=120) as client:
        for prompt in PROMPTS:
            items = list(client.generate(prompt, max_tokens=MAX_TOKENS, wire_dtype="fp32", **COMPRESSION))
            assert isinstance(items[-1], Summary)
            summaries.append(items[-1])
        with pytest.raises(SnapKVError) as rejected:
            list(client.generate(PROMPTS[0], max_tokens=MAX_TOKENS, temperature=-1.0))
    requests = len(PROMPTS) + 1
    wait_for(lambda: query(prometheus, "sum(snapkv_router_requests_total)")
             and scalar(prometheus, "sum(snapkv_router_requests_total)") == requests, "the requests to be scraped")
    time.sleep(3)  # a few more scrapes and rule evaluations after the last request
    return summaries, rejected.value.code.name


def test_dashboard_json_is_current():
    result = subprocess.run([sys.executable, str(DASHBOARD_BUILDER), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_panel_query_returns_series(prometheus, traffic):
    dashboard = json.loads(DASHBOARD.read_text())
    panels = panel_targets(dashboard)
    assert len(panels) >= 15
    for title, exprs in panels:
        values = []
        for expr in exprs:
            result = query(prometheus, substitute(expr))
            assert result, f"panel {title!r}: {expr!r} returned no series"
            values += [float(series["value"][1]) for series in result]
        # A quantile over buckets that saw no observation is NaN: each panel must show a number.
        assert any(math.isfinite(value) for value in values), f"panel {title!r} has no finite value: {values}"


def test_variables_list_the_stack(stack, prometheus, traffic):
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {item["name"]: item for item in dashboard["templating"]["list"] if item["type"] == "query"}
    assert set(variables) == {"model", "worker"}
    for name, variable in variables.items():
        match = re.fullmatch(r"label_values\((.*), (\w+)\)", variable["query"]["query"])
        assert match, variable["query"]
        series, label = substitute(match[1]), match[2]
        values = {item["metric"][label] for item in query(prometheus, series)}
        if name == "model":
            assert values == {TINY}
        else:  # `worker` is host:port of each service's gRPC server
            assert {value.rsplit(":", 1)[1] for value in values} == {str(port) for port in stack.ports.values()}


def test_counts_match_client_summaries(prometheus, traffic):
    summaries, rejected_status = traffic
    assert rejected_status == "INVALID_ARGUMENT"
    assert scalar(prometheus, 'sum(snapkv_router_requests_total{status="OK"})') == len(PROMPTS)
    assert scalar(prometheus, f'sum(snapkv_router_requests_total{{status="{rejected_status}"}})') == 1
    assert scalar(prometheus, "sum(snapkv_router_time_to_first_token_seconds_count)") == len(PROMPTS)
    assert scalar(prometheus, 'sum(snapkv_prefill_requests_total{code="OK"})') == len(PROMPTS)
    assert scalar(prometheus, "sum(snapkv_prefill_compression_ratio_count)") == len(PROMPTS)
    assert scalar(prometheus, "sum(snapkv_prefill_kv_sent_bytes_total)") == sum(s.kv_bytes_sent for s in summaries)
    assert scalar(prometheus, "sum(snapkv_prefill_kv_full_bytes_total)") == sum(s.kv_bytes_full for s in summaries)
    # Each token is counted once: the first by prefill, the rest by decode steps.
    generated = scalar(prometheus, "sum(snapkv_decode_generated_tokens_total)")
    assert generated + len(PROMPTS) == sum(s.completion_tokens for s in summaries)
    assert scalar(prometheus, "sum(snapkv_decode_kv_resident_bytes)") == 0
    # The one actor reported its memory: more than the tiny model's weights, less than this machine.
    actor_bytes = scalar(prometheus, 'snapkv_prefill_actor_resident_bytes{actor="0"}')
    assert 50 * 2**20 < actor_bytes < 64 * 2**30


def test_rules_pass_promtool(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(yaml.safe_load(RULES.read_text())["spec"]))
    result = subprocess.run([tool("promtool"), "check", "rules", str(rules)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rule_evaluates_on_live_data(prometheus, traffic):
    with urllib.request.urlopen(f"{prometheus}/api/v1/rules", timeout=10) as response:
        groups = json.load(response)["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    shipped = [rule for group in rule_groups() for rule in group["rules"]]
    assert len(rules) == len(shipped)
    known = set()
    for rule in rules:
        name = rule["name"]
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"
        if rule["type"] == "recording":
            assert query(prometheus, name), f"recording rule {name} produced no series"
            known.add(name)
    # An alert stays silent on a healthy stack, so what is checked is that its inputs exist.
    for rule in rules:
        if rule["type"] == "alerting":
            for metric in set(re.findall(r"snapkv[_:][a-z0-9_:]+", rule["query"])):
                assert metric in known or query(prometheus, metric), f"alert {rule['name']}: {metric} has no series"
