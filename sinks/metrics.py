"""The sink's Prometheus metrics, defined once on prometheus_client's default registry.

Served with ``prometheus_client.start_http_server`` when ``HEAPSYNC_METRICS_PORT`` is set
(see :func:`serve`). Labels carry account ids and statuses, never contact ids.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

OPERATIONS = Counter(
    "heapsync_sink_operations_total", "Cordial operations finished, by kind (add/remove/clear) and result.",
    ["account", "kind", "result"],  # result: applied, missing (404 on remove), dead_lettered, imported
)
REQUESTS = Counter(
    "heapsync_sink_requests_total", "HTTP requests sent to Cordial, by method and status (0 = transport error).",
    ["account", "method", "status"],
)
RATE_LIMITED = Counter("heapsync_sink_rate_limited_total", "429 answers from Cordial.", ["account"])
RATE_HOLDS = Counter(
    "heapsync_sink_rate_holds_total", "Times the sink held requests because X-Rate-Limit-Remaining ran low.",
    ["account"],
)
RETRIES = Counter(
    "heapsync_sink_retries_total", "Requests retried after a transient failure (5xx, timeout, connection).",
    ["account"],
)
DEAD_LETTERS = Counter("heapsync_sink_dead_letters_total", "Records sent to the sink dead-letter topic.",
                       ["sink", "reason"])
PAUSED = Gauge("heapsync_sink_account_paused", "1 while Cordial refuses the account's key (401/403).", ["account"])
CHUNKS = Counter("heapsync_sink_chunks_total",
                 "Delta chunks handled, by result (applied, repeated, unreadable, held, waiting, discarded).",
                 ["sink", "result"])
CHUNK_SECONDS = Histogram(
    "heapsync_sink_chunk_apply_seconds", "Time to apply one delta chunk, by path (rest, bulk, drain).",
    ["sink", "path"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
)
IMPORTS = Counter("heapsync_sink_imports_total", "Contact imports, by final job status.", ["account", "status"])
HELD = Gauge(
    "heapsync_sink_held_deltas", "Deltas the removal rail holds until `heapsync held release|discard` (every "
    "replica of a sink reports all of them: take the max).", ["sink", "account"],
)
INFLIGHT = Gauge("heapsync_sink_inflight_chunks", "Delta chunks read from Kafka and not yet applied.", ["sink"])
INFLIGHT_IDS = Gauge("heapsync_sink_inflight_ids", "Operations in the delta chunks read and not yet applied.",
                     ["sink"])
COMMITTED = Gauge("heapsync_sink_committed_offset", "Last committed offset per partition.", ["sink", "partition"])


def serve(port: int | None) -> None:
    """Expose /metrics on ``port`` (no-op when unset)."""
    if port:
        start_http_server(port)
