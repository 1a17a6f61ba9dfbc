"""The SinkRunner's delivery rules, in-process against the real broker, with a sink that records
what it is asked to apply: a blocked account does not hold up others, chunks of one list stay in
order, and the committed offset never passes a chunk that is not applied."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Producer

from heapsync.broker import EmbeddedBroker
from heapsync.contracts import Delta
from heapsync.kafka import ensure_topics
from heapsync.settings import Settings
from sinks.base import DeadLetters, DeltaSink, make_runner

pytestmark = pytest.mark.integration


class RecordingSink:
    name = "recording"

    def __init__(self) -> None:
        self.applied: list[tuple[str, str, int]] = []  # (account, list, chunk)
        self.release = asyncio.Event()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def apply(self, delta: Delta) -> None:
        if delta.account == "blocked":
            await self.release.wait()
        await asyncio.sleep(0.01)
        self.applied.append((delta.account, delta.list_name, delta.chunk))


def delta(account: str, list_name: str, chunk: int = 1, chunks: int = 1, delta_id: str | None = None) -> Delta:
    return Delta(delta_id=delta_id or uuid.uuid4().hex, account=account, segment_id="1", segment_name=list_name,
                 list_name=list_name, identity_field="email", kind="sync", chunk=chunk, chunks=chunks,
                 add=[f"u{chunk}@x.co"])


async def wait_until(pred, timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.1)
    return bool(pred())


async def test_blocked_account_holds_only_its_lane_and_the_commit_point(broker: EmbeddedBroker, tmp_path: Path) -> None:
    settings = Settings(kafka_bootstrap=broker.bootstrap, topic_prefix=f"r{uuid.uuid4().hex[:8]}",
                        topic_partitions=1, sink_commit_interval_seconds=0.1)
    ensure_topics(settings)
    sinks: list[RecordingSink] = []

    def factory(dl: DeadLetters) -> DeltaSink:
        sinks.append(RecordingSink())
        return sinks[-1]

    runner = make_runner(factory, settings, group=f"{settings.topic_prefix}-g")
    sink = sinks[0]
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    big = uuid.uuid4().hex
    msgs = [delta("blocked", "X")] + [delta("ok", "A", n, 4, big) for n in range(1, 5)] + \
           [delta("ok", "B"), delta("ok", "A"), b"not a delta"]
    for m in msgs:
        producer.produce(settings.topics.deltas, m if isinstance(m, bytes) else m.model_dump_json().encode())
    producer.flush(10)

    task = asyncio.create_task(runner.run(install_signal_handlers=False))
    try:
        assert await wait_until(lambda: len(sink.applied) == 6), sink.applied
        # everything but the blocked account went through, list A in offset order
        # (the four chunks of one delta may run together; the later delta on A comes after them)
        a_chunks = [c for a, lst, c in sink.applied if lst == "A"]
        assert sorted(a_chunks[:4]) == [1, 2, 3, 4] and a_chunks[4] == 1
        progress = next(iter(runner._progress.values()))
        await asyncio.sleep(0.3)
        assert progress.committed is None  # offset 0 (blocked) is not applied: nothing may be committed

        sink.release.set()
        assert await wait_until(lambda: len(sink.applied) == 7)
        assert await wait_until(lambda: progress.committed == len(msgs))
        assert runner.applied >= {d.chunk_key for d in msgs if isinstance(d, Delta)}
    finally:
        runner.stop()
        await asyncio.wait_for(task, 30)
