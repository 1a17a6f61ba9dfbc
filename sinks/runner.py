"""The Kafka loop that runs a sink: consume the deltas topic, apply, record, commit.

A downstream consumer is one class implementing :class:`sinks.protocol.DeltaSink`, run by
:class:`SinkRunner` (built with :func:`make_runner`) with its own consumer group,
so it keeps its own progress and can be replayed on its own.

How the loop keeps at-least-once without letting one slow account block the rest:

- Chunks go into *lanes*, one per (account, list), each applied in offset order;
  lanes run concurrently. A paused account only stalls its own lanes.
- Consecutive chunks of one delta touch disjoint ids (the Delta contract), so a
  lane applies up to ``sink_lane_parallel_chunks`` of them at once.
- Offsets are committed per partition only up to the lowest chunk not yet applied
  (:mod:`sinks.offsets`), so a crash redoes at most what was unfinished.
- After a chunk is applied an :class:`AppliedChunk` is written to the compacted
  progress topic; on start the runner reads it back and skips chunks it already
  applied (a repeat after a crash or rebalance), and ``heapsync status`` shows it.
- Polling pauses while ``sink_max_inflight_messages`` chunks or ``sink_max_inflight_ids`` operations are
  unfinished, and one poll never takes more than what is left of either: the sink's memory is bounded by
  these settings, not by the size of a sync (a 10-million-user delta is 2,000 chunks; only a few are held).
- Rebalance: the consumer is polled in a thread of its own, so the revoke callback (which
  confluent-kafka calls from inside ``consume``, in the polling thread) can wait while the event
  loop finishes the revoked partitions' in-flight chunks, for at most ``sink_revoke_grace_seconds``;
  what is not finished by then is cancelled. Only then are the applied chunks committed and the
  partitions given up, so an old owner's apply never lands after the new owner's newer deltas.
  A lost partition (already someone else's) is cancelled at once and not committed.
- The removal rail (:mod:`heapsync.held`), when the runner is given ``rail_for``: a per-list member
  count is kept from what was applied, and a delta that removes too much is held on the compacted
  lists topic instead of applied; later chunks of that list wait there behind it, in order, until
  ``heapsync held release|discard`` decides (the decision is carried out in the list's lane).
- SIGTERM: stop reading, let running chunks finish for ``sink_shutdown_grace_seconds``,
  abandon the rest (not committed: redone on restart), commit, exit 0.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition
from pydantic import ValidationError

from heapsync import held, lag
from heapsync.contracts import AppliedChunk, Delta, HeldChunk, HoldDecision, ListCount, list_key, progress_key
from heapsync.kafka import client_config
from heapsync.producer import ResilientProducer
from heapsync.settings import RemovalRail, Settings
from sinks import metrics
from sinks.lists_tail import Batch, ListsTail
from sinks.offsets import AppliedChunks, Entry, PartitionProgress, record_time
from sinks.protocol import ChunkResult, DeadLetters, DeltaSink, send_retrying

log = logging.getLogger("heapsync.sink")


@dataclass
class _ListLock:
    """The rail's lock of one list and how many chunks hold or wait on it (dropped at 0)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


@dataclass
class _Item:
    """One message on its way through a lane."""

    msg: Message | None
    delta: Delta | None
    progress: PartitionProgress
    entry: Entry
    error: ValidationError | None = None
    task: asyncio.Task[None] | None = None  # while it is being applied
    resolve: str | None = None  # not a message: carry out decided holds of this lane's list

    @property
    def partition_key(self) -> tuple[str, int]:
        return self.progress.topic, self.progress.partition

    @property
    def group(self) -> str | None:
        """Chunks with the same group may run together: chunks of one sync delta."""
        if self.resolve is not None:
            return None
        return self.delta.delta_id if self.delta is not None and self.delta.kind == "sync" else None


@dataclass
class _Lane:
    queue: deque[_Item] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None
    running: list[_Item] = field(default_factory=list)


def operations_in(delta: Delta | None) -> int:
    """Operations a queued item holds (at least 1): what ``sink_max_inflight_ids`` counts."""
    return max(1, len(delta.add) + len(delta.remove)) if delta is not None else 1


def poll_budget(inflight: int, inflight_ids: int, max_chunks: int, max_ids: int, chunk_size: int,
                batch: int = 500) -> int:
    """How many messages the next poll may take: what is left of both bounds (one chunk counted as
    ``chunk_size`` operations, the most it holds), at least 1 and at most ``batch``.

    Pure, so the bound is tested directly: a full poll of 500 chunks of 5,000 ids would otherwise add
    2.5 million ids at once, whatever the in-flight limits say."""
    by_chunks = max_chunks - inflight
    by_ids = (max_ids - inflight_ids) // max(1, chunk_size)
    return max(1, min(batch, by_chunks, by_ids))


