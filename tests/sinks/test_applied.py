"""The sink's memory of applied chunks is bounded like the progress topic it mirrors (issue 16 #10).

Before, ``SinkRunner.applied`` was a set that only grew for the life of the process, though the
progress topic forgets a record after the topics' retention.
"""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, TIMESTAMP_NOT_AVAILABLE
from hypothesis import given
from hypothesis import strategies as st

from heapsync.contracts import Delta
from heapsync.settings import Settings
from sinks import runner as runner_module
from sinks.offsets import AppliedChunks, record_time
from sinks.protocol import DeadLetters
from sinks.runner import SinkRunner

DAY = 86_400.0


def test_keys_expire_at_the_retention_and_the_oldest_go_beyond_the_cap() -> None:
    applied = AppliedChunks(max_age_seconds=DAY, max_entries=3)
    applied.add("a", at=0, now=0)
    applied.add("b", at=10, now=10)
    assert "a" in applied and len(applied) == 2
    applied.add("c", at=DAY + 5, now=DAY + 5)  # "a" is older than the retention now; "b" is not
    assert set(applied) == {"b", "c"}
    applied.expire(now=DAY + 11)
    assert set(applied) == {"c"}
    for key in "defg":
        applied.add(key, at=DAY + 20, now=DAY + 20)
    assert set(applied) == {"e", "f", "g"}  # the cap keeps the newest
    applied.add("e", at=DAY + 21, now=DAY + 21)  # seen again: now the newest
    applied.add("h", at=DAY + 22, now=DAY + 22)
    assert set(applied) == {"e", "g", "h"}
    applied.discard("g")  # a tombstone in the progress topic
    assert set(applied) == {"e", "h"}
    applied.add("old", at=0, now=DAY + 22)  # a record the topic itself is about to delete
    assert "old" not in applied


@given(st.lists(st.tuples(st.sampled_from("abcdefghij"), st.integers(0, 50)), max_size=60),
       st.integers(1, 6), st.integers(1, 20))
def test_what_is_kept_is_the_newest_keys_within_the_retention(adds: list[tuple[str, int]], cap: int, age: int) -> None:
    applied = AppliedChunks(max_age_seconds=age, max_entries=cap)
    now = 0
    last_seen: dict[str, int] = {}
    order: list[str] = []
    for key, step in adds:
        now += step
        applied.add(key, at=now, now=now)
        last_seen[key] = now
        order = [k for k in order if k != key] + [key]
    assert len(applied) <= cap
    assert all(now - last_seen[k] <= age for k in applied)
    fresh = [k for k in order if now - last_seen[k] <= age]
    assert set(applied) == set(fresh[-cap:])


def test_a_progress_record_is_dated_by_its_kafka_timestamp() -> None:
    assert record_time(TIMESTAMP_CREATE_TIME, 1_700_000_000_000, now=5.0) == 1_700_000_000.0
    assert record_time(TIMESTAMP_NOT_AVAILABLE, -1, now=5.0) == 5.0


class _Producer:
    async def send(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        return None

    def close(self, timeout: float = 10.0) -> int:
        return 0


class _Sink:
    name = "fake"

    async def start(self) -> None:
        return None

    async def apply(self, delta: Delta) -> None:
        return None

    async def close(self) -> None:
        return None


def _delta() -> Delta:
    return Delta(delta_id=uuid.uuid4().hex, account="acme", segment_id="1", segment_name="L", list_name="L",
                 identity_field="email", kind="sync", chunk=1, chunks=1, add=["x"])


async def test_the_runner_forgets_applied_chunks_past_the_cap_and_the_retention(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1_000_000.0]
    monkeypatch.setattr(runner_module.time, "time", lambda: clock[0])
    settings = Settings(sink_applied_max_chunks=100, topic_retention_days=1)
    runner = SinkRunner(_Sink(), settings, DeadLetters(_Producer(), "dlq", "fake"))  # type: ignore[arg-type]
    deltas = [_delta() for _ in range(1000)]
    for d in deltas:
        await runner.record_applied(d, None)
    assert len(runner.applied) == 100
    assert deltas[-1].chunk_key in runner.applied and deltas[0].chunk_key not in runner.applied

    clock[0] += DAY + 1  # a day later the progress topic has deleted those records: so has the runner
    fresh = _delta()
    await runner.record_applied(fresh, None)
    assert set(runner.applied) == {fresh.chunk_key}
