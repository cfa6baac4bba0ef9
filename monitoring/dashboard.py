#!/usr/bin/env python3
"""Writes monitoring/grafana-dashboard.json (and the chart's copy): the Grafana dashboard
for EventWorkers. Edit here, run `python3 monitoring/dashboard.py`, commit both files."""
import json
import pathlib
import sys

S = 'namespace="$namespace",service=~"$eventworker"'
O = 'eventworker_namespace="$namespace",eventworker=~"$eventworker"'
R = "$__rate_interval"

PANELS = [
    # (title, unit, [(expr, legend)], description)
    ("Events delivered per second", "ops",
     [(f"sum by (stream, type) (rate(events_processed_total{{{S}}}[{R}]))", "{{stream}} {{type}}")],
     "Delivered (2xx) per stream and event type."),
    ("Failed attempts per second", "ops",
     [(f"sum by (reason) (rate(events_failed_total{{{S}}}[{R}]))", "{{reason}}")],
     "Attempts that did not deliver, by reason (each retried or dead-lettered)."),
    ("Backlog per stream", "short",
     [(f"max by (stream) (stream_backlog{{{S}}})", "{{stream}}")],
     "Events waiting: not yet read plus read and not acknowledged (the autoscaling metric)."),
    ("Oldest waiting event", "s",
     [(f"max by (stream) (stream_oldest_age_seconds{{{S}}})", "{{stream}}")],
     "Age of the oldest event not yet delivered, per stream."),
    ("In flight and limit per host", "short",
     [(f"sum by (host) (host_in_flight{{{S}}})", "{{host}} in flight"),
      (f"sum by (host) (host_concurrency_limit{{{S}}})", "{{host}} limit")],
     "Requests open to each receiver, against the adaptive concurrency limit (summed over pods)."),
    ("Hosts paused", "short",
     [(f"max by (host) (host_circuit_open{{{S}}})", "{{host}}")],
     "1 while deliveries to a host are paused after failures (probed until it answers)."),
    ("Dead letters per second", "ops",
     [(f"sum by (reason) (rate(events_dead_lettered_total{{{S}}}[{R}]))", "{{reason}}")],
     "Events handed to the dead-letter sink, by reason."),
    ("Scheduled retries", "short",
     [(f"max(scheduled_retries{{{S}}})", "waiting in events:retry"),
      (f"sum by (stream) (rate(events_retry_scheduled_total{{{S}}}[{R}]))", "{{stream}} scheduled/s")],
     "Retries waiting for their time, and how fast they are scheduled."),
    ("Redis errors per second", "ops",
     [(f"sum by (op) (rate(redis_errors_total{{{S}}}[{R}]))", "{{op}}")],
     "Failed Redis operations, by operation (each is retried)."),
    ("Worker pods", "short",
     [(f"max by (state) (eventworker_operator_worker_replicas{{{O}}})", "{{state}}")],
     "Desired and ready worker pods, from the operator."),
    ("Delivery latency", "s",
     [(f"histogram_quantile(0.5, sum by (le) (rate(event_processing_duration_seconds_bucket{{{S}}}[{R}])))", "p50"),
      (f"histogram_quantile(0.99, sum by (le) (rate(event_processing_duration_seconds_bucket{{{S}}}[{R}])))", "p99")],
     "Duration of one delivery attempt (the receiver's answer time)."),
    ("Event age at delivery", "s",
     [(f"histogram_quantile(0.5, sum by (le) (rate(event_age_seconds_bucket{{{S}}}[{R}])))", "p50"),
      (f"histogram_quantile(0.99, sum by (le) (rate(event_age_seconds_bucket{{{S}}}[{R}])))", "p99")],
     "From the event's createdAt to its delivery."),
]


def dashboard():
    panels = []
    for i, (title, unit, targets, desc) in enumerate(PANELS):
        panels.append({
            "id": i + 1,
            "type": "timeseries",
            "title": title,
            "description": desc,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
            "targets": [
                {"refId": chr(65 + j), "expr": expr, "legendFormat": legend,
                 "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                for j, (expr, legend) in enumerate(targets)
            ],
        })
    var = lambda name, label, query: {
        "name": name, "label": label, "type": "query", "query": {"query": query, "refId": name},
        "definition": query, "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "refresh": 2, "sort": 1, "includeAll": name == "eventworker", "multi": name == "eventworker",
        "allValue": ".+" if name == "eventworker" else None,
    }
    variables = [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus"},
        var("namespace", "Namespace", "label_values(stream_backlog, namespace)"),
        var("eventworker", "EventWorker", 'label_values(stream_backlog{namespace="$namespace"}, service)'),
    ]
    for v in variables:
        if v.get("allValue", 0) is None:
            del v["allValue"]
    return {
        "uid": "eventworker",
        "title": "EventWorker",
        "description": "eventworker: Redis Streams to HTTP delivery, per EventWorker",
        "tags": ["eventworker"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-3h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": variables},
        "panels": panels,
    }


if __name__ == "__main__":
    root = pathlib.Path(__file__).resolve().parent.parent
    text = json.dumps(dashboard(), indent=2) + "\n"
    paths = [root / "monitoring/grafana-dashboard.json", root / "charts/eventworker-operator/files/grafana-dashboard.json"]
    if "--check" in sys.argv:
        stale = [str(p.relative_to(root)) for p in paths if not p.exists() or p.read_text() != text]
        if stale:
            sys.exit(f"{', '.join(stale)} stale: run 'python3 monitoring/dashboard.py'")
    else:
        for path in paths:
            path.write_text(text)
