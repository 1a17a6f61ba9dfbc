"""A rebalance never lets an old owner's apply land after the new owner's newer deltas (issue 16 #6).

Driven step by step, without a broker: a scripted consumer runs each step inside ``consume`` (in
whichever thread polls, as librdkafka calls rebalance callbacks), and a sink applies deltas to one
shared list, blocking on an event where a test wants an apply to be in flight. Nothing waits on a
clock to order steps: each test awaits the event of the step it depends on. The only clock is the
revoke grace itself (tiny where a test wants it to run out, large where it must not).

The interleaving of the issue: D1 adds x, D2 removes x. The old owner is applying D1 when its
partition is revoked; the new owner then reads from the committed offset. Before the fix the revoke
returned at once with nothing committed, the new owner applied D1 and D2, and the old owner's D1
landed last: x stayed in the list.
"""

from __future__ import annotations

import asyncio
import queue
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from heapsync.contracts import Delta
from heapsync.settings import Settings
from sinks import runner as runner_module
from sinks.protocol import DeadLetters
from sinks.runner import SinkRunner

TOPIC = "deltas"
Effect = tuple[str, str]  # (owner, delta_id)


@dataclass
class World:
    """The downstream list both owners write to, the order their applies landed in, and the partition log."""

    members: set[str] = field(default_factory=set)
    effects: list[Effect] = field(default_factory=list)
    cancelled: list[Effect] = field(default_factory=list)
    log: dict[int, list[Delta]] = field(default_factory=lambda: defaultdict(list))
    committed: dict[int, int] = field(default_factory=dict)  # partition -> next offset to read, as committed


class FakeMessage:
    def __init__(self, partition: int, offset: int, delta: Delta) -> None:
        self._partition, self._offset, self._value = partition, offset, delta.model_dump_json().encode()

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return self._value

    def key(self) -> bytes:
        return b""


class FakeConsumer:
    """A consumer whose ``consume`` runs the next scripted step, in the calling thread."""

    def __init__(self, world: World, loop: asyncio.AbstractEventLoop) -> None:
        self.world, self.loop = world, loop
        self.steps: queue.Queue[Callable[[], list[FakeMessage]]] = queue.Queue()
        self.assigned: set[int] = set()
        self.callbacks: dict[str, Any] = {}

    # the part of confluent_kafka.Consumer the runner uses
    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        self.callbacks = callbacks

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        try:
            step = self.steps.get(timeout=timeout) if timeout > 0 else self.steps.get_nowait()
        except queue.Empty:
            return []
        return step()

    def commit(self, offsets: list[TopicPartition], asynchronous: bool = True) -> None:
        for tp in offsets:
            self.world.committed[tp.partition] = tp.offset

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(TOPIC, p) for p in sorted(self.assigned)]

    def pause(self, partitions: list[TopicPartition]) -> None:
        return None

    def resume(self, partitions: list[TopicPartition]) -> None:
        return None

    def close(self) -> None:
        if self.assigned:
            self.callbacks["on_revoke"](self, self.assignment())
            self.assigned.clear()

    # steps
    def assign(self, *partitions: int) -> asyncio.Event:
        """Assign partitions and hand out their records from the committed offset on."""
        def step() -> list[FakeMessage]:
            self.assigned.update(partitions)
            self.callbacks["on_assign"](self, [TopicPartition(TOPIC, p) for p in partitions])
            return [FakeMessage(p, o, d) for p in partitions
                    for o, d in enumerate(self.world.log[p]) if o >= self.world.committed.get(p, 0)]
        return self._run(step)

    def revoke(self, *partitions: int, before: Callable[[], object] = lambda: None) -> asyncio.Event:
        """Revoke partitions; the returned event is set once the callback has returned (the partitions are given up)."""
        def step() -> list[FakeMessage]:
            before()
            self.callbacks["on_revoke"](self, [TopicPartition(TOPIC, p) for p in partitions])
            self.assigned.difference_update(partitions)
            return []
        return self._run(step)

    def lose(self, *partitions: int) -> asyncio.Event:
        """The partitions were already given to another member (e.g. after a session timeout)."""
        def step() -> list[FakeMessage]:
            self.callbacks["on_lost"](self, [TopicPartition(TOPIC, p) for p in partitions])
            self.assigned.difference_update(partitions)
            return []
        return self._run(step)

    def _run(self, step: Callable[[], list[FakeMessage]]) -> asyncio.Event:
        done = asyncio.Event()

        def wrapped() -> list[FakeMessage]:
            try:
                return step()
            finally:
                self.loop.call_soon_threadsafe(done.set)
        self.steps.put(wrapped)
        return done


class ListSink:
    """Applies deltas to the world's list; deltas in ``hold`` wait for ``gate`` (an apply in flight)."""

    name = "fake"

    def __init__(self, owner: str, world: World, hold: set[str], concurrent: bool) -> None:
        self.owner, self.world, self.hold, self.concurrent = owner, world, hold, concurrent
        self.gate = asyncio.Event()
        self.started: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.applied: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def apply(self, delta: Delta) -> None:
        self.started[delta.delta_id].set()
        if delta.delta_id in self.hold:
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.world.cancelled.append((self.owner, delta.delta_id))
                raise
        self.world.members.update(delta.add)
        self.world.members.difference_update(delta.remove)
        self.world.effects.append((self.owner, delta.delta_id))
        self.applied[delta.delta_id].set()


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def send(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        self.sent.append((topic, value))

    def close(self, timeout: float = 10.0) -> int:
        return 0


@dataclass
class Owner:
    runner: SinkRunner
    sink: ListSink
    consumer: FakeConsumer
    task: asyncio.Task[None]

    async def stop(self) -> None:
        self.runner.stop()
        await asyncio.wait_for(self.task, 30)


@pytest.fixture
def start_owner(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Owner]]:
    owners: list[Owner] = []

    def start(name: str, world: World, *, grace: float, hold: set[str] = frozenset(),  # type: ignore[assignment]
              concurrent: bool = True) -> Owner:
        loop = asyncio.get_running_loop()
        consumer = FakeConsumer(world, loop)
        monkeypatch.setattr(runner_module, "Consumer", lambda config: consumer)
        sink = ListSink(name, world, set(hold), concurrent)
        settings = Settings(sink_revoke_grace_seconds=grace, sink_shutdown_grace_seconds=5, metrics_port=None)
        runner = SinkRunner(sink, settings, DeadLetters(FakeProducer(), "dlq", sink.name), group="g")  # type: ignore[arg-type]
        monkeypatch.setattr(runner, "load_progress", lambda timeout=60.0: 0)
        owner = Owner(runner, sink, consumer, asyncio.create_task(runner.run(install_signal_handlers=False)))
        owners.append(owner)
        return owner

    yield start
    for owner in owners:
        owner.runner.stop()


