"""The ingress's Prometheus metrics, on prometheus_client's default registry (served at ``/metrics``).

Labels are small closed sets (route template, status code, outcome, reason kind):
never an account id from the URL, which an attacker could vary without end.

The metrics touched by every request (requests, latency, body size, produce latency, ids,
in flight) are plain numbers updated on the event loop and read by a custom collector at
scrape time: prometheus_client's own metrics take a lock per update, and ten of them per
request were a measurable share of the ingress's CPU. Only the event loop thread updates
them, and the scrape runs on that thread too, so no lock is needed.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Iterable, Iterator

from prometheus_client import REGISTRY, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BYTES_BUCKETS = (256, 1024, 4096, 16_384, 65_536, 262_144, 1_048_576, 4_194_304, 16_777_216)


class _CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _HistogramChild:
    __slots__ = ("upper", "counts", "sum")

    def __init__(self, upper: tuple[float, ...]) -> None:
        self.upper = upper
        self.counts = [0] * (len(upper) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.upper, value)] += 1  # first bucket with value <= le
        self.sum += value


class LoopCounter:
    """A counter with labels; same calls as prometheus_client's (``labels(...).inc()``)."""

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = ()) -> None:
        self.name = name.removesuffix("_total")
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _CounterChild] = {}

    def labels(self, *values: object) -> _CounterChild:
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = _CounterChild()
        return child

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def collect(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in self._children.items():
            family.add_metric(list(key), child.value)
        return family


class LoopHistogram:
    """A histogram with labels; same calls as prometheus_client's (``labels(...).observe(v)``)."""

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (),
                 buckets: Iterable[float] = _LATENCY_BUCKETS) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.upper = tuple(float(b) for b in buckets)
        self._children: dict[tuple[str, ...], _HistogramChild] = {}

    def labels(self, *values: object) -> _HistogramChild:
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = _HistogramChild(self.upper)
        return child

    def observe(self, value: float) -> None:
        child = self._children.get(())
        (child or self.labels()).observe(value)

    def collect(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in self._children.items():
            cumulative, buckets = 0, []
            for le, count in zip((*(_fmt(b) for b in self.upper), "+Inf"), child.counts):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(list(key), buckets, child.sum)
        return family


class LoopGauge:
    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def collect(self) -> Metric:
        return GaugeMetricFamily(self.name, self.documentation, value=self.value)


def _fmt(bound: float) -> str:
    return repr(float(bound))


class _LoopCollector(Collector):
    def __init__(self, metrics: list[LoopCounter | LoopHistogram | LoopGauge]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        for metric in self.metrics:
            yield metric.collect()


# ---- every request (lock-free, see above)

REQUESTS = LoopCounter(
    "heapsync_ingest_requests_total", "HTTP requests answered, by route and status code.", ["route", "status"]
)
LATENCY = LoopHistogram(
    "heapsync_ingest_request_seconds", "Time from request start to response, by route.", ["route"],
    buckets=_LATENCY_BUCKETS,
)
BODY_BYTES = LoopHistogram(
    "heapsync_ingest_body_bytes", "Size of webhook bodies read, decoded (only requests with a well-formed Heap-Hash "
    "are read).",
    buckets=_BYTES_BUCKETS,
)
PRODUCE_LATENCY = LoopHistogram(
    "heapsync_ingest_produce_seconds", "Time until Kafka acknowledged a record (or gave up), by topic kind and outcome.",
    ["topic", "outcome"], buckets=_LATENCY_BUCKETS,
)
IDS = LoopCounter("heapsync_ingest_ids_total", "User ids in accepted pages, by list operation.", ["op"])
IN_FLIGHT = LoopGauge("heapsync_ingest_in_flight_requests", "Webhook requests being handled right now.")

REGISTRY.register(_LoopCollector([REQUESTS, LATENCY, BODY_BYTES, PRODUCE_LATENCY, IDS, IN_FLIGHT]))

# ---- refusals and incidents (rare: prometheus_client's own, thread-safe metrics)

REJECTED = Counter(
    "heapsync_ingest_rejected_total", "Signed requests kept in the rejected topic, by reason kind.", ["reason"]
)
SIGNATURE_FAILURES = Counter(
    "heapsync_ingest_signature_failures_total", "Requests refused with 403, by problem.", ["problem"]
)
UNAVAILABLE = Counter(
    "heapsync_ingest_unavailable_total", "Requests answered 503 (Kafka down, slow, or local queue full), by cause.",
    ["cause"],
)
PRODUCER_RESTARTS = Counter(
    "heapsync_ingest_producer_restarts_total", "Kafka producers replaced after a fatal producer error."
)
