"""The removal rail inside the sink runner, without a broker: a fake producer and a fake lists tail.

Covers the runner's own rules (review of issue 14): nothing is applied before the lists topic is
read to its end, a replayed copy of a held delta is its own hold, an uncounted list's drain is held."""

from __future__ import annotations

import asyncio

import pytest

from heapsync.contracts import Delta, HeldChunk, HoldDecision
from heapsync.held import decision_key, hold_id_of
from heapsync.settings import RemovalRail, Settings
from sinks.lists_tail import ListsTail
from sinks.offsets import Entry, PartitionProgress
from sinks.protocol import DeadLetters
from sinks.runner import RailSyncError, SinkRunner, _Item
from tests.sink_helpers import make_delta


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes]] = []

    async def send(self, topic: str, value: bytes | None, key: bytes) -> None:
        await asyncio.sleep(0)  # a real send hands control back to the loop: other chunks run meanwhile
        self.sent.append((topic, value, key))


class RecordingSink:
    name = "cordial"

    def __init__(self) -> None:
        self.applied: list[str] = []

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def apply(self, delta: Delta) -> None:
        self.applied.append(delta.chunk_key)


class FakeTail:
    def __init__(self, caught_up: bool) -> None:
        self.caught_up = caught_up
        self.calls = 0

    async def sync(self, timeout: float = 30.0) -> bool:
        self.calls += 1
        return self.caught_up

    def ensure_alive(self) -> bool:
        return False


RAIL = RemovalRail(max_removal_fraction=0.5, hold_drains=True)


def runner(rail: RemovalRail = RAIL) -> tuple[SinkRunner, RecordingSink]:
    sink = RecordingSink()
    dead = DeadLetters(FakeProducer(), "dlq", "cordial")  # type: ignore[arg-type]
    return SinkRunner(sink, Settings(), dead, rail_for=lambda d: rail), sink  # type: ignore[arg-type]


def item(delta: Delta) -> _Item:
    return _Item(None, delta, PartitionProgress("deltas", 0), Entry(0))


async def test_a_chunk_is_never_applied_while_the_lists_topic_cannot_be_read_to_its_end() -> None:
    r, sink = runner()
    tail = FakeTail(caught_up=False)
    r._tail = tail  # type: ignore[assignment]
    r._resync_after_assign()
    with pytest.raises(RailSyncError, match="could not be read to its end"):
        await r._process(item(make_delta("L", add=["a@x.io"])))
    assert sink.applied == []
    assert tail.calls > 1  # retried before giving up


async def test_a_chunk_is_applied_once_the_lists_topic_caught_up() -> None:
    r, sink = runner()
    r._tail = FakeTail(caught_up=True)  # type: ignore[assignment]
    r._resync_after_assign()
    d = make_delta("L", add=["a@x.io"])
    await r._process(item(d))
    assert sink.applied == [d.chunk_key]


def test_a_dead_tail_thread_is_started_again_and_catches_up() -> None:
    runs: list[int] = []

    class Tail(ListsTail):
        def _run(self) -> None:
            runs.append(1)
            if len(runs) == 1:
                return  # the first thread dies (as on an unexpected error)
            while not self._stop.is_set():
                with self._lock:
                    requests, self._requests = self._requests, []
                for future in requests:
                    self._resolve(future)
                self._stop.wait(0.01)

    async def scenario() -> bool:
        tail = Tail("127.0.0.1:1", "lists", lambda batch: None)
        tail.start(asyncio.get_running_loop())
        assert tail._thread is not None
        tail._thread.join(5)
        assert not tail.alive()
        try:
            return await tail.sync(timeout=5)
        finally:
            await asyncio.get_running_loop().run_in_executor(None, tail.stop)

    assert asyncio.run(scenario()) is True
    assert len(runs) == 2


def held_chunk(delta: Delta, role: str, seq: int) -> HeldChunk:
    return HeldChunk(sink="cordial", role=role, seq=seq, reason="x" if role == "held" else "", partition=0, offset=seq,
                     delta=delta)