def delta(list_name: str = "L", add: tuple[str, ...] = (), remove: tuple[str, ...] = ()) -> Delta:
    return Delta(delta_id=uuid.uuid4().hex[:8], account="acme", segment_id="1", segment_name=list_name,
                 list_name=list_name, identity_field="email", kind="sync", chunk=1, chunks=1,
                 add=list(add), remove=list(remove))


async def wait(event: asyncio.Event) -> None:
    """Await a step's event; the timeout only turns a hang (the bug) into a failure."""
    await asyncio.wait_for(event.wait(), 30)


async def test_an_apply_outlasting_the_grace_is_cancelled_before_the_partition_is_given_up(
        start_owner: Callable[..., Owner]) -> None:
    world = World()
    d1, d2 = delta(add=("x",)), delta(remove=("x",))
    world.log[0] = [d1]  # the old owner has read D1 only when the rebalance starts
    old = start_owner("old", world, grace=0.05, hold={d1.delta_id})
    await wait(old.consumer.assign(0))
    await wait(old.sink.started[d1.delta_id])

    await wait(old.consumer.revoke(0))  # returns only once D1 is finished or cancelled
    assert 0 not in world.committed  # D1 was not applied: nothing may be committed

    world.log[0] = [d1, d2]
    new = start_owner("new", world, grace=5.0)
    await wait(new.consumer.assign(0))
    await wait(new.sink.applied[d2.delta_id])
    old.sink.gate.set()  # an old apply still running would land now, after the new owner's D2
    await old.stop()
    await new.stop()

    # before the fix: effects new:D1, new:D2, old:D1 and x stayed in the list
    assert world.effects == [("new", d1.delta_id), ("new", d2.delta_id)]
    assert world.members == set()  # D2 removed x, and nothing re-added it
    assert world.cancelled == [("old", d1.delta_id)]


async def test_an_apply_finishing_within_the_grace_is_committed_before_the_partition_is_given_up(
        start_owner: Callable[..., Owner]) -> None:
    world = World()
    d1, d2 = delta(add=("x",)), delta(remove=("x",))
    world.log[0] = [d1]
    old = start_owner("old", world, grace=60.0, hold={d1.delta_id})
    await wait(old.consumer.assign(0))
    await wait(old.sink.started[d1.delta_id])

    loop = asyncio.get_running_loop()
    # D1 is released once the revoke has begun: the revoke must wait for it, then commit past it
    await wait(old.consumer.revoke(0, before=lambda: loop.call_soon_threadsafe(old.sink.gate.set)))
    assert world.effects == [("old", d1.delta_id)]
    assert world.committed == {0: 1}

    world.log[0] = [d1, d2]
    new = start_owner("new", world, grace=5.0)
    await wait(new.consumer.assign(0))
    await wait(new.sink.applied[d2.delta_id])
    await old.stop()
    await new.stop()

    assert world.effects == [("old", d1.delta_id), ("new", d2.delta_id)]
    assert world.members == set() and world.cancelled == []


async def test_cancelling_a_revoked_chunk_does_not_drop_other_partitions_queued_behind_it(
        start_owner: Callable[..., Owner]) -> None:
    """A sink that is not concurrent runs every chunk in one lane, across partitions."""
    world = World()
    d1, d3 = delta("L", add=("x",)), delta("M", add=("y",))
    world.log[0], world.log[1] = [d1], [d3]
    old = start_owner("old", world, grace=0.05, hold={d1.delta_id}, concurrent=False)
    await wait(old.consumer.assign(0, 1))
    await wait(old.sink.started[d1.delta_id])

    await wait(old.consumer.revoke(0))
    await wait(old.sink.applied[d3.delta_id])  # next in the lane once D1 is cancelled
    await old.stop()

    assert world.cancelled == [("old", d1.delta_id)]
    assert world.effects == [("old", d3.delta_id)]
    assert world.committed == {1: 1}  # partition 1 committed past D3; partition 0 not at all


async def test_a_lost_partition_is_cancelled_at_once_and_not_committed(start_owner: Callable[..., Owner]) -> None:
    """Lost partitions already have a new owner: waiting would only let the old apply overlap with it."""
    world = World()
    d1, d2 = delta(add=("x",)), delta(remove=("x",))
    world.log[0] = [d1, d2]
    old = start_owner("old", world, grace=3600.0, hold={d1.delta_id})
    await wait(old.consumer.assign(0))
    await wait(old.sink.started[d1.delta_id])

    await wait(old.consumer.lose(0))  # returns without waiting for the grace
    old.sink.gate.set()
    await old.stop()

    assert world.cancelled == [("old", d1.delta_id)]
    assert world.effects == [] and world.committed == {}

