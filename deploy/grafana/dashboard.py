"""Writes dashboards/cpm2.json, the Grafana dashboard of a cpm2 server: `python deploy/grafana/dashboard.py`.

Edit the panels here and regenerate; tests/test_deploy_monitoring.py checks that the JSON is what this
script writes and that every metric it queries is one the server exports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
SEL = 'instance=~"$instance"'
API = f'{SEL}, route!~"/health|/ready"'
RATE = "[$__rate_interval]"
OUT = Path(__file__).parent / "dashboards" / "cpm2.json"


def rate(metric: str, selector: str = SEL) -> str:
    return f"rate({metric}{{{selector}}}{RATE})"


def quantiles(histogram: str, by: str = "") -> list[tuple[str, str]]:
    """p50/p95/p99 of a histogram, optionally per label."""
    labels = f"{by}, le" if by else "le"
    prefix = f"{{{{{by}}}}} " if by else ""
    return [
        (f"histogram_quantile({q}, sum by ({labels}) ({rate(histogram + '_bucket')}))", f"{prefix}p{round(q * 100)}")
        for q in (0.5, 0.95, 0.99)
    ]


def average(histogram: str, by: str = "") -> tuple[str, str]:
    """Mean of a histogram's observations, optionally per label."""
    agg = f"sum by ({by})" if by else "sum"
    expr = f"{agg} ({rate(histogram + '_sum')}) / {agg} ({rate(histogram + '_count')})"
    return expr, f"{{{{{by}}}}} avg" if by else "avg"


