"""The Faust shell around the assembler: topics in, tables for state, deltas out.

Reads the pages topic (keyed by account and segment, so one segment's pages
stay in one partition and its state in the matching table partition), feeds
each record to :class:`processors.assembler.Assembler`, and publishes what it
returns. Table reads and writes happen only inside the agent's event, so they
land in the event's partition (Faust's rule for changelogged tables).

Delivery is at-least-once, without Faust's exactly_once (docs/assembler.md, "State and crashes"):

1. delta chunks are sent and *acknowledged* before the sync is marked done;
2. the done marker is flushed to its changelog before the sync's pages are dropped;
3. the page's offset is committed only after both (Faust flushes the producer
   before committing offsets).

A crash anywhere re-reads the page, which re-drives the segment: the same delta
(same ``delta_id``) may come out again, but none is lost or mixed.

A leader timer sends a *tick* into every pages partition; the worker that owns
the partition handles it in order with the pages, which is how syncs that never
complete are timed out without touching tables from outside a stream.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, Awaitable

import faust
import orjson
from faust.types import TableT, TopicT
from pydantic import ValidationError

from heapsync import lag
from heapsync.contracts import Delta, HeapDrain, HeapSync
from heapsync.kafka import min_insync_replicas
from heapsync.settings import Account, Settings
from processors import metrics, spill
from processors.assembler import Assembler, DeadLetter, Emission, Step
from processors.records import TICK, is_tick, parse_record

log = logging.getLogger("heapsync.processor")

__all__ = ["TICK", "Worker", "create_app", "declare_changelogs", "tick_interval"]


def tick_interval(timeout_seconds: float) -> float:
    """Often enough that a sync is timed out at most a quarter of its timeout late."""
    return max(1.0, min(timeout_seconds / 4, 30.0))


def _table_options(store: str) -> dict[str, Any] | None:
    if not store.startswith("rocksdb:"):
        return None
    # Small write buffers and cache: many small per-partition databases, bounded memory.
    return {"driver": "rocksdict", "write_buffer_size": 8 * 1024 * 1024, "max_write_buffer_number": 2,
            "block_cache_size": 32 * 1024 * 1024, "block_cache_compressed_size": 0}


def declare_changelogs(app: faust.App, settings: Settings, timeout: float = 30.0) -> list[str]:
    """Create the tables' changelog topics before the worker joins its group.

    Left to Faust, they are created while the worker starts, after the consumer's metadata was
    read: on a fresh Apache Kafka the first page could then reach the agent before a metadata
    refresh, and Faust stopped the agent with ``PartitionsMismatch`` ("changelog ... has 0
    partitions"). Made here first, with the settings Faust would give them, they are in the
    worker's very first metadata.
    """
    from confluent_kafka.admin import AdminClient, NewTopic

    from heapsync.kafka import client_config, create_missing

    topics = []
    for table in app.tables.values():
        changelog = table.changelog_topic
        config = {"cleanup.policy": "compact", **(changelog.config or {})}
        if changelog.retention is not None:
            config["retention.ms"] = str(int(changelog.retention * 1000))
        topics.append(NewTopic(changelog.get_topic_name(), num_partitions=table.partitions or settings.topic_partitions,
                               replication_factor=settings.topic_replication, config=config))
    return create_missing(AdminClient(client_config(settings.kafka_bootstrap)), topics, timeout)


def _app_options(settings: Settings) -> dict[str, Any]:
    """Faust's settings for the worker, from ours."""
    return dict(
        broker=f"kafka://{settings.kafka_bootstrap}",
        store=settings.processor_store,
        datadir=str(settings.processor_data_dir),
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication,
        topic_allow_declare=True,
        value_serializer="raw",
        key_serializer="raw",
        web_enabled=settings.processor_web_port is not None,
        web_port=settings.processor_web_port or 6066,
        web_host="127.0.0.1",
        producer_acks=-1,
        producer_max_request_size=16 * 1024 * 1024,
        producer_linger_ms=1,
        # Pages (changelog) and delta chunks are lists of similar ids: compression shrinks them several
        # times. snappy by default: aiokafka's lz4 runs at level 9 and cost a fifth of the worker's CPU.
        producer_compression_type=None if settings.processor_compression == "none" else settings.processor_compression,
        producer_max_batch_size=1024 * 1024,
        consumer_auto_offset_reset="earliest",
        # Pages are tens of KB: the 1 MB default fetches only a few dozen per round trip.
        consumer_max_fetch_size=4 * 1024 * 1024,
        broker_commit_every=100,
        stream_buffer_maxsize=settings.processor_prefetch_pages,
        table_standby_replicas=settings.processor_standby_replicas,
        recovery_consistency_check=settings.processor_recovery_consistency_check,
        broker_session_timeout=settings.processor_session_timeout_seconds,
        broker_heartbeat_interval=min(3.0, settings.processor_session_timeout_seconds / 3),
    )


class Worker:
    """One processor's Faust app and what it runs: the pages agent, the leader's tick timer, the metrics.

    Everything Faust calls is a named method here; the rules stay in :class:`Assembler`. Built by
    :func:`create_app`, which hands Faust the app (the app keeps this object alive through its handlers).
    """

    def __init__(self, settings: Settings, accounts: Mapping[str, Account] | None = None) -> None:
        self.settings = settings
        self.accounts = accounts  # the per-segment settings (pinned list names, disabled segments)
        self.app = faust.App(settings.processor_group, **_app_options(settings))
        topics = settings.topics
        self.pages_topic = self._topic(topics.pages)
        self.deltas_topic = self._topic(topics.deltas)
        self.dlq_topic = self._topic(topics.assembler_dlq)
        self.assembler = self._assembler()
        self.app.assembler = self.assembler  # type: ignore[attr-defined]
        self.exporter = metrics.Exporter()
        self._wire()

    # -- building ------------------------------------------------------------------

    def _topic(self, name: str) -> TopicT:
        return self.app.topic(name, key_type=bytes, value_type=bytes, partitions=self.settings.topic_partitions)

    def _assembler(self) -> Assembler:
        settings = self.settings
        options = _table_options(settings.processor_store)
        scratch_dir = settings.processor_data_dir / "scratch"
        spill.clear_scratch(scratch_dir)  # what an emission interrupted by a crash left behind
        # Faust creates the changelogs itself: with 3+ replicas they refuse a write one copy would hold,
        # as the topics `heapsync topics` makes do (a broker's default min.insync.replicas is 1)
        min_isr = min_insync_replicas(settings.topic_replication)
        changelog_configs = {"min.insync.replicas": str(min_isr)} if min_isr is not None else None

        def table(name: str, value_type: type | None = None) -> TableT:
            # Faust picks serializers from key_type/value_type: str keys as JSON, bytes values raw, others JSON.
            return self.app.Table(name, default=None, partitions=settings.topic_partitions, key_type=str,
                                  value_type=value_type, options=dict(options) if options else None,
                                  extra_topic_configs=changelog_configs)

        return Assembler(
            table("pages", bytes), table("syncs"), table("segments"), table("done"),
            done_days=table("done_days"),
            # a done marker guards against its sync's pages being read again: not possible after their retention
            done_retention_seconds=settings.topic_retention_days * 86_400,
            chunk_size=settings.delta_chunk_size,
            timeout_seconds=settings.sync_timeout_seconds,
            partial_policy=settings.partial_policy,
            accounts=self.accounts,
            cache_max_ids=settings.processor_cache_max_ids,
            emit_max_ids=settings.processor_emit_max_ids,
            scratch_dir=scratch_dir,
        )

    def _wire(self) -> None:
        """Hand Faust the agent, the rebalance handlers and the timers (what the decorators did)."""
        app, settings = self.app, self.settings
        app.agent(self.pages_topic, name="processors.worker.assemble")(self.assemble)
        # faust's signal stubs reject any coroutine handler
        app.on_partitions_revoked.connect(self.on_revoked)  # type: ignore[arg-type]
        app.on_partitions_assigned.connect(self.on_assigned)  # type: ignore[arg-type]
        app.timer(interval=tick_interval(settings.sync_timeout_seconds), on_leader=True)(self.tick)
        if settings.metrics_port is not None:
            app.task(self.serve_metrics)
            self._lag_reporter = metrics.LagReporter(settings.kafka_bootstrap, settings.processor_group,
                                                     settings.topics.pages)
            app.timer(interval=lag.LAG_INTERVAL_SECONDS)(self.report_lag)

    # -- the agent -------------------------------------------------------------------

    async def assemble(self, stream: Any) -> Any:
        """The pages agent: each event through the assembler, what it returns published before the next."""
        # A page makes ~1,000 short-lived dicts; with the default thresholds the collector keeps
        # rescanning Faust's long-lived objects. Freeze those and collect young objects less often.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
        async for event in stream.events():
            step = self.handle(event.value, event.message.partition, event.message.offset)
            if step.dead_letters:
                await self.send_dead_letters(step.dead_letters)
            await self.emit_ready(step)
            self.exporter.update(self.assembler.counters)
            yield None

    def handle(self, raw: bytes, partition: int, offset: int = -1) -> Step:
        """One record of the pages topic (a tick, a sync page, a drain) to the assembler's next step."""
        if is_tick(raw):
            step = self.assembler.on_tick(partition=partition, now=time.time())
            metrics.set_open_syncs(partition, step.open_syncs or 0, step.oldest_open_seconds)
            return step
        try:
            record = parse_record(raw)
        except ValidationError as exc:
            metrics.UNREADABLE.inc()
            log.error("unreadable record on the pages topic; dead-lettered", extra={"partition": partition})
            return Step(dead_letters=[DeadLetter("unreadable pages record", f"partition-{partition}", {
                "errors": exc.errors(include_input=False, include_url=False, include_context=False),
                "value": raw.decode("utf-8", "replace")})])
        payload = record.payload
        if isinstance(payload, HeapSync):
            if log.isEnabledFor(logging.DEBUG):
                info = payload.data.sync_info
                log.debug("page %s/%s of sync %s segment %s partition %s offset %s", info.page_number,
                          info.total_pages, info.sync_task_id[:8], payload.data.segment.id, partition, offset)
            step = self.assembler.on_sync_page(record.account, payload, partition=partition, now=time.time(),
                                               replay_id=record.replay_id, add=record.add, remove=record.remove)
            for letter in step.dead_letters:  # a late page: keep the whole record, so `heapsync dlq` can re-drive it
                letter.detail["record"] = orjson.loads(raw)
            return step
        if isinstance(payload, HeapDrain):
            return self.assembler.on_drain(record.account, payload, request_id=record.request_id,
                                           partition=partition, now=time.time(), replay_id=record.replay_id,
                                           signed_digest=record.signed_digest)
        # The ingress sends unknown action types to the rejected topic; never drop one silently here.
        log.error("pages record with an unknown action type; dead-lettered",
                  extra={"partition": partition, "action_type": payload.action_type})
        return Step(dead_letters=[DeadLetter("unknown action type", f"partition-{partition}",
                                             {"value": raw.decode("utf-8", "replace")})])

    async def emit_ready(self, step: Step) -> None:
        """Publish every emission the step's segments have ready, each durable before its pages are dropped."""
        assembler = self.assembler
        for seg in step.segments:
            while True:
                started = time.perf_counter()
                em = assembler.next_emission(seg, time.time())
                if em is None:
                    break
                try:
                    for _ in em.prepare():  # a spilled sync's buckets: let heartbeats and acks through
                        await asyncio.sleep(0)
                    built = time.perf_counter()
                    await self.publish(em)
                finally:
                    em.close()  # its scratch files, if publishing stopped half-way
                log.debug("emission built in %d ms, published in %d ms", (built - started) * 1000,
                          (time.perf_counter() - built) * 1000)
                assembler.mark_emitted(em)
                await self.app.producer.flush()  # the done marker is durable before the pages go
                assembler.forget(em)

    async def publish(self, em: Emission) -> None:
        """Send an emission and wait until the broker has it: only then may the sync count as done.

        Chunks are made one at a time as they are sent; at most ``processor_emit_inflight_chunks``
        wait for the broker's acknowledgement, so a large sync's output is never all in memory."""
        pending: deque[Awaitable[Any]] = deque()
        adds = removes = 0
        first: Delta | None = None
        for delta in em.iter_deltas():
            pending.append(await self.deltas_topic.send(
                key=f"{delta.account}:{delta.list_name}".encode(),
                value=delta.model_dump_json().encode(),
            ))
            adds, removes = adds + len(delta.add), removes + len(delta.remove)
            first = first or delta.model_copy(update={"add": [], "remove": []})
            while len(pending) >= self.settings.processor_emit_inflight_chunks:
                await pending.popleft()
        if pending:
            await asyncio.gather(*pending)
        if first is not None:
            d = first
            log.info("delta emitted", extra={
                "delta_id": d.delta_id, "account": d.account, "list": d.list_name, "kind": d.kind,
                "chunks": d.chunks, "adds": adds, "removes": removes, "complete": d.complete,
                "missing_pages": len(d.missing_pages), "replay_id": d.replay_id,
            })
        if em.dead_letter is not None:
            await self.send_dead_letters([em.dead_letter])

    async def send_dead_letters(self, letters: list[DeadLetter]) -> None:
        # one dead letter may be more than a record holds: split (heapsync/dlq_parts.py), never refused
        futures = [await self.dlq_topic.send(key=key, value=value)
                   for d in letters for key, value in d.records(self.settings.dead_letter_part_bytes)]
        if futures:
            await asyncio.gather(*futures)

    # -- rebalances, timers, metrics ---------------------------------------------------

    async def on_revoked(self, app: faust.App, revoked: Any, **kwargs: Any) -> None:
        # Another worker may take these partitions over; our in-memory net states would go stale.
        self.assembler.clear_cache()
        metrics.forget_partitions(tp.partition for tp in revoked if tp.topic == self.settings.topics.pages)

    async def on_assigned(self, app: faust.App, assigned: Any, **kwargs: Any) -> None:
        self.assembler.clear_cache()

    async def tick(self) -> None:
        """On the leader: a tick into every pages partition, handled in order with its pages (timeouts)."""
        for partition in range(self.settings.topic_partitions):
            await self.pages_topic.send(value=TICK, partition=partition)

    async def serve_metrics(self) -> None:
        metrics.serve(self.settings.metrics_port)  # type: ignore[arg-type]

    async def report_lag(self) -> None:
        await self._lag_reporter.report(self.app.is_leader())


def create_app(settings: Settings, accounts: Mapping[str, Account] | None = None) -> faust.App:
    """The worker's Faust app (what ``heapsync processor`` runs), wired by :class:`Worker`; ``accounts``
    gives the per-segment settings (pinned list names, disabled segments)."""
    return Worker(settings, accounts).app
