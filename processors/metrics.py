"""The assembler's Prometheus metrics (default registry; served when HEAPSYNC_METRICS_PORT is set)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import asdict

from prometheus_client import Counter, Gauge, start_http_server

from heapsync import lag
from processors.assembler import Counters

log = logging.getLogger("heapsync.processor")

_PREFIX = "heapsync_assembler_"

COUNTERS: dict[str, Counter] = {
    "pages": Counter(_PREFIX + "pages", "Records read from the pages topic (syncs and drains)."),
    "duplicate_pages": Counter(_PREFIX + "duplicate_pages", "Pages seen again (same sync and page number); counted once."),
    "conflicting_duplicates": Counter(
        _PREFIX + "conflicting_duplicates", "Repeated pages whose content differed from the first copy (first kept)."),
    "conflicts": Counter(_PREFIX + "conflicts", "Ids in both add and remove of one page (left out of that page)."),
    "late_pages": Counter(_PREFIX + "late_pages", "Pages that arrived after their sync was emitted without them."),
    "total_pages_mismatches": Counter(
        _PREFIX + "total_pages_mismatches", "Pages whose total_pages differed from the sync's first page."),
    "deltas": Counter(_PREFIX + "deltas", "Deltas emitted (complete and partial)."),
    "delta_chunks": Counter(_PREFIX + "delta_chunks", "Delta chunk messages emitted."),
    "partial_deltas": Counter(_PREFIX + "partial_deltas", "Deltas emitted with pages missing after the timeout."),
    "dead_lettered": Counter(_PREFIX + "dead_lettered", "Syncs sent to the dead-letter topic after the timeout."),
    "disabled_syncs": Counter(
        _PREFIX + "disabled_syncs", "Syncs and drains of segments with enabled = false in the accounts file: "
        "assembled and marked done, no delta (their pages stay in the pages topic for a replay)."),
    "done_pruned": Counter(_PREFIX + "done_pruned", "Done markers removed after the pages topic's retention."),
}
OPEN_SYNCS = Gauge(_PREFIX + "open_syncs", "Syncs waiting for pages or for an earlier sync, per partition.",
                   ["partition"])
OLDEST_OPEN = Gauge(_PREFIX + "oldest_open_sync_seconds",
                    "Age of the oldest sync still open (waiting for pages or for an earlier sync), per partition; "
                    "0 when none is open. Set on each tick.", ["partition"])
UNREADABLE = Counter(_PREFIX + "unreadable_records", "Records on the pages topic that could not be read.")


class Exporter:
    """Adds what the assembler counted since the last call to the Prometheus counters."""

    def __init__(self) -> None:
        self._last = asdict(Counters())

    def update(self, counters: Counters) -> None:
        last = self._last
        for name, value in vars(counters).items():  # called per record: no copies
            if value != last[name]:
                COUNTERS[name].inc(value - last[name])
                last[name] = value


def set_open_syncs(partition: int, count: int, oldest_seconds: float | None = None) -> None:
    OPEN_SYNCS.labels(partition=str(partition)).set(count)
    if oldest_seconds is not None:
        OLDEST_OPEN.labels(partition=str(partition)).set(round(oldest_seconds, 1))


def forget_partitions(partitions: Iterable[int]) -> None:
    """Partitions this worker gave up: their gauges are the new owner's to report (no stale copy here)."""
    for partition in partitions:
        for gauge in (OPEN_SYNCS, OLDEST_OPEN):
            try:
                gauge.remove(str(partition))
            except KeyError:
                pass


class LagReporter:
    """``heapsync_consumer_lag`` of the worker's group on the pages topic, measured by the group's leader.

    Every worker runs it; only the leader reports (all partitions), the others report nothing, so
    each partition has one series. Blocking Kafka calls run on a worker thread."""

    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        self.group, self.topic = group, topic
        self.probe = lag.LagProbe(bootstrap)
        self.series: set[tuple[str, str, str]] = set()

    async def report(self, is_leader: bool) -> None:
        rows: list[lag.Row] = []
        if is_leader:
            try:
                rows = await asyncio.get_running_loop().run_in_executor(None, self.probe.rows, self.group, self.topic, True)
            except Exception as exc:  # noqa: BLE001 - a metric must never stop the worker
                log.warning("consumer lag not measured", extra={"error": str(exc)[:200]})
                return
        self.series = lag.publish(rows, self.series)


def serve(port: int) -> None:
    start_http_server(port)
