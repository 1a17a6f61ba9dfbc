"""The assembler's counters reach Prometheus once each, however often the exporter runs; its lag gauge
does not count the worker's newest timer tick."""

from __future__ import annotations

from prometheus_client import REGISTRY

from heapsync import lag
from processors.assembler import Counters
from processors.metrics import Exporter, LagReporter


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


class FakeProbe:
    """Lag rows that depend on whether the newest tick is left out, as the real probe's do."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, bool]] = []

    def rows(self, group: str, topic: str, ticks: bool = False) -> list[lag.Row]:
        self.calls.append((group, topic, ticks))
        return [lag.Row(group, topic, 0, 0 if ticks else 1)]

    def close(self) -> None: ...


async def test_the_leaders_lag_gauge_leaves_out_the_newest_tick_on_the_pages_topic() -> None:
    """The worker's gauge is sampled on the tick's own 30 s timer, just after the tick: counted, it would
    never go back to 0 on an idle, healthy assembler and HeapsyncConsumerNotCatchingUp would fire."""
    reporter = LagReporter("127.0.0.1:1", "g-metrics-test", "p.pages")
    probe = FakeProbe()
    reporter.probe = probe  # type: ignore[assignment]
    await reporter.report(is_leader=True)
    assert probe.calls == [("g-metrics-test", "p.pages", True)]
    labels = {"group": "g-metrics-test", "topic": "p.pages", "partition": "0"}
    assert REGISTRY.get_sample_value("heapsync_consumer_lag", labels) == 0.0
    await reporter.report(is_leader=False)  # no longer the leader: the new one reports
    assert probe.calls == [("g-metrics-test", "p.pages", True)]
    assert REGISTRY.get_sample_value("heapsync_consumer_lag", labels) is None
