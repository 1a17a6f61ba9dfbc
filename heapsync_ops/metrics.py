"""Gauges for alerting that only a reader of the topics can give, exported by the ingress.

The status page's reader (:class:`heapsync_ops.status_page.Tailer`) already follows the sink progress
topic and the three dead-letter topics from their beginning; it also follows the re-drive marks
topic and feeds :class:`OpsView`. The ingress is long-running and always deployed, so these gauges
survive restarts of the stages they describe (a restarted sink would forget when a list was last
applied; the progress topic does not):

- ``heapsync_list_last_applied_timestamp_seconds{sink,account,list}``: when the sink last applied a
  chunk of a *sync* of the list (epoch seconds). A list whose latest applied delta is a drain is not
  reported: Heap drained the segment and sends no more syncs for it. A held delta an operator
  discarded (``heapsync held discard``; its progress records say ``discarded``) was not applied and
  does not move it.
- ``heapsync_dead_letters_pending{source,reason}``: dead letters with no ``redriven`` mark yet, per
  topic (``rejected``, ``assembler``, ``sink``, as ``heapsync dlq`` names them) and reason; the same
  count as ``heapsync status`` (:func:`heapsync_ops.dlq.counts_by_reason`).
- ``heapsync_ingest_status_reader_failures``: broker errors in a row of that reader; while it is not 0
  the two gauges above may be stale.

Labels are account ids and list names from the operator's configuration and Heap's segment names,
and reasons written by heapsync: never a user id or email. Reasons are capped in length and number
per topic (a surprise beyond :data:`MAX_REASONS` is counted under ``other``).

:class:`OpsView` is pure (fed plain records, tested directly); reading starts with the first scrape
of ``/metrics`` or the first request to the status page.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from heapsync.contracts import AnyDeadLetter, AppliedChunk, RedriveMark, mark_key

MAX_REASON_CHARS = 120
MAX_REASONS = 50


class OpsView:
    """Last applied sync per list and dead letters not yet re-driven, fed record by record."""

    def __init__(self) -> None:
        self.last_applied: dict[tuple[str, str, str], float] = {}
        self._drained_at: dict[tuple[str, str, str], float] = {}
        self._entries: dict[str, tuple[str, str]] = {}  # mark key -> (source, reason)
        self._marks: dict[str, str] = {}  # mark key -> last outcome
        self._reasons: dict[str, set[str]] = {}

    def on_applied(self, chunk: AppliedChunk) -> None:
        """One record of the sink progress topic; ``applied_at`` says when its chunk was applied (a
        discarded chunk was not: nothing was sent, so it moves nothing)."""
        if chunk.discarded:
            return
        key = (chunk.sink, chunk.account, chunk.list_name)
        at = chunk.applied_at.timestamp()
        if chunk.kind == "drain":
            if at >= self.last_applied.get(key, float("-inf")):
                self.last_applied.pop(key, None)
                self._drained_at[key] = at
            return
        if at > self.last_applied.get(key, float("-inf")) and at >= self._drained_at.get(key, float("-inf")):
            self.last_applied[key] = at

    def on_dead_letter(self, source: str, topic: str, partition: int, offset: int, letter: AnyDeadLetter) -> None:
        """One dead-letter record; a dead letter written in parts counts once, by its first part (where
        ``heapsync dlq`` places the joined entry, so its re-drive mark has that part's key)."""
        if not letter.counted_once:
            return
        self._entries[mark_key(topic, partition, offset)] = (source, self._reason(source, letter.reason))

    def on_mark(self, key: bytes | None, mark: RedriveMark | None) -> None:
        """One record of the re-drive marks topic (compacted; ``None`` is a tombstone or a mark that does not read)."""
        if key is None:
            return
        k = key.decode("utf-8", "replace")
        if mark is None:
            self._marks.pop(k, None)
        else:
            self._marks[k] = mark.outcome

    def _reason(self, source: str, reason: object) -> str:
        text = str(reason or "unknown")[:MAX_REASON_CHARS]
        seen = self._reasons.setdefault(source, set())
        if text not in seen:
            if len(seen) >= MAX_REASONS:
                return "other"
            seen.add(text)
        return text

    def pending(self) -> dict[tuple[str, str], int]:
        """``(source, reason) -> count`` of dead letters whose last mark is not ``redriven``; every
        reason seen stays (at 0), so an alert resolves instead of its series vanishing."""
        out = {(source, reason): 0 for source, reasons in self._reasons.items() for reason in reasons}
        for key, labels in self._entries.items():
            if self._marks.get(key) != "redriven":
                out[labels] = out.get(labels, 0) + 1
        return out


class _OpsCollector(Collector):
    """Reads the view the ingress attached (none in a process without a status reader)."""

    def __init__(self) -> None:
        self.view: OpsView | None = None
        self.failures: Callable[[], int] = lambda: 0

    def collect(self) -> Iterator[Metric]:
        view = self.view or OpsView()  # no reader in this process: the families, without samples
        applied = GaugeMetricFamily(
            "heapsync_list_last_applied_timestamp_seconds",
            "When the sink last applied a chunk of a sync of the list (epoch seconds); drained lists are left out.",
            labels=["sink", "account", "list"])
        for (sink, account, list_name), at in sorted(view.last_applied.items()):
            applied.add_metric([sink, account, list_name], at)
        yield applied
        pending = GaugeMetricFamily("heapsync_dead_letters_pending",
                                    "Dead letters not yet re-driven (heapsync dlq), by topic and reason.",
                                    labels=["source", "reason"])
        for (source, reason), n in sorted(view.pending().items()):
            pending.add_metric([source, reason], n)
        yield pending
        failures = GaugeMetricFamily("heapsync_ingest_status_reader_failures",
                                     "Broker errors in a row of the reader behind the status page and the gauges "
                                     "above; while not 0 they may be stale.")
        if self.view is not None:
            failures.add_metric([], self.failures())
        yield failures


COLLECTOR = _OpsCollector()
REGISTRY.register(COLLECTOR)


def attach(view: OpsView, failures: Callable[[], int]) -> None:
    """The ingress's view and its reader's failure count are what ``/metrics`` reports."""
    COLLECTOR.view = view
    COLLECTOR.failures = failures
