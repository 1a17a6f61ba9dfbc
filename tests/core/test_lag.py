"""Reading whether a partition's newest record is the worker's timer tick (heapsync/lag.py), with a fake
consumer: all lagging partitions in one assignment, within the caller's timeout."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError

from heapsync import lag
from heapsync.contracts import TICK


class FakeError:
    def __init__(self, code: int) -> None:
        self._code = code

    def code(self) -> int:
        return self._code


class FakeMessage:
    def __init__(self, partition: int, offset: int, value: bytes | None, error: FakeError | None = None) -> None:
        self._partition, self._offset, self._value, self._error = partition, offset, value, error

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes | None:
        return self._value

    def error(self) -> FakeError | None:
        return self._error


class FakeConsumer:
    """A partition's records by offset; ``consume`` hands out every assigned partition's records from the
    assigned offset on, then that partition's end (as with ``enable.partition.eof``)."""

    def __init__(self, records: dict[int, dict[int, bytes]]) -> None:
        self.records = records
        self.assigned: list[list[tuple[str, int, int]]] = []
        self.consume_timeouts: list[float] = []
        self._pending: list[FakeMessage] = []
        self.unassigned = 0

    def assign(self, tps: list[Any]) -> None:
        self.assigned.append([(tp.topic, tp.partition, tp.offset) for tp in tps])
        for tp in tps:
            for offset, value in sorted(self.records.get(tp.partition, {}).items()):
                if offset >= tp.offset:
                    self._pending.append(FakeMessage(tp.partition, offset, value))
            self._pending.append(FakeMessage(tp.partition, -1, None, FakeError(KafkaError._PARTITION_EOF)))

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[FakeMessage]:
        self.consume_timeouts.append(timeout)
        out, self._pending = self._pending[:num_messages], self._pending[num_messages:]
        return out

    def unassign(self) -> None:
        self.unassigned += 1
        self._pending = []


def test_the_newest_records_of_all_lagging_partitions_are_read_with_one_assignment() -> None:
    """`heapsync status` read one partition at a time, each with its own 5 s: up to 5 s more per
    lagging pages partition. Now one assignment and one read for all of them."""
    consumer = FakeConsumer({
        0: {3: b"{}", 4: TICK},  # newest is a tick
        1: {0: TICK, 1: b"{}"},  # newest is a page
        2: {7: b"{}"},  # offset 8 (below the high watermark 9) holds no readable record: a later one is read
        3: {},  # nothing readable at all (a transaction marker): answered by its end, not waited out
    })
    ticks = lag.newest_ticks(consumer, "pages", {0: 5, 1: 2, 2: 9, 3: 4, 4: 0}, timeout=30.0)
    assert ticks == {0}
    assert consumer.assigned == [[("pages", 0, 4), ("pages", 1, 1), ("pages", 2, 8), ("pages", 3, 3)]]
    assert consumer.unassigned == 1
    assert len(consumer.consume_timeouts) == 1  # every partition answered: no waiting for the timeout


def test_a_partition_not_answered_in_the_callers_timeout_counts_its_newest_record() -> None:
    class Silent(FakeConsumer):
        def consume(self, num_messages: int = 1, timeout: float = -1) -> list[FakeMessage]:
            self.consume_timeouts.append(timeout)
            return []

    consumer = Silent({0: {0: TICK}})
    assert lag.newest_ticks(consumer, "pages", {0: 1}, timeout=0.0) == set()
    assert consumer.consume_timeouts == []
    assert consumer.unassigned == 1
    assert lag.newest_ticks(consumer, "pages", {}, timeout=30.0) == set()
    assert consumer.assigned == [[("pages", 0, 0)]]  # nothing lagging: nothing assigned


class FakeProbe(FakeConsumer):
    def __init__(self, records: dict[int, dict[int, bytes]], ends: dict[int, tuple[int, int]]) -> None:
        super().__init__(records)
        self.ends = ends
        self.timeouts: list[float] = []

    def list_topics(self, topic: str, timeout: float) -> Any:
        class Meta:
            error = None
            partitions = dict.fromkeys(self.ends)

        class Topics:
            topics = {topic: Meta()}

        return Topics()

    def get_watermark_offsets(self, tp: Any, timeout: float) -> tuple[int, int]:
        self.timeouts.append(timeout)
        return self.ends[tp.partition]


@pytest.mark.parametrize("ticks", [True, False])
def test_the_probe_reads_the_lagging_partitions_newest_records_once_within_its_timeout(
        monkeypatch: pytest.MonkeyPatch, ticks: bool) -> None:
    probe = FakeProbe({0: {4: TICK}, 1: {1: TICK}, 2: {2: TICK}}, {0: (0, 5), 1: (0, 2), 2: (0, 3)})
    monkeypatch.setattr(lag, "committed_offsets", lambda bootstrap, group, tps, timeout: {0: 4, 1: 0, 2: 3})
    reader = lag.LagProbe("127.0.0.1:1", timeout=7.0)
    reader._probe = probe
    rows = reader.rows("g", "pages", ticks=ticks)
    assert {r.partition: r.lag for r in rows} == ({0: 0, 1: 1, 2: 0} if ticks else {0: 1, 1: 2, 2: 0})
    assert probe.assigned == ([[("pages", 0, 4), ("pages", 1, 1)]] if ticks else [])  # partition 2 is not behind
    assert all(t <= 7.0 for t in probe.consume_timeouts + probe.timeouts)
