"""The ingress's Prometheus metrics, on prometheus_client's default registry (served at ``/metrics``).

Labels are small closed sets (route template, status code, outcome, reason kind):
never an account id from the URL, which an attacker could vary without end.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BYTES_BUCKETS = (256, 1024, 4096, 16_384, 65_536, 262_144, 1_048_576, 4_194_304, 16_777_216)

REQUESTS = Counter(
    "heapsync_ingest_requests_total", "HTTP requests answered, by route and status code.", ["route", "status"]
)
LATENCY = Histogram(
    "heapsync_ingest_request_seconds", "Time from request start to response, by route.", ["route"],
    buckets=_LATENCY_BUCKETS,
)
BODY_BYTES = Histogram(
    "heapsync_ingest_body_bytes", "Size of webhook bodies read (before any check beyond size).",
    buckets=_BYTES_BUCKETS,
)
PRODUCE_LATENCY = Histogram(
    "heapsync_ingest_produce_seconds", "Time until Kafka acknowledged a record (or gave up), by topic kind and outcome.",
    ["topic", "outcome"], buckets=_LATENCY_BUCKETS,
)
REJECTED = Counter(
    "heapsync_ingest_rejected_total", "Signed requests kept in the rejected topic, by reason kind.", ["reason"]
)
SIGNATURE_FAILURES = Counter(
    "heapsync_ingest_signature_failures_total", "Requests refused with 403, by problem.", ["problem"]
)
IDS = Counter(
    "heapsync_ingest_ids_total", "User ids in accepted pages, by list operation.", ["op"]
)
UNAVAILABLE = Counter(
    "heapsync_ingest_unavailable_total", "Requests answered 503 (Kafka down, slow, or local queue full), by cause.",
    ["cause"],
)
IN_FLIGHT = Gauge("heapsync_ingest_in_flight_requests", "Webhook requests being handled right now.")
PRODUCER_RESTARTS = Counter(
    "heapsync_ingest_producer_restarts_total", "Kafka producers replaced after a fatal producer error."
)