def should_pause(paused: bool, inflight: int, inflight_ids: int, max_chunks: int, max_ids: int) -> bool:
    """Whether polling stays (or becomes) paused: above either bound pause; resume below half of both."""
    if not paused:
        return inflight >= max_chunks or inflight_ids >= max_ids
    return not (inflight < max(1, max_chunks // 2) and inflight_ids < max(1, max_ids // 2))


def lane_key(delta: Delta | None) -> str:
    """One lane per list (the deltas topic's key, ``heapsync.contracts.list_key``)."""
    return list_key(delta.account, delta.list_name) if delta is not None else "~unreadable"


class SinkRunner:
    """Consumes the deltas topic for one sink; see the module doc for the delivery rules."""

    def __init__(self, sink: DeltaSink, settings: Settings, dead_letters: DeadLetters, *,
                 group: str | None = None, rail_for: Callable[[Delta], RemovalRail] | None = None) -> None:
        self.sink = sink
        self.settings = settings
        self.group = group or f"heapsync-sink-{sink.name}"
        self.dead_letters = dead_letters
        self.producer = dead_letters.producer
        self.applied = AppliedChunks(settings.topic_retention_days * 86_400, settings.sink_applied_max_chunks)
        self._stopping = asyncio.Event()
        self._draining = False
        self._lanes: dict[str, _Lane] = {}
        self._progress: dict[tuple[str, int], PartitionProgress] = {}
        self._inflight = 0
        self._inflight_ids = 0
        self._ops: dict[int, int] = {}  # id(item) -> operations counted when it was queued
        self._paused = False
        self._failure: BaseException | None = None
        self._consumer: Consumer | None = None
        self._concurrent = bool(getattr(sink, "concurrent", True))
        self._parallel = settings.sink_lane_parallel_chunks if self._concurrent else 1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._lag_series: set[tuple[str, str, str]] = set()
        # the removal rail (heapsync/held.py); None: no counts, nothing held (e.g. the archive sink)
        self.rail_for = rail_for
        self.lists = held.ListsState(sink.name)
        self._writer = uuid.uuid4().hex
        self._tail: ListsTail | None = None
        self._rail_sync: asyncio.Task[bool] | None = None
        self._list_locks: dict[str, _ListLock] = {}  # lists with a chunk in the rail's decision only
        self._resolving: set[str] = set()
        self._held_series: set[str] = set()

    def stop(self) -> None:
        self._stopping.set()

    # -- progress topic ------------------------------------------------------

    def load_progress(self, timeout: float = 60.0) -> int:
        """Read the compacted progress topic to its end; returns how many applied chunks are known.

        Uses partition EOF events rather than ListOffsets (which some brokers answer slowly)."""
        topic = self.settings.topics.sink_progress
        consumer = Consumer({
            **client_config(self.settings.kafka_bootstrap),
            "group.id": f"{self.group}-progress-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        })
        prefix = progress_key(self.sink.name, "")
        try:
            meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
            if meta is None or meta.error is not None or not meta.partitions:
                return 0
            parts = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions]
            consumer.assign(parts)
            at_end: set[int] = set()
            deadline = time.monotonic() + timeout
            while len(at_end) < len(parts) and time.monotonic() < deadline:
                for msg in consumer.consume(1000, 0.5):
                    if (error := msg.error()) is not None:
                        partition = msg.partition()
                        if error.code() == KafkaError._PARTITION_EOF and partition is not None:
                            at_end.add(partition)
                        continue
                    key = (msg.key() or b"").decode()
                    if key.startswith(prefix):
                        if msg.value() is None:
                            self.applied.discard(key[len(prefix):])
                        else:
                            now = time.time()
                            self.applied.add(key[len(prefix):], record_time(*msg.timestamp(), now), now)
            if len(at_end) < len(parts):
                log.warning("progress topic not read to its end; repeats may be applied again (harmless)",
                            extra={"partitions_read": len(at_end), "partitions": len(parts)})
        finally:
            consumer.close()
        return len(self.applied)

    async def record_applied(self, delta: Delta, result: ChunkResult | None) -> None:
        record = AppliedChunk(
            sink=self.sink.name, chunk_key=delta.chunk_key, delta_id=delta.delta_id, chunk=delta.chunk,
            chunks=delta.chunks, account=delta.account, list_name=delta.list_name, segment_id=delta.segment_id,
            sync_task_id=delta.sync_task_id, kind=delta.kind, complete=delta.complete, adds=len(delta.add),
            removes=len(delta.remove), dead_lettered=result.dead_lettered if result else 0,
        )
        await send_retrying(self.producer, self.settings.topics.sink_progress, record.model_dump_json().encode(),
                             progress_key(self.sink.name, delta.chunk_key).encode())
        now = time.time()
        self.applied.add(delta.chunk_key, now, now)

    # -- one message -----------------------------------------------------------

    @staticmethod
    def decode(msg: Message) -> tuple[Delta | None, ValidationError | None]:
        try:
            return Delta.model_validate_json(msg.value() or b""), None
        except ValidationError as exc:
            return None, exc

    async def _dead_letter_unreadable(self, msg: Message, error: ValidationError | None) -> None:
        log.error("unreadable delta; dead-lettered", extra={"partition": msg.partition(), "offset": msg.offset()})
        metrics.CHUNKS.labels(self.sink.name, "unreadable").inc()
        await self.dead_letters.send("unreadable delta", {
            "partition": msg.partition(), "offset": msg.offset(),
            "errors": error.errors(include_input=False, include_url=False) if error else [],
            "value": (msg.value() or b"").decode("utf-8", "replace"),
        })

    async def _process(self, item: _Item) -> None:
        if item.resolve is not None:
            self._resolving.discard(item.resolve)  # a new decision may queue another from now on
        if item.progress.revoked:
            return  # the partition moved to another consumer, which reads it from the committed offset
        if self._rail_sync is not None:
            await asyncio.shield(self._rail_sync)  # a new owner knows the list's holds before it applies
        if item.resolve is not None:
            await self._resolve(item.resolve)
            return
        delta = item.delta
        if delta is None:
            assert item.msg is not None
            await self._dead_letter_unreadable(item.msg, item.error)
        elif delta.chunk_key in self.applied:
            metrics.CHUNKS.labels(self.sink.name, "repeated").inc()
            log.info("chunk already applied; skipped", extra={"delta_id": delta.delta_id, "chunk": delta.chunk,
                                                              "account": delta.account})
        elif self.lists.is_pending(delta.chunk_key):
            metrics.CHUNKS.labels(self.sink.name, "repeated").inc()
            log.info("chunk already held; skipped", extra={"delta_id": delta.delta_id, "chunk": delta.chunk,
                                                           "account": delta.account})
        elif self.rail_for is None or not await self._hold_if_needed(item, delta):
            await self._apply(delta)
        item.entry.done = True

    async def _apply(self, delta: Delta) -> None:
        started = time.monotonic()
        result = await self.sink.apply(delta)
        await self.record_applied(delta, result)
        if self.rail_for is not None:
            await self._count(delta)
        path = result.path if result else ("drain" if delta.kind == "drain" else "rest")
        metrics.CHUNK_SECONDS.labels(self.sink.name, path).observe(time.monotonic() - started)
        metrics.CHUNKS.labels(self.sink.name, "applied").inc()

    # -- the removal rail (heapsync/held.py) ------------------------------------------------

    @contextlib.asynccontextmanager
    async def _list_lock(self, delta: Delta) -> AsyncIterator[None]:
        """One rail decision at a time per list: chunks of one delta run together, and the second must
        see the first one held. The lock is dropped when no chunk holds or waits on it: a sink serving
        many lists over months keeps locks only for the lists in a decision right now."""
        lane = lane_key(delta)
        entry = self._list_locks.get(lane)
        if entry is None:
            entry = self._list_locks[lane] = _ListLock()
        entry.users += 1  # no await since the lookup: on the event loop, nobody dropped it in between
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._list_locks[lane]

    async def _hold_if_needed(self, item: _Item, delta: Delta) -> bool:
        """Hold the chunk (or put it behind the list's hold); False: apply it."""
        async with self._list_lock(delta):
            key = (delta.account, delta.list_name)
            if self.lists.pending.get(key):
                await self._put_held(item, delta, "waiting")
                return True
            reason = self._rail_reason(delta)
            if reason is None:
                return False
            await self._put_held(item, delta, "held", reason)
            return True

    def _rail_reason(self, delta: Delta) -> str | None:
        """Only a delta's first chunk is checked: the rest follow it (held behind it, or applied)."""
        if delta.chunk != 1 or self.rail_for is None:
            return None
        rail = self.rail_for(delta)
        if not rail.on:
            return None
        members = self.lists.counts.get((delta.account, delta.list_name))  # None: never counted
        return held.hold_reason(members, delta.kind, held.estimated_removes(delta), rail)

    async def _put_held(self, item: _Item, delta: Delta, role: str, reason: str = "") -> None:
        key = (delta.account, delta.list_name)
        members = self.lists.counts.get(key, 0)
        rail = self.rail_for(delta) if self.rail_for is not None else RemovalRail()
        offset = item.msg.offset() if item.msg is not None else -1
        chunk = HeldChunk(
            sink=self.sink.name, role="held" if role == "held" else "waiting",
            seq=self.lists.next_seq(key, time.time_ns()), reason=reason, members=members,
            removes=members if delta.kind == "drain" else held.estimated_removes(delta),
            max_removal_fraction=rail.max_removal_fraction, hold_drains=rail.hold_drains,
            partition=item.progress.partition, offset=offset if offset is not None else -1,
            writer=self._writer, delta=delta)
        await self._write_held(chunk)
        metrics.CHUNKS.labels(self.sink.name, role).inc()
        log.warning("delta held by the removal rail" if role == "held" else "chunk waits behind a held delta",
                    extra={"delta_id": delta.delta_id, "chunk": delta.chunk, "account": delta.account,
                           "list_name": delta.list_name, "reason": reason or None})
        self._export_held()

    async def _write_held(self, chunk: HeldChunk) -> None:
        await send_retrying(self.producer, self.settings.topics.sink_lists, chunk.model_dump_json().encode(),
                             held.held_key(self.sink.name, chunk.delta.chunk_key).encode())
        self.lists.put(chunk)

    async def _drop_held(self, chunk_key: str) -> None:
        await send_retrying(self.producer, self.settings.topics.sink_lists, None,
                             held.held_key(self.sink.name, chunk_key).encode())
        self.lists.drop(chunk_key)

    async def _count(self, delta: Delta) -> None:
        key = (delta.account, delta.list_name)
        members = held.members_after(self.lists.counts.get(key), delta)
        self.lists.counts[key] = members
        record = ListCount(sink=self.sink.name, account=delta.account, list_name=delta.list_name, members=members,
                           writer=self._writer)
        await send_retrying(self.producer, self.settings.topics.sink_lists, record.model_dump_json().encode(),
                             held.count_key(self.sink.name, delta.account, delta.list_name).encode())

    async def _resolve(self, lane: str) -> None:
        """Carry out the decisions on this list's holds, in order: a released hold is applied, a discarded
        one recorded as discarded; then the chunks that waited behind it go through the rail again
        (applied, or the first one that trips it becomes the new hold)."""
        account, _, list_name = lane.partition(":")
        key = (account, list_name)
        while queue := self.lists.queue(key):
            head = queue[0]
            if head.role == "held":
                hold = held.hold_id_of(head.delta)
                decision = self.lists.decisions.get(hold)
                if decision is None:
                    return  # still held
                # the hold's own chunks only: a replayed copy shares the delta id but is another delta
                for chunk in [c for c in queue if held.hold_id_of(c.delta) == hold]:
                    if decision.action == "release":
                        if chunk.delta.chunk_key not in self.applied:
                            await self._apply(chunk.delta)
                    else:
                        await self._record_discarded(chunk.delta)
                    await self._drop_held(chunk.delta.chunk_key)
                await self._forget_decision(decision)
                log.warning("held delta released: applied" if decision.action == "release"
                            else "held delta discarded: not applied",
                            extra={"delta_id": head.delta.delta_id, "replay_id": head.delta.replay_id,
                                   "account": account, "list_name": list_name})
                continue
            reason = None if head.delta.chunk_key in self.applied else self._rail_reason(head.delta)
            if reason is not None:
                members = self.lists.counts.get(key, 0)
                await self._write_held(head.model_copy(update={
                    "role": "held", "reason": reason, "members": members, "writer": self._writer,
                    "removes": members if head.delta.kind == "drain" else held.estimated_removes(head.delta)}))
                metrics.CHUNKS.labels(self.sink.name, "held").inc()
                log.warning("delta held by the removal rail", extra={
                    "delta_id": head.delta.delta_id, "account": account, "list_name": list_name, "reason": reason})
                break
            if head.delta.chunk_key not in self.applied:
                await self._apply(head.delta)
            await self._drop_held(head.delta.chunk_key)
        self._export_held()

    async def _record_discarded(self, delta: Delta) -> None:
        """Every chunk of a discarded delta is recorded as done, so a late or redelivered one is not applied."""
        for n in range(1, delta.chunks + 1):
            chunk = delta.model_copy(update={"chunk": n})
            if chunk.chunk_key in self.applied:
                continue
            record = AppliedChunk(
                sink=self.sink.name, chunk_key=chunk.chunk_key, delta_id=delta.delta_id, chunk=n, chunks=delta.chunks,
                account=delta.account, list_name=delta.list_name, segment_id=delta.segment_id,
                sync_task_id=delta.sync_task_id, kind=delta.kind, complete=delta.complete, adds=0, removes=0,
                discarded=True)
            await send_retrying(self.producer, self.settings.topics.sink_progress, record.model_dump_json().encode(),
                                 progress_key(self.sink.name, chunk.chunk_key).encode())
            now = time.time()
            self.applied.add(chunk.chunk_key, now, now)
        metrics.CHUNKS.labels(self.sink.name, "discarded").inc()

    async def _forget_decision(self, decision: HoldDecision) -> None:
        hold = held.hold_id(decision.delta_id, decision.replay_id)
        await send_retrying(self.producer, self.settings.topics.sink_lists, None,
                             held.decision_key(self.sink.name, hold).encode())
        self.lists.decisions.pop(hold, None)

    def _on_lists(self, batch: Batch) -> None:
        """Records read back from the lists topic (on the event loop): other replicas' and operators'."""
        for key, value in batch:
            self.lists.feed(key, value, skip_writer=self._writer)
        self._schedule_resolves()
        self._export_held()

    def _schedule_resolves(self) -> None:
        """Queue a resolve in the lane of every list whose hold was decided, when this replica owns its partition."""
        for key in list(self.lists.pending):
            queue = self.lists.queue(key)
            if not queue:
                continue
            head = queue[0]
            if head.role == "held" and held.hold_id_of(head.delta) not in self.lists.decisions:
                continue
            lane = lane_key(head.delta)
            progress = self._progress.get((self.settings.topics.deltas, head.partition))
            if progress is None or progress.revoked or lane in self._resolving:
                continue
            self._resolving.add(lane)
            self._enqueue_item(lane, _Item(None, None, progress, Entry(-1), resolve=lane))

    def _export_held(self) -> None:
        counts = self.lists.held_count()
        for account in self._held_series - set(counts):
            metrics.HELD.labels(self.sink.name, account).set(0)
        for account, n in counts.items():
            metrics.HELD.labels(self.sink.name, account).set(n)
        self._held_series |= set(counts)

    async def _sync_lists(self) -> bool:
        """Read the lists topic to its end before anything is applied (retried); raises
        :class:`RailSyncError` when it cannot: applying without knowing a list's holds could apply
        its later syncs ahead of a hold, so the sink stops instead."""
        for attempt in range(1, RAIL_SYNC_ATTEMPTS + 1):
            if self._tail is None or await self._tail.sync():
                break
            log.warning("lists topic not caught up; retrying", extra={"attempt": attempt})
        else:
            raise RailSyncError(f"the lists topic {self.settings.topics.sink_lists} could not be read to its end "
                                f"({RAIL_SYNC_ATTEMPTS} tries): the sink stops rather than apply a list's changes "
                                "ahead of a hold it cannot see; check the broker, then restart the sink")
        self._schedule_resolves()
        self._export_held()
        return True

    def _resync_after_assign(self) -> None:
        if self._tail is not None:
            self._rail_sync = asyncio.ensure_future(self._sync_lists())

    async def _run_lane(self, key: str, lane: _Lane) -> None:
        try:
            while lane.queue and not self._draining:
                batch = [lane.queue.popleft()]
                group = batch[0].group
                while (group is not None and lane.queue and len(batch) < self._parallel
                       and lane.queue[0].group == group):
                    batch.append(lane.queue.popleft())
                for item in batch:
                    item.task = asyncio.ensure_future(self._process(item))
                lane.running = batch
                try:
                    results = await asyncio.gather(*(i.task for i in batch if i.task), return_exceptions=True)
                finally:
                    lane.running = []
                    self._inflight -= len(batch)
                    self._inflight_ids -= sum(self._ops.pop(id(i), 1) for i in batch)
                for result in results:
                    # a chunk cancelled on revoke is not done (not committed): its new owner applies it
                    if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                        raise result
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a sink raised: stop without committing this chunk
            log.exception("sink failed; stopping", extra={"lane": key})
            self._failure = exc
            self.stop()
        finally:
            if self._lanes.get(key) is lane:
                del self._lanes[key]
            self._inflight -= len(lane.queue)
            self._inflight_ids -= sum(self._ops.pop(id(i), 1) for i in lane.queue)
            lane.queue.clear()

    def _enqueue(self, msg: Message) -> None:
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        # a consumed message without error always has all three; the client's types allow None
        assert topic is not None and partition is not None and offset is not None
        tp = (topic, partition)
        progress = self._progress.get(tp)
        if progress is None:  # not (or no longer) assigned to us
            progress = self._progress[tp] = PartitionProgress(topic, partition)
        delta, error = self.decode(msg)
        item = _Item(msg, delta, progress, progress.track(offset), error)
        self._enqueue_item(lane_key(delta) if self._concurrent else "~serial", item)

    def _enqueue_item(self, key: str, item: _Item) -> None:
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        lane.queue.append(item)
        self._inflight += 1
        self._ops[id(item)] = operations_in(item.delta)
        self._inflight_ids += self._ops[id(item)]
        if lane.task is None or lane.task.done():
            lane.task = asyncio.create_task(self._run_lane(key, lane), name=f"lane {key}")

    # -- Kafka ---------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._progress[(tp.topic, tp.partition)] = PartitionProgress(tp.topic, tp.partition)
        if self._tail is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._resync_after_assign)
        log.info("partitions assigned", extra={"partitions": [tp.partition for tp in partitions]})

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Finish (bounded) or cancel the partitions' running chunks, commit what was applied, give them up."""
        keys = {(tp.topic, tp.partition) for tp in partitions}
        self._release_from_callback(keys, self.settings.sink_revoke_grace_seconds)
        self._commit(consumer, sync=True, only=keys)
        for key in keys:
            self._progress.pop(key, None)
        self._forget_lag(keys)
        log.info("partitions revoked", extra={"partitions": [tp.partition for tp in partitions]})

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions already given to another consumer: stop their chunks now; nothing may be committed."""
        keys = {(tp.topic, tp.partition) for tp in partitions}
        self._release_from_callback(keys, 0.0)
        for key in keys:
            self._progress.pop(key, None)
        self._forget_lag(keys)
        log.warning("partitions lost", extra={"partitions": [tp.partition for tp in partitions]})

    def _release_from_callback(self, keys: set[tuple[str, int]], grace: float) -> None:
        """Run :meth:`_release` on the event loop and wait for it, from the thread that polls.

        On the loop's own thread (a consumer polled there) the loop cannot run while we wait: the
        running chunks are cancelled instead (the cancellation lands when the callback returns)."""
        for key in keys:
            progress = self._progress.get(key)
            if progress is not None:
                progress.revoked = True  # nothing new of these partitions starts from now on
        loop = self._loop
        if loop is None or loop.is_closed() or threading.get_ident() == self._loop_thread:
            running = self._running_in(keys)
            for item in running:
                assert item.task is not None
                item.task.cancel()
            if running:
                log.warning("revoked partitions' chunks cancelled without waiting (callback on the event loop)",
                            extra={"chunks": len(running)})
            return
        future = asyncio.run_coroutine_threadsafe(self._release(keys, grace), loop)
        try:
            future.result(timeout=grace + 10.0)
        except concurrent.futures.TimeoutError:
            future.cancel()
            log.error("revoked partitions' chunks did not stop; giving the partitions up anyway")

    def _running_in(self, keys: set[tuple[str, int]]) -> list[_Item]:
        return [item for lane in self._lanes.values() for item in lane.running
                if item.partition_key in keys and item.task is not None and not item.task.done()]

    async def _release(self, keys: set[tuple[str, int]], grace: float) -> None:
        """Let the partitions' running chunks finish within ``grace`` seconds; cancel the rest and wait for them."""
        running = [item.task for item in self._running_in(keys) if item.task is not None]
        if not running:
            return
        _, pending = await asyncio.wait(running, timeout=grace)
        if pending:
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=1.0)
            log.warning("revoked partitions' chunks not finished in time; cancelled, their new owner applies them",
                        extra={"chunks": len(pending), "grace_seconds": grace})

    def _commit(self, consumer: Consumer, *, sync: bool, only: set[tuple[str, int]] | None = None) -> None:
        offsets: list[TopicPartition] = []
        sent: list[PartitionProgress] = []
        for key, progress in self._progress.items():
            if only is not None and key not in only:
                continue
            point = progress.due()
            if point is not None:
                offsets.append(TopicPartition(progress.topic, progress.partition, point))
                sent.append(progress)
                progress.committed = point
                metrics.COMMITTED.labels(self.sink.name, str(progress.partition)).set(point)
        if not offsets:
            return
        try:
            # the client's stubs overload on a literal True/False; one call with the flag is the same
            consumer.commit(offsets=offsets, asynchronous=not sync)  # type: ignore[call-overload]
        except KafkaException as exc:
            log.warning("offset commit failed; will retry", extra={"error": str(exc)})
            for progress in sent:
                progress.committed = None

    # -- lag (heapsync/lag.py) ---------------------------------------------------

    def _forget_lag(self, keys: set[tuple[str, int]]) -> None:
        """A partition given up is reported by its new owner, not here."""
        gone = {s for s in self._lag_series if (s[1], int(s[2])) in keys}
        lag.forget(gone)
        self._lag_series -= gone

    @staticmethod
    def _watermarks(consumer: Consumer, unknown: list[tuple[str, int]],
                    tps: list[tuple[str, int]]) -> tuple[dict[tuple[str, int], int], dict[tuple[str, int], int]]:
        """High watermarks of ``tps``, and the committed offsets of ``unknown`` (nothing read since assigned).

        Network calls: run in the polling thread, where every other consumer call happens."""
        highs: dict[tuple[str, int], int] = {}
        for topic, partition in tps:
            try:
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=5.0)
            except KafkaException:
                continue
            highs[(topic, partition)] = high
        committed: dict[tuple[str, int], int] = {}
        if unknown:
            try:
                for tp in consumer.committed([TopicPartition(t, p) for t, p in unknown], timeout=5.0):
                    committed[(tp.topic, tp.partition)] = tp.offset
            except KafkaException:
                pass
        return highs, committed

    async def _export_lag(self, consumer: Consumer, poller: concurrent.futures.Executor) -> None:
        """``heapsync_consumer_lag`` of the partitions this sink owns: what it has not finished, from its own
        bookkeeping (the first chunk not yet applied) and the partition's high watermark."""
        done = {key: progress.done_up_to() for key, progress in self._progress.items() if not progress.revoked}
        unknown = [key for key, point in done.items() if point is None]
        try:
            highs, committed = await asyncio.get_running_loop().run_in_executor(
                poller, self._watermarks, consumer, unknown, list(done))
        except Exception as exc:  # noqa: BLE001 - a metric must never stop the sink
            log.warning("consumer lag not measured", extra={"error": str(exc)[:200]})
            return
        rows = [lag.Row(self.group, topic, partition,
                        lag.partition_lag(highs[(topic, partition)], done[(topic, partition)]
                                          if done[(topic, partition)] is not None
                                          else committed.get((topic, partition))))
                for topic, partition in done if (topic, partition) in highs and (topic, partition) in self._progress]
        self._lag_series = lag.publish(rows, self._lag_series)

    def _consumer_config(self) -> dict[str, Any]:
        return {
            **client_config(self.settings.kafka_bootstrap),
            "group.id": self.group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "max.poll.interval.ms": 3_600_000,
            # a killed sink's partitions move to a restarted one after 10 s, not Kafka's default 45 s
            "session.timeout.ms": 10_000,
            "heartbeat.interval.ms": 3_000,
            # what librdkafka prefetches ahead of the in-flight bounds (default 64 MB): ~80 chunks of 5,000 ids
            "queued.max.messages.kbytes": 16_384,
        }

    def _flow_control(self, consumer: Consumer) -> int:
        """Stop fetching while too many chunks or operations are unfinished; resume when they drain.
        Returns how many messages the next poll may take."""
        s = self.settings
        pause = should_pause(self._paused, self._inflight, self._inflight_ids, s.sink_max_inflight_messages,
                             s.sink_max_inflight_ids)
        if pause and not self._paused:
            consumer.pause(consumer.assignment())
            self._paused = True
        elif self._paused and not pause:
            consumer.resume(consumer.assignment())
            self._paused = False
        metrics.INFLIGHT.labels(self.sink.name).set(self._inflight)
        metrics.INFLIGHT_IDS.labels(self.sink.name).set(self._inflight_ids)
        return poll_budget(self._inflight, self._inflight_ids, s.sink_max_inflight_messages, s.sink_max_inflight_ids,
                           s.delta_chunk_size)

    async def run(self, *, install_signal_handlers: bool = True) -> None:
        loop = asyncio.get_running_loop()
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        _serve_metrics_once(self.settings.metrics_port)
        known = await loop.run_in_executor(None, self.load_progress)
        if self.rail_for is not None:
            self._tail = ListsTail(self.settings.kafka_bootstrap, self.settings.topics.sink_lists, self._on_lists)
            self._tail.start(loop)
            try:
                await self._sync_lists()
            except RailSyncError:
                await loop_stop(self._tail)
                raise
        consumer = self._consumer = Consumer(self._consumer_config())
        self._loop, self._loop_thread = loop, threading.get_ident()
        consumer.subscribe([self.settings.topics.deltas], on_assign=self._on_assign, on_revoke=self._on_revoke,
                           on_lost=self._on_lost)
        await self.sink.start()
        log.info("sink started", extra={"sink": self.sink.name, "group": self.group, "applied_chunks_known": known})
        last_commit = time.monotonic()
        last_lag = last_commit - lag.LAG_INTERVAL_SECONDS + 5.0  # first measurement soon after start
        # Every call into the consumer happens either in this thread while the loop awaits it, or on the loop
        # between two polls: never two at once. Rebalance callbacks run here (inside consume).
        poller = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"sink-{self.sink.name}-poll")
        try:
            while not self._stopping.is_set():
                budget = self._flow_control(consumer)
                msgs = await loop.run_in_executor(poller, consumer.consume, budget, 0.05)
                for msg in msgs:
                    if (error := msg.error()) is not None:
                        if error.code() != KafkaError._PARTITION_EOF:
                            log.warning("consumer error", extra={"error": error.str()})
                        continue
                    self._enqueue(msg)
                if time.monotonic() - last_commit >= self.settings.sink_commit_interval_seconds:
                    self._commit(consumer, sync=False)
                    self.applied.expire(time.time())
                    last_commit = time.monotonic()
                if self._tail is not None and self._tail.ensure_alive():
                    self._resync_after_assign()  # nothing applied until the restarted tail caught up
                if (self._rail_sync is not None and self._rail_sync.done() and not self._rail_sync.cancelled()
                        and self._rail_sync.exception() is not None):
                    log.error("lists topic not caught up; stopping the sink")
                    self._failure = self._rail_sync.exception()
                    self.stop()
                if time.monotonic() - last_lag >= lag.LAG_INTERVAL_SECONDS and self.settings.metrics_port:
                    await self._export_lag(consumer, poller)
                    last_lag = time.monotonic()
                await asyncio.sleep(0)  # let the lanes take what was just queued
        finally:
            await self._shutdown(consumer, poller)
        if self._failure is not None:
            raise self._failure

    async def _shutdown(self, consumer: Consumer, poller: concurrent.futures.ThreadPoolExecutor) -> None:
        self._draining = True  # lanes finish what they run, start nothing new
        tasks = [lane.task for lane in self._lanes.values() if lane.task is not None and not lane.task.done()]
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=self.settings.sink_shutdown_grace_seconds)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
                log.warning("abandoned in-flight chunks; they are redone on restart",
                            extra={"lanes": len(pending)})
        try:
            self._commit(consumer, sync=True)
        finally:
            # close() calls the revoke callback: in the polling thread, like every rebalance
            await asyncio.get_running_loop().run_in_executor(poller, consumer.close)
            poller.shutdown(wait=True)
            if self._tail is not None:
                await loop_stop(self._tail)
            await self.sink.close()
            self.producer.close()
            log.info("sink stopped", extra={"sink": self.sink.name})


class RailSyncError(RuntimeError):
    """The removal rail's lists topic could not be read to its end: nothing may be applied."""


RAIL_SYNC_ATTEMPTS = 3
"""Tries of :meth:`ListsTail.sync` (30 s each) before the sink stops."""


async def loop_stop(tail: ListsTail) -> None:
    await asyncio.get_running_loop().run_in_executor(None, tail.stop)


_metrics_served = False


def _serve_metrics_once(port: int | None) -> None:
    global _metrics_served
    if port and not _metrics_served:
        metrics.serve(port)
        _metrics_served = True


def make_runner(sink_factory: Callable[[DeadLetters], DeltaSink], settings: Settings, *,
                group: str | None = None, rail_for: Callable[[Delta], RemovalRail] | None = None) -> SinkRunner:
    """Wire a sink to its dead-letter publisher and the Kafka loop."""
    dead_letters = DeadLetters(ResilientProducer.connect(settings.kafka_bootstrap), settings.topics.sink_dlq, "sink")
    sink = sink_factory(dead_letters)
    dead_letters.sink_name = sink.name
    return SinkRunner(sink, settings, dead_letters, group=group, rail_for=rail_for)