def timeseries(
    title: str, targets: list[tuple[str, str]], unit: str = "short", description: str = "", **defaults: Any
) -> dict[str, Any]:
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never"},
                **defaults,
            },
            "overrides": [],
        },
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True, "calcs": []},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": [
            {"datasource": DATASOURCE, "refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


ROWS: list[tuple[str, list[dict[str, Any]]]] = [
    (
        "Requests",
        [
            timeseries(
                "Requests / s by status",
                [(f"sum by (code) ({rate('cpm2_requests_total', API)})", "{{code}}")],
                "reqps",
                "API requests (probes left out) by HTTP status.",
            ),
            timeseries(
                "Failures / s by type",
                [
                    (f"sum by (error_type) ({rate('cpm2_request_failures_total')})", "{{error_type}}"),
                    (f"sum by (reason) ({rate('cpm2_requests_rejected_total')})", "rejected: {{reason}}"),
                    (f"sum({rate('cpm2_requests_timed_out_total')})", "engine: timed out"),
                    (f"sum({rate('cpm2_requests_cancelled_total')})", "engine: cancelled"),
                ],
                "reqps",
            ),
            timeseries("Time to first token", quantiles("cpm2_time_to_first_token_seconds"), "s"),
            timeseries("Inter-token latency", quantiles("cpm2_inter_token_latency_seconds"), "s"),
            timeseries(
                "Tokens / s",
                [
                    (f"sum({rate('cpm2_generation_tokens_total')})", "generated"),
                    (f"sum({rate('cpm2_prompt_tokens_total')})", "input"),
                    (f"sum({rate('cpm2_virtual_tokens_total')})", "soft prompt"),
                ],
                "short",
            ),
            timeseries("Request duration", quantiles("cpm2_request_duration_seconds"), "s"),
        ],
    ),
    (
        "Engine",
        [
            timeseries(
                "Queue",
                [
                    (f"sum(cpm2_requests_waiting{{{SEL}}})", "waiting"),
                    (f"sum(cpm2_requests_running{{{SEL}}})", "running"),
                    (f"sum(cpm2_requests_in_flight{{{SEL}}})", "in flight (HTTP)"),
                    (f"sum(cpm2_queue_limit{{{SEL}}})", "queue limit"),
                ],
            ),
            timeseries(
                "Batch size",
                [average("cpm2_batch_size", "phase"), quantiles("cpm2_batch_size", "phase")[1]],
                description="Rows per engine step, by phase (encode, decode).",
            ),
            timeseries(
                "Distinct prompts per decode batch",
                [
                    average("cpm2_batch_distinct_prompts"),
                    quantiles("cpm2_batch_distinct_prompts")[1],
                ],
            ),
            timeseries(
                "Step time",
                [
                    average("cpm2_batch_forward_duration_seconds", "phase"),
                    quantiles("cpm2_batch_forward_duration_seconds", "phase")[1],
                ],
                "s",
            ),
        ],
    ),
    (
        "Experts",
        [
            timeseries("Expert bytes moved / s", [(f"sum({rate('cpm2_expert_bytes_moved_total')})", "moved")], "Bps"),
            timeseries(
                "Expert cache hit rate",
                [
                    (
                        f"sum({rate('cpm2_expert_cache_hits_total')}) / (sum({rate('cpm2_expert_cache_hits_total')})"
                        f" + sum({rate('cpm2_expert_cache_misses_total')}))",
                        "hit rate",
                    )
                ],
                "percentunit",
                min=0,
                max=1,
            ),
            timeseries(
                "Expert stall seconds / s",
                [
                    (f"sum({rate('cpm2_expert_stall_seconds_total')})", "stalled"),
                    (f"sum({rate('cpm2_expert_transfer_seconds_total')})", "transferring"),
                    (f"sum({rate('cpm2_batch_forward_duration_seconds_sum')})", "step time"),
                ],
                "s",
                "Seconds per second: stalled / step time is the share of the engine's time spent waiting for experts.",
            ),
            timeseries(
                "Expert loads / s",
                [
                    (f"sum({rate('cpm2_expert_transfers_total')})", "transfers"),
                    (f"sum({rate('cpm2_expert_prefetches_total')})", "prefetches"),
                    (f"sum({rate('cpm2_expert_in_place_total')})", "in place"),
                ],
                "ops",
            ),
        ],
    ),
    (
        "Prompt store",
        [
            timeseries(
                "Soft prompts",
                [
                    (f"sum(cpm2_prompts_registered{{{SEL}}})", "registered"),
                    (f"sum(cpm2_prompt_cache_entries{{{SEL}}})", "cached"),
                ],
            ),
            timeseries("Prompt cache bytes", [(f"sum(cpm2_prompt_cache_bytes{{{SEL}}})", "cached")], "bytes"),
            timeseries(
                "Prompt cache / s",
                [
                    (f"sum({rate('cpm2_prompt_cache_hits_total')})", "hits"),
                    (f"sum({rate('cpm2_prompt_cache_misses_total')})", "misses"),
                    (f"sum({rate('cpm2_prompt_cache_evictions_total')})", "evictions"),
                    (f"sum({rate('cpm2_prompt_load_failures_total')})", "load failures"),
                ],
                "ops",
            ),
            timeseries(
                "Prompt uploads / s by result",
                [(f"sum by (result) ({rate('cpm2_prompt_uploads_total')})", "{{result}}")],
                "ops",
            ),
        ],
    ),
]


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    for title, row in ROWS:
        panels.append({"type": "row", "title": title, "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        y += 1
        for i, panel in enumerate(row):
            panels.append({**panel, "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": y + 8 * (i // 2)}})
        y += 8 * ((len(row) + 1) // 2)
    for i, panel in enumerate(panels, start=1):
        panel["id"] = i
    instance = {
        "name": "instance",
        "label": "instance",
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": "label_values(cpm2_build_info, instance)", "refId": "instance"},
        "definition": "label_values(cpm2_build_info, instance)",
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }
    return {
        "uid": "cpm2",
        "title": "cpm2",
        "description": "cpm2 inference server: requests, latency, batching, expert offloading, soft prompts.",
        "tags": ["cpm2"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "fiscalYearStartMonth": 0,
        "links": [],
        "annotations": {"list": []},
        "templating": {"list": [instance]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
