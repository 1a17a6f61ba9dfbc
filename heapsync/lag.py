"""Consumer lag as a Prometheus gauge, exported by the process that owns the consumer.

``heapsync_consumer_lag{group,topic,partition}``: records of the partition not yet done by the group
(high watermark minus the offset the group has committed, or would commit next). The same
definition as ``heapsync status`` (:func:`heapsync_ops.status.lag_of`), so the alert and the CLI agree.

- The sink reports the partitions it is assigned, from its own commit bookkeeping and a watermark
  query made in its polling thread (``sinks/runner.py``), every :data:`LAG_INTERVAL_SECONDS`.
- The Faust worker reports every partition of the pages topic, but only while it is the group's
  leader, from a watermark and committed-offset query (:class:`LagProbe`) on a worker thread:
  Faust's own consumer offers no public view of its committed offsets.

One gauge for every process (defined once here), so the series have the same name and labels.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import Gauge

from heapsync.contracts import is_tick
from heapsync.kafka import client_config

LAG_INTERVAL_SECONDS = 30.0
"""How often lag is measured: well below the alert's ``for`` and Prometheus' staleness window (5 min)."""

LAG = Gauge("heapsync_consumer_lag", "Records of a partition the consumer group has not finished yet "
            "(high watermark - committed offset), reported by the process that owns the partition.",
            ["group", "topic", "partition"])


@dataclass(frozen=True)
class Row:
    group: str
    topic: str
    partition: int
    lag: int


def partition_lag(high: int, done_up_to: int | None, low: int = 0, newest_is_tick: bool = False) -> int:
    """Records still to finish: ``high`` minus the first offset not yet done (``low`` when nothing is known).

    ``newest_is_tick``: the partition's newest record is the worker's own timer tick (pages topic). It is
    not counted: the leader sends one into every pages partition every 30 s and the group commits it
    up to Faust's commit interval (2.8 s) later, so an idle, healthy assembler read right after a tick
    showed lag 1 everywhere (and the worker's gauge, sampled on the same 30 s timer just after the
    tick, never went back to 0). Older ticks still count: the leader's timer keeps sending them, so a
    stuck agent's partition grows by a tick every 30 s (with every worker stopped, none are sent).
    """
    start = low if done_up_to is None or done_up_to < 0 else max(done_up_to, low)
    lag = max(0, high - start)
    return lag - 1 if newest_is_tick and lag > 0 else lag


def newest_ticks(consumer: Any, topic: str, highs: Mapping[int, int], timeout: float) -> set[int]:
    """The partitions of ``highs`` (partition -> high watermark) whose record just below the high watermark
    is a timer tick. All are read with ``consumer`` at once, by assignment (no group join, nothing
    committed), within the caller's ``timeout``; a partition not answered by then is not a tick (its
    newest record counts). The consumer should have ``enable.partition.eof``: a partition whose last
    offset holds no readable record (e.g. a transaction marker) is then answered at once, not waited out."""
    from confluent_kafka import KafkaError, TopicPartition

    wanted = {partition: high for partition, high in highs.items() if high > 0}
    if not wanted:
        return set()
    consumer.assign([TopicPartition(topic, partition, high - 1) for partition, high in wanted.items()])
    ticks: set[int] = set()
    try:
        deadline = time.monotonic() + timeout
        while wanted and (left := deadline - time.monotonic()) > 0:
            for msg in consumer.consume(500, min(left, 1.0)):
                partition = msg.partition()
                if partition not in wanted:
                    continue
                if (error := msg.error()) is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        del wanted[partition]
                    continue
                # a later offset: the one below ``high`` holds no readable record (e.g. a transaction marker)
                if msg.offset() == wanted.pop(partition) - 1 and is_tick(msg.value() or b""):
                    ticks.add(partition)
        return ticks
    finally:
        consumer.unassign()


def topic_lag(consumer: Any, topic: str, partitions: Iterable[int], committed: Mapping[int, int | None],
              ticks: bool, timeout: float) -> dict[int, tuple[int, int]]:
    """Per partition: (end offset, lag), as both ``heapsync status`` and the gauge count it. ``ticks``: the
    topic carries the worker's timer ticks (pages), so a newest tick is not lag (:func:`partition_lag`).
    Blocking: one watermark query per partition, then one read of the lagging ones' newest records."""
    from confluent_kafka import TopicPartition

    ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout) for p in partitions}
    lagging = {p: high for p, (low, high) in ends.items() if partition_lag(high, committed.get(p), low) > 0}
    tick = newest_ticks(consumer, topic, lagging, timeout) if ticks else set()
    return {p: (high, partition_lag(high, committed.get(p), low, p in tick)) for p, (low, high) in ends.items()}


