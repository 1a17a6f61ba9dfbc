"""The Grafana dashboard charts metrics the stages really export."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import REGISTRY

import heapsync_ops.metrics  # noqa: F401  (the ingress's gauges for alerts)
import ingest.metrics  # noqa: F401  (registers the stage's metrics)
import processors.metrics  # noqa: F401
import sinks.archive  # noqa: F401
import sinks.metrics  # noqa: F401

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "heapsync.json"


def exported_names() -> set[str]:
    """Every series name the registered metrics can produce, whether or not a sample exists yet."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "summary": ["_sum", "_count"]}
    names: set[str] = set()
    for metric in REGISTRY.collect():
        names.add(metric.name)
        names.update(metric.name + s for s in suffixes.get(metric.type, []))
        names.update(sample.name for sample in metric.samples)
    return names


def test_every_dashboard_metric_is_exported() -> None:
    exprs = re.findall(r'"expr":\s*"((?:[^"\\]|\\.)*)"', DASHBOARD.read_text())
    used = {m for e in exprs for m in re.findall(r"heapsync_[a-z_]+", e)}
    assert used, "no heapsync metric found in the dashboard"
    missing = sorted(m for m in used if m not in exported_names())
    assert missing == [], missing
