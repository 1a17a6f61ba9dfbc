"""The SinkRunner's delivery rules, in-process against the real broker, with a sink that records
what it is asked to apply: a blocked account does not hold up others, chunks of one list stay in
order, and the committed offset never passes a chunk that is not applied."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from heapsync.contracts import Delta
from heapsync.kafka import ensure_topics
from heapsync.settings import Settings
from heapsync_dev.broker import EmbeddedBroker
from sinks.protocol import DeadLetters, DeltaSink
from sinks.runner import make_runner

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


class ListSink:
    """Applies deltas to a shared list; a held delta waits for ``gate``."""

    name = "recording"

    def __init__(self, owner: str, effects: list[tuple[str, str]], members: set[str], hold: set[str]) -> None:
        self.owner, self.effects, self.members, self.hold = owner, effects, members, hold
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def apply(self, d: Delta) -> None:
        if d.delta_id in self.hold:
            self.started.set()
            await self.gate.wait()
        self.members.update(d.add)
        self.members.difference_update(d.remove)
        self.effects.append((self.owner, d.delta_id))


async def test_a_real_rebalance_waits_for_the_chunk_in_flight_before_the_partition_moves(broker: EmbeddedBroker) -> None:
    """confluent-kafka calls the revoke callback inside consume(), in the sink's polling thread: it waits there
    while the event loop finishes the chunk, commits past it, and only then lets the group go on (issue 16 #6)."""
    settings = Settings(kafka_bootstrap=broker.bootstrap, topic_prefix=f"r{uuid.uuid4().hex[:8]}",
                        topic_partitions=1, sink_revoke_grace_seconds=60)
    ensure_topics(settings)
    group = f"{settings.topic_prefix}-g"
    effects: list[tuple[str, str]] = []
    members: set[str] = set()
    d1 = Delta(delta_id="d1", account="acme", segment_id="1", segment_name="L", list_name="L",
               identity_field="email", kind="sync", chunk=1, chunks=1, add=["x"])
    d2 = d1.model_copy(update={"delta_id": "d2", "add": [], "remove": ["x"]})
    sinks: list[ListSink] = []

    def factory(owner: str, hold: set[str]) -> Callable[[DeadLetters], DeltaSink]:
        def make(dl: DeadLetters) -> DeltaSink:
            sinks.append(ListSink(owner, effects, members, hold))
            return sinks[-1]
        return make

    old = make_runner(factory("old", {"d1"}), settings, group=group)
    revoking = asyncio.Event()
    loop = asyncio.get_running_loop()
    on_revoke = old._on_revoke

    def spy(consumer: Any, partitions: Any) -> None:
        loop.call_soon_threadsafe(revoking.set)
        on_revoke(consumer, partitions)

    old._on_revoke = spy  # type: ignore[method-assign]
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    for d in (d1, d2):
        producer.produce(settings.topics.deltas, d.model_dump_json().encode(), key=b"acme:L")
    producer.flush(10)
    tasks = [asyncio.create_task(old.run(install_signal_handlers=False))]
    new = None
    try:
        await asyncio.wait_for(sinks[0].started.wait(), 60)  # D1 in flight at the old owner, D2 queued behind
        new = make_runner(factory("new", set()), settings, group=group)
        tasks.append(asyncio.create_task(new.run(install_signal_handlers=False)))
        await asyncio.wait_for(revoking.wait(), 60)  # the new member joined: the old one is asked to give up
        sinks[0].gate.set()  # D1 finishes while the revoke waits for it
        assert await wait_until(lambda: ("old", "d2") in effects or ("new", "d2") in effects, 60), effects
    finally:
        for runner in (old, new):
            if runner is not None:
                runner.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)  # both stopped: whatever was in flight has landed
    assert [d for _, d in effects] == ["d1", "d2"], effects  # D1 once, before D2, whoever got the partition
    assert members == set()
