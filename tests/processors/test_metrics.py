"""The assembler's counters reach Prometheus once each, however often the exporter runs."""

from __future__ import annotations

from prometheus_client import REGISTRY

from processors.assembler import Counters
from processors.metrics import Exporter


def value(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_exporter_adds_only_what_changed() -> None:
    before = {n: value(f"heapsync_assembler_{n}_total") for n in ("pages", "conflicts", "deltas")}
    counters = Counters()
    exporter = Exporter()
    counters.pages += 3
    counters.conflicts += 1
    exporter.update(counters)
    exporter.update(counters)
    counters.pages += 2
    exporter.update(counters)
    assert value("heapsync_assembler_pages_total") - before["pages"] == 5
    assert value("heapsync_assembler_conflicts_total") - before["conflicts"] == 1
    assert value("heapsync_assembler_deltas_total") - before["deltas"] == 0
