"""The assembler's Prometheus metrics (default registry; served when HEAPSYNC_METRICS_PORT is set)."""

from __future__ import annotations

from dataclasses import asdict

from prometheus_client import Counter, Gauge, start_http_server

from processors.assembler import Counters

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
    "done_pruned": Counter(_PREFIX + "done_pruned", "Done markers removed after the pages topic's retention."),
}
OPEN_SYNCS = Gauge(_PREFIX + "open_syncs", "Syncs waiting for pages or for an earlier sync, per partition.",
                   ["partition"])
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


def set_open_syncs(partition: int, count: int) -> None:
    OPEN_SYNCS.labels(partition=str(partition)).set(count)


def serve(port: int) -> None:
    start_http_server(port)