@pytest.mark.parametrize("action", ["release", "discard"])
async def test_a_decision_on_a_held_delta_leaves_its_replayed_copy_in_its_place(action: str) -> None:
    """Queue [D1 held, D2 waiting, D1@replay waiting]: deciding D1 touches D1 only; D2 comes next,
    and the replay (a drain, held by hold_drains) becomes the list's new hold."""
    r, sink = runner()
    d1 = make_delta("L", kind="drain", delta_id="d1" * 16)
    d2 = make_delta("L", add=["b@x.io"], delta_id="d2" * 16)
    replay = d1.model_copy(update={"replay_id": "r1"})
    for n, (d, role) in enumerate([(d1, "held"), (d2, "waiting"), (replay, "waiting")]):
        r.lists.put(held_chunk(d, role, n))
    before = r.lists.holds()
    r.lists.feed(decision_key("cordial", d1.delta_id), HoldDecision(
        sink="cordial", delta_id=d1.delta_id, account="acme", list_name="L", action=action).model_dump_json().encode())
    await r._resolve("acme:L")
    assert sink.applied == ([d1.chunk_key, d2.chunk_key] if action == "release" else [d2.chunk_key])
    assert [(row.get("hold"), row["waiting_deltas"]) for row in before] == [
        (d1.delta_id, [d2.delta_id, f"{d1.delta_id}@r1"])]  # the replay waits as a delta of its own
    rows = r.lists.holds()
    assert [(row["hold"], row["decision"]) for row in rows] == [(hold_id_of(replay), None)]
    assert replay.chunk_key not in r.applied  # a discard of the original does not discard its replay


async def test_a_drain_of_a_list_the_sink_never_counted_is_held() -> None:
    r, sink = runner(RemovalRail(max_removal_fraction=0.5))
    drain = make_delta("Old", kind="drain")
    await r._process(item(drain))
    assert sink.applied == []
    assert [row["hold"] for row in r.lists.holds()] == [drain.delta_id]
    r.lists.counts[("acme", "Counted")] = 0  # counted and empty: a drain is harmless
    counted = make_delta("Counted", kind="drain")
    await r._process(item(counted))
    assert sink.applied == [counted.chunk_key]


async def test_the_rails_per_list_locks_are_dropped_once_no_chunk_holds_or_waits_on_them() -> None:
    """A sink serving many lists over months must not keep a lock per list it ever saw; two chunks of one
    delta still decide one at a time (the second sees the first held and waits behind it)."""
    r, sink = runner()
    lists = [make_delta(f"L{n}", add=[f"a{n}@x.io"]) for n in range(500)]
    await asyncio.gather(*(r._process(item(d)) for d in lists))
    assert len(sink.applied) == 500
    assert r._list_locks == {}
    first = make_delta("Mass", remove=["a@x.io"], delta_id="m" * 32, chunks=2)  # an uncounted list: held
    second = make_delta("Mass", remove=["b@x.io"], delta_id="m" * 32, chunk=2, chunks=2)
    await asyncio.gather(r._process(item(first)), r._process(item(second)))
    assert sink.applied[500:] == []
    assert [(c.delta.chunk, c.role) for c in r.lists.queue(("acme", "Mass"))] == [(1, "held"), (2, "waiting")]
    assert r._list_locks == {}


async def test_a_lists_lock_makes_later_chunks_wait_for_the_first_ones_hold_and_is_dropped_after() -> None:
    """Chunk 1 of a delta is held while chunks 2-4 of it already wait on the list's lock: they must see
    the hold once it is written (and wait behind it), not be applied; a waiter cancelled meanwhile leaves
    no lock behind, and neither does a chunk that comes after the lock was dropped."""
    r, sink = runner()
    gate = asyncio.Event()
    write_held = r._write_held

    async def slow_write_held(chunk: HeldChunk) -> None:
        if chunk.delta.chunk == 1:
            await gate.wait()  # the hold of chunk 1 is on its way to the lists topic
        await write_held(chunk)

    r._write_held = slow_write_held  # type: ignore[method-assign]
    chunks = [make_delta("Mass", remove=[f"{n}@x.io"], delta_id="m" * 32, chunk=n, chunks=4) for n in (1, 2, 3, 4)]
    tasks = [asyncio.create_task(r._process(item(d))) for d in chunks]
    for _ in range(20):
        await asyncio.sleep(0)
    entry = r._list_locks["acme:Mass"]
    assert entry.users == 4 and entry.lock.locked()
    tasks[3].cancel()  # chunk 4 gives up while it waits on the lock (e.g. its partition is revoked)
    with pytest.raises(asyncio.CancelledError):
        await tasks[3]
    assert entry.users == 3
    gate.set()
    await asyncio.gather(*tasks[:3])
    assert sink.applied == []
    assert [(c.delta.chunk, c.role) for c in r.lists.queue(("acme", "Mass"))] == [
        (1, "held"), (2, "waiting"), (3, "waiting")]
    assert r._list_locks == {}
    await r._process(item(chunks[3]))  # chunk 4 again (redelivered), after the lock was dropped
    assert sink.applied == []
    assert [(c.delta.chunk, c.role) for c in r.lists.queue(("acme", "Mass"))] == [
        (1, "held"), (2, "waiting"), (3, "waiting"), (4, "waiting")]
    assert r._list_locks == {}
