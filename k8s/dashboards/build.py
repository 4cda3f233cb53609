"""Write the Grafana dashboard `snapkv-serve.json` beside this file.

The panels are listed here, as data, so that each query is written once and reviewed as PromQL; the
JSON is generated and committed. `tests/observability` checks that the committed JSON is current and
runs every query against a real Prometheus scraping a real stack.

    python k8s/dashboards/build.py          # rewrite snapkv-serve.json
    python k8s/dashboards/build.py --check  # exit 1 if it is stale
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

OUTPUT = Path(__file__).with_name("snapkv-serve.json")
UID = "snapkv-serve"

# Selectors shared by the queries: every SnapKV series carries `model` and `worker` labels.
MODEL = 'model=~"$model"'
SCOPE = 'model=~"$model", worker=~"$worker"'
RATE = "[$__rate_interval]"


def quantiles(metric: str, selector: str, levels: tuple[float, ...]) -> list[tuple[str, str]]:
    """Return one histogram_quantile target per level, over the buckets of `metric` summed across workers."""
    return [
        (f"p{round(level * 100)}", f"histogram_quantile({level}, sum by (le) (rate({metric}_bucket{{{selector}}}{RATE})))")
        for level in levels
    ]


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    targets: list[tuple[str, str]]  # (legend, PromQL)
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 8
    extra: dict = field(default_factory=dict)


ROWS: list[tuple[str, list[Panel]]] = [
    ("Compression", [
        Panel(
            "Compression ratio",
            "Prompt tokens divided by kept positions per KV head, per request (prefill).",
            quantiles("snapkv_prefill_compression_ratio", MODEL, (0.5, 0.9)),
            unit="x",
        ),
        Panel(
            "Compression ratio distribution",
            "Requests per compression-ratio bucket.",
            [("{{le}}", f"sum by (le) (increase(snapkv_prefill_compression_ratio_bucket{{{MODEL}}}{RATE}))")],
            kind="heatmap",
            extra={"options": {"calculate": False, "yAxis": {"unit": "x"}, "cellValues": {"unit": "short"}}},
        ),
        Panel(
            "Prompt and kept tokens (p50)",
            "Median prompt length and median kept positions per KV head.",
            [
                ("prompt", quantiles("snapkv_prefill_prompt_tokens", MODEL, (0.5,))[0][1]),
                ("kept", quantiles("snapkv_prefill_kept_tokens", MODEL, (0.5,))[0][1]),
            ],
        ),
        Panel(
            "KV bytes: full size vs sent",
            "Uncompressed size of the prompt caches against the bytes prefill sent to decode, per second.",
            [
                ("full size", f"sum(rate(snapkv_prefill_kv_full_bytes_total{{{MODEL}}}{RATE}))"),
                ("sent", f"sum(rate(snapkv_prefill_kv_sent_bytes_total{{{MODEL}}}{RATE}))"),
            ],
            unit="Bps",
            width=12,
        ),
        Panel(
            "KV bytes saved",
            "Full-size KV minus bytes sent, over the dashboard's time range.",
            [("saved", f"sum(increase(snapkv_prefill_kv_full_bytes_total{{{MODEL}}}[$__range]))"
                       f" - sum(increase(snapkv_prefill_kv_sent_bytes_total{{{MODEL}}}[$__range]))")],
            unit="bytes",
            kind="stat",
            width=12,
        ),
    ]),
    ("Latency", [
        Panel(
            "Time to first token",
            "Measured at the router: from a request's arrival to its first token (prefill, KV transfer and "
            "admission by the decode worker included).",
            quantiles("snapkv_router_time_to_first_token_seconds", MODEL, (0.5, 0.99)),
            unit="s",
            width=6,
        ),
        Panel(
            "Time per output token",
            "Measured at the router: a request's mean time per token after the first.",
            quantiles("snapkv_router_time_per_output_token_seconds", MODEL, (0.5, 0.99)),
            unit="s",
            width=6,
        ),
        Panel(
            "KV transfer time",
            "Prefill encoding and sending a compressed cache to decode (Decode.LoadKV).",
            quantiles("snapkv_prefill_kv_transfer_seconds", MODEL, (0.5, 0.99)),
            unit="s",
            width=6,
        ),
        Panel(
            "Prefill time",
            "Forward pass, compression and first token in a Ray actor.",
            quantiles("snapkv_prefill_seconds", MODEL, (0.5, 0.99)),
            unit="s",
            width=6,
        ),
    ]),
    ("Throughput and status", [
        Panel(
            "Tokens per second",
            "Generated tokens: first tokens come from prefill (one per successful Prefill call), the rest "
            "from decode steps; each token is counted once, where it is generated.",
            [
                ("decode", f"sum(rate(snapkv_decode_generated_tokens_total{{{MODEL}}}{RATE}))"),
                ("first tokens", f'sum(rate(snapkv_prefill_requests_total{{{MODEL}, code="OK"}}{RATE}))'),
            ],
            unit="short",
        ),
        Panel(
            "Requests by final status",
            "Finished client requests per second at the router, by gRPC status.",
            [("{{status}}", f"sum by (status) (rate(snapkv_router_requests_total{{{MODEL}}}{RATE}))")],
            unit="reqps",
        ),
        Panel(
            "Retries by reason",
            "Prefill attempts the router retried on other workers, by the gRPC status of the failed attempt. "
            "There is no silent fallback: a request that cannot be retried fails.",
            [("{{reason}}", f"sum by (reason) (increase(snapkv_router_retries_total{{{MODEL}}}{RATE}))")],
        ),
    ]),
    ("Workers", [
        Panel(
            "Decode: active sequences",
            "Sequences in each decode worker's running batch.",
            [("{{worker}}", f"sum by (worker) (snapkv_decode_active_sequences{{{SCOPE}}})")],
        ),
        Panel(
            "Decode: KV memory against budget",
            "KV memory reserved by loaded and running sequences, and the most each worker may reserve.",
            [
                ("{{worker}} resident", f"sum by (worker) (snapkv_decode_kv_resident_bytes{{{SCOPE}}})"),
                ("{{worker}} budget", f"sum by (worker) (snapkv_decode_kv_budget_bytes{{{SCOPE}}})"),
            ],
            unit="bytes",
        ),
        Panel(
            "Queue depth",
            "Loaded sequences waiting to join a decode batch, and Prefill calls in progress.",
            [
                ("{{worker}} decode queue", f"sum by (worker) (snapkv_decode_queue_depth{{{SCOPE}}})"),
                ("{{worker}} prefill in flight", f"sum by (worker) (snapkv_prefill_in_flight{{{SCOPE}}})"),
            ],
        ),
        Panel(
            "Decode step",
            "Median sequences per batched decode step, and step time.",
            [
                ("batch size p50", quantiles("snapkv_decode_batch_size", SCOPE, (0.5,))[0][1]),
                *[(f"step {legend}", query) for legend, query in quantiles("snapkv_decode_step_seconds", SCOPE, (0.5, 0.99))],
            ],
        ),
        Panel(
            "Ray actors: ready and restarts",
            "Prefill actors in the rotation, and actors that a failed request found dead or restarting.",
            [
                ("{{worker}} ready", f"sum by (worker) (snapkv_prefill_ready_actors{{{SCOPE}}})"),
                ("{{worker}} restarts", f"sum by (worker) (increase(snapkv_prefill_actor_restarts_total{{{SCOPE}}}{RATE}))"),
            ],
        ),
        Panel(
            "Leases expired",
            "Loaded caches that decode freed because nobody streamed them within the lease.",
            [("{{worker}}", f"sum by (worker) (increase(snapkv_decode_lease_expirations_total{{{SCOPE}}}{RATE}))")],
        ),
        Panel(
            "Process memory",
            "Resident memory of each service process, and of each Ray prefill actor after its last request.",
            [
                (
                    "{{service}} {{worker}}",
                    "process_resident_memory_bytes * on (job, instance) group_left (service, model, worker) "
                    f"snapkv_service_info{{{SCOPE}}}",
                ),
                ("{{worker}} actor {{actor}}", f"sum by (worker, actor) (snapkv_prefill_actor_resident_bytes{{{SCOPE}}})"),
            ],
            unit="bytes",
            width=16,
        ),
    ]),
]


def variable(name: str, label: str, selector: str) -> dict:
    query = f"label_values(snapkv_service_info{selector}, {label})"
    return {
        "name": name,
        "label": name.capitalize(),
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "refresh": 2,
        "sort": 1,
    }


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    heatmap = panel.kind == "heatmap"
    body = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "targets": [
            {
                "refId": chr(ord("A") + index),
                "expr": expr,
                "legendFormat": legend,
                **({"format": "heatmap"} if heatmap else {}),
            }
            for index, (legend, expr) in enumerate(panel.targets)
        ],
    }
    body.update(panel.extra)
    return body


def build() -> dict:
    panels: list[dict] = []
    panel_id, y = 1, 0
    for title, row in ROWS:
        panels.append({"id": panel_id, "type": "row", "title": title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        panel_id, y, x = panel_id + 1, y + 1, 0
        for panel in row:
            if x + panel.width > 24:
                x, y = 0, y + 8
            panels.append(panel_json(panel, panel_id, x, y))
            panel_id, x = panel_id + 1, x + panel.width
        y += 8
    return {
        "uid": UID,
        "title": "SnapKV Serve",
        "description": "Compression, KV traffic, latency, throughput and worker state of SnapKV Serve.",
        "tags": ["snapkv-serve", "llm-serving"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0},
            variable("model", "model", ""),
            variable("worker", "worker", '{model=~"$model"}'),
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{OUTPUT} is stale; run: python {Path(__file__).as_posix()}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
