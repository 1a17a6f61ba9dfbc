"""Kafka client basics and topic admin: the base config every client gets, and the topics heapsync
needs with explicit settings. (The producer is ``heapsync.producer``.)"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from heapsync.settings import Settings

log = logging.getLogger(__name__)
kafka_log = logging.getLogger("heapsync.kafka.client")
"""librdkafka's own log lines, routed through logging so that they come out as JSON too."""

ERROR_LOG_INTERVAL_SECONDS = 10.0
_DIGITS = re.compile(r"\d+")


class RepeatFilter(logging.Filter):
    """Lets one line per kind of message through per interval (reconnect attempts repeat every few ms)."""

    def __init__(self, interval: float = ERROR_LOG_INTERVAL_SECONDS) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        kind = _DIGITS.sub("", record.getMessage())[:160]
        now = time.monotonic()
        if now - self._last.get(kind, float("-inf")) < self.interval:
            return False
        self._last[kind] = now
        return True


kafka_log.addFilter(RepeatFilter())


def client_config(bootstrap: str) -> dict[str, Any]:
    """What every consumer, producer and admin client starts from.

    librdkafka otherwise prints its own lines to stderr (a refused connection every few
    milliseconds while a broker is down); through ``kafka_log`` they are JSON like every
    other line, and repeats are collapsed.
    """
    return {"bootstrap.servers": bootstrap, "logger": kafka_log}


def java_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's Java clients and aiokafka (so the Faust worker) pick for ``key``: murmur2.

    librdkafka's default partitioner hashes with CRC32 instead, so a confluent-kafka producer that
    writes next to the worker (``heapsync dlq redrive`` re-driving a delta) names the partition
    with this; else a list's re-driven change lands on another partition, out of order with it.
    """
    from aiokafka.partitioner import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % partitions


def min_insync_replicas(replication: int) -> int | None:
    """``min.insync.replicas`` for topics of ``replication`` copies; None leaves the broker's default.

    With 3+ copies an ``acks=all`` write must reach two, so an acknowledged page survives the loss
    of any one broker, and a write that could only land on one copy is refused (the ingress answers
    503) instead. Set on the topic, not left to the broker, whose default is 1. With fewer copies
    the broker's default stands: 2 of 2 would stop every write while one broker restarts.
    """
    return 2 if replication >= 3 else None


def topic_configs(settings: Settings) -> dict[str, dict[str, str]]:
    """Explicit settings per topic: retention long enough to replay after an outage, and with
    replication 3+ a ``min.insync.replicas`` of 2 (see :func:`min_insync_replicas`)."""
    retention_ms = str(int(settings.topic_retention_days * 86_400_000))
    t = settings.topics
    base = {"retention.ms": retention_ms, "max.message.bytes": str(16 * 1024 * 1024)}
    min_isr = min_insync_replicas(settings.topic_replication)
    if min_isr is not None:
        base["min.insync.replicas"] = str(min_isr)
    configs = {name: dict(base) for name in t.all()}
    # Keyed per chunk / per dead letter, so compaction alone would keep every key ever written (and the
    # sink reads the whole progress topic at start). What they protect expires with the topics they
    # refer to (deltas, dead letters), so they expire with the same retention.
    for name in (t.sink_progress, t.dlq_redrive):
        configs[name] = {**base, "cleanup.policy": "compact,delete"}
    # One record per list (and per held chunk until decided): a hold must outlive the retention.
    configs[t.sink_lists] = {**base, "cleanup.policy": "compact", "retention.ms": "-1"}
    return configs


def ensure_topics(settings: Settings, timeout: float = 30.0) -> list[str]:
    """Create any missing heapsync topic; returns the names created."""
    admin = AdminClient(client_config(settings.kafka_bootstrap))
    wanted = topic_configs(settings)
    return create_missing(admin, [
        NewTopic(name, num_partitions=settings.topic_partitions,
                 replication_factor=settings.topic_replication, config=cfg)
        for name, cfg in wanted.items()
    ], timeout)


def create_missing(admin: AdminClient, topics: list[NewTopic], timeout: float = 30.0) -> list[str]:
    """Create those of ``topics`` that do not exist yet; returns the names created (a race with another creator is fine).

    Returns once every created topic has a leader for each partition (see :func:`wait_until_led`).
    """
    existing = set(admin.list_topics(timeout=timeout).topics)
    new = [t for t in topics if t.topic not in existing]
    if not new:
        return []
    created: list[str] = []
    for name, fut in admin.create_topics(new, request_timeout=timeout).items():
        try:
            fut.result(timeout)
            created.append(name)
        except KafkaException as exc:
            if exc.args and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise
    wait_until_led(admin, created, timeout)
    return created


def led(meta: Any) -> bool:
    """Whether a topic's metadata (``TopicMetadata`` or None) shows it usable: every partition led, no error."""
    return (meta is not None and meta.error is None and bool(meta.partitions)
            and all(p.error is None and p.leader >= 0 for p in meta.partitions.values()))


def wait_until_led(admin: AdminClient, names: list[str], timeout: float) -> None:
    """Wait (up to ``timeout``) until the brokers' metadata shows every topic of ``names`` led.

    Apache Kafka acknowledges a CreateTopics request before every broker's metadata has the new
    topic: a describe or a produce right after can still see it missing. Past the timeout the
    caller goes on; clients retry unknown topics themselves, and ``heapsync topics`` reports it.
    """
    pending = set(names)
    deadline = time.monotonic() + timeout
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            md = admin.list_topics(timeout=left)
        except KafkaException as exc:  # a metadata hiccup: the topics exist, keep asking until the deadline
            log.info("metadata not readable while waiting for new topics: %s", exc)
        else:
            pending = {n for n in pending if not led(md.topics.get(n))}
        if pending:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    if pending:
        log.warning("created topics not yet led after %.0f s: %s", timeout, sorted(pending))
