"""Read topics without a consumer group: the shared reader behind ``replay``,
``dlq``, ``status`` (``read_topic``, a range) and the status page
(``TopicFollower``, from the beginning and on as records arrive).

It assigns partitions directly (no group, nothing committed, no rebalance) and
reads until every partition reports end-of-partition, because high watermarks
are not reliable on every broker (Tansu may under-report them). Starting at a
point in time uses ``offsets_for_times`` with a timeout; when the broker does not
answer (Tansu's ListOffsets can hang) or answers nonsense, the reader falls back
to scanning from the beginning. Either way every record is also filtered on its
own timestamp, so a too-early start offset only costs reading time.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, KafkaException, TopicPartition

from heapsync.kafka import client_config

log = logging.getLogger("heapsync.reader")


@dataclass(frozen=True)
class Record:
    """One record as read, detached from confluent-kafka's Message."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None


def _record(msg: Any) -> Record:
    return Record(msg.topic(), msg.partition(), msg.offset(), msg.timestamp()[1], msg.key(), msg.value())


def _consumer(bootstrap: str) -> Consumer:
    return Consumer({
        **client_config(bootstrap),
        # never used to commit: a throwaway id keeps the broker from mixing readers up
        "group.id": f"heapsync-reader-{uuid.uuid4().hex[:12]}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
        "socket.timeout.ms": 10_000,
    })


def partitions_of(consumer: Consumer, topic: str, timeout: float = 10.0) -> list[int]:
    md = consumer.list_topics(topic, timeout=timeout)
    meta = md.topics.get(topic)
    if meta is None or meta.error is not None:
        return []
    return sorted(meta.partitions)


def start_offsets(consumer: Consumer, topic: str, parts: list[int], *, since_ms: int | None = None,
                  from_offset: int | None = None, timeout: float = 5.0) -> dict[int, int]:
    """Where to start in each partition. Beginning when nothing better is known."""
    if from_offset is not None:
        return {p: max(0, from_offset) for p in parts}
    if since_ms is None:
        return {p: OFFSET_BEGINNING for p in parts}
    try:
        found = consumer.offsets_for_times([TopicPartition(topic, p, since_ms) for p in parts], timeout=timeout)
    except KafkaException as exc:
        log.warning("offsets_for_times failed; scanning from the beginning", extra={"error": str(exc)})
        return {p: OFFSET_BEGINNING for p in parts}
    result: dict[int, int] = {}
    for tp in found:
        # -1 means "no record that late": start at the end; an error or other answer: scan from the start
        if tp.error is None and tp.offset == -1:
            result[tp.partition] = OFFSET_END
        elif tp.error is not None or tp.offset < 0:
            result[tp.partition] = OFFSET_BEGINNING
        else:
            result[tp.partition] = tp.offset
    return {p: result.get(p, OFFSET_BEGINNING) for p in parts}


def estimate_remaining(consumer: Consumer, topic: str, starts: dict[int, int], timeout: float = 5.0) -> int | None:
    """Records between the start offsets and the high watermarks: for a progress bar only."""
    total = 0
    try:
        for p, start in starts.items():
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            total += max(0, high - (low if start < 0 else max(start, low)))
    except KafkaException:
        return None
    return total


def read_topic(bootstrap: str, topic: str, *, since_ms: int | None = None, from_offset: int | None = None,
               partitions: list[int] | None = None, idle_timeout: float = 15.0,
               metadata_timeout: float = 10.0,
               on_start: Callable[[int | None], None] | None = None) -> Iterator[Record]:
    """Yield records of ``topic`` from the chosen start to the end of every partition.

    Stops when every partition reported its end, or when nothing arrived for
    ``idle_timeout`` seconds (a broker that never reports the end must not hang
    an operator's terminal). A missing topic yields nothing.
    """
    consumer = _consumer(bootstrap)
    try:
        parts = partitions if partitions is not None else partitions_of(consumer, topic, metadata_timeout)
        if not parts:
            return
        starts = start_offsets(consumer, topic, parts, since_ms=since_ms, from_offset=from_offset)
        if on_start is not None:
            on_start(estimate_remaining(consumer, topic, starts))
        consumer.assign([TopicPartition(topic, p, o) for p, o in starts.items()])
        open_parts = set(parts)
        last_seen = time.monotonic()
        while open_parts:
            msg = consumer.poll(0.2)
            if msg is None:
                if time.monotonic() - last_seen > idle_timeout:
                    log.warning("no end-of-partition from the broker; stopping the read",
                                extra={"topic": topic, "open_partitions": sorted(open_parts)})
                    return
                continue
            last_seen = time.monotonic()
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    open_parts.discard(msg.partition())
                elif err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    return
                else:
                    log.warning("read error", extra={"topic": topic, "error": err.str()})
                continue
            record = _record(msg)
            if since_ms is not None and record.timestamp_ms < since_ms:
                continue
            yield record
    finally:
        consumer.close()


class TopicFollower:
    """Follows topics from their beginning, without a group, picking up topics created later.

    Blocking calls (run them on a worker thread from asyncio). Nothing is committed:
    a restarted follower reads everything again, which is what a view rebuilt from
    compacted and retention-bounded topics wants.
    """

    def __init__(self, bootstrap: str, topics: Iterable[str], *, metadata_timeout: float = 5.0) -> None:
        self._consumer = _consumer(bootstrap)
        self._wanted = set(topics)
        self._assigned: set[str] = set()
        self._metadata_timeout = metadata_timeout

    def _assign_new_topics(self) -> None:
        md = self._consumer.list_topics(timeout=self._metadata_timeout)
        new = [TopicPartition(name, p, OFFSET_BEGINNING)
               for name in sorted(self._wanted - self._assigned) if name in md.topics
               for p in md.topics[name].partitions]
        if new:
            self._consumer.incremental_assign(new)
            self._assigned |= {tp.topic for tp in new}

    def poll(self, max_records: int = 500, timeout: float = 0.5) -> list[Record]:
        """The next records (possibly none); end-of-partition and read errors are skipped, not raised."""
        if self._assigned != self._wanted:
            self._assign_new_topics()
        return [_record(m) for m in self._consumer.consume(max_records, timeout) if m.error() is None]

    def close(self) -> None:
        self._consumer.close()


def latest_by_key(records: Iterable[Record]) -> dict[bytes, Record]:
    """What a compacted topic says: the last record per key, tombstones removing the key."""
    latest: dict[bytes, Record] = {}
    for r in records:
        if r.key is None:
            continue
        if r.value is None:
            latest.pop(r.key, None)
        else:
            latest[r.key] = r
    return latest