def publish(rows: Iterable[Row], previous: set[tuple[str, str, str]]) -> set[tuple[str, str, str]]:
    """Set the gauge for ``rows``; drop the series reported last time and not now (a partition given up)."""
    now: set[tuple[str, str, str]] = set()
    for row in rows:
        labels = (row.group, row.topic, str(row.partition))
        LAG.labels(*labels).set(row.lag)
        now.add(labels)
    forget(previous - now)
    return now


def forget(labels: Iterable[tuple[str, str, str]]) -> None:
    for key in labels:
        try:
            LAG.remove(*key)
        except KeyError:
            pass


class LagUnknown(Exception):
    """The group's committed offsets could not be read (its coordinator is loading or unreachable)."""


def committed_offsets(bootstrap: str, group: str, tps: list[Any], timeout: float) -> dict[int, int]:
    """A group's committed offset per partition, waiting out a coordinator that is (re)loading.

    On Apache Kafka the group coordinator loads its ``__consumer_offsets`` partition after a start
    or a leader change and answers "not coordinator" or "load in progress" meanwhile: retried until
    ``timeout``. Read with a consumer of the group that never joins it (OffsetFetch only), not the
    admin API: librdkafka's ``list_consumer_group_offsets`` can crash the process (SIGSEGV) on
    exactly those answers.
    """
    from confluent_kafka import Consumer, KafkaError, KafkaException

    deadline = time.monotonic() + timeout
    reader = Consumer({**client_config(bootstrap), "group.id": group, "enable.auto.commit": False})
    try:
        while True:
            left = max(1.0, deadline - time.monotonic())
            try:
                return {tp.partition: tp.offset for tp in reader.committed(tps, timeout=left)}
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                code = err.code() if isinstance(err, KafkaError) else None
                if code not in _coordinator_busy() or time.monotonic() >= deadline:
                    raise LagUnknown(str(err or exc)) from exc
            time.sleep(0.5)
    finally:
        reader.close()


@functools.cache
def _coordinator_busy() -> frozenset[int]:
    """Answers that mean "ask again shortly": the coordinator is loading, moving or not reachable yet."""
    from confluent_kafka import KafkaError

    return frozenset({KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.COORDINATOR_NOT_AVAILABLE,
                      KafkaError.NOT_COORDINATOR, KafkaError.REQUEST_TIMED_OUT, KafkaError._TIMED_OUT,
                      KafkaError._TRANSPORT, KafkaError._WAIT_COORD})


class LagProbe:
    """Committed offsets and watermarks of one group on one topic, with clients kept between calls.

    Blocking: call it from a worker thread."""

    def __init__(self, bootstrap: str, timeout: float = 10.0) -> None:
        self.bootstrap = bootstrap
        self.timeout = timeout
        self._probe: Any = None

    def rows(self, group: str, topic: str, ticks: bool = False) -> list[Row]:
        """``ticks``: ``topic`` carries the worker's timer ticks (pages): a newest tick is not lag."""
        from confluent_kafka import Consumer, TopicPartition

        if self._probe is None:
            self._probe = Consumer({**client_config(self.bootstrap), "group.id": "heapsync-lag-probe",
                                    "enable.auto.commit": False, "enable.partition.eof": True})
        meta = self._probe.list_topics(topic, timeout=self.timeout).topics.get(topic)
        if meta is None or meta.error is not None:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(meta.partitions)]
        try:
            # as `heapsync status` reads them: the admin offsets call can crash the process (SIGSEGV)
            # while a group coordinator loads, e.g. on every failover
            committed = committed_offsets(self.bootstrap, group, tps, self.timeout)
        except LagUnknown:
            committed = {}
        lags = topic_lag(self._probe, topic, [tp.partition for tp in tps], committed, ticks, self.timeout)
        return [Row(group, topic, p, n) for p, (_, n) in lags.items()]

    def close(self) -> None:
        if self._probe is not None:
            self._probe.close()
            self._probe = None
