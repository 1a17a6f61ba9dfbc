"""The Faust shell around the assembler: topics in, tables for state, deltas out.

Reads the pages topic (keyed by account and segment, so one segment's pages
stay in one partition and its state in the matching table partition), feeds
each record to :class:`processors.assembler.Assembler`, and publishes what it
returns. Delivery is at-least-once: a crash may re-emit a delta with the same
``delta_id``; consumers recognise the repeat. Faust's exactly_once is not used
(see DESIGN.md).

A leader timer sends a *tick* into every pages partition; the worker that owns
the partition handles it in order with the pages, which is how syncs that
never complete are timed out without touching tables from outside a stream.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import faust
import orjson
from pydantic import ValidationError

from heapsync.contracts import PageRecord, HeapDrain, HeapSync, parse_heap_payload
from heapsync.settings import Settings
from processors.assembler import Assembler, DeadLetter, Output

log = logging.getLogger("heapsync.processor")

TICK = b'{"control":"tick"}'
CONTROL_HEADER = "heapsync-control"


def create_app(settings: Settings) -> faust.App:
    topics = settings.topics
    store = settings.processor_store
    app = faust.App(
        settings.processor_group,
        broker=f"kafka://{settings.kafka_bootstrap}",
        store=store,
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
        consumer_auto_offset_reset="earliest",
        broker_commit_every=100,
        table_standby_replicas=0,
    )
    pages_topic = app.topic(topics.pages, key_type=bytes, value_type=bytes,
                            partitions=settings.topic_partitions)
    deltas_topic = app.topic(topics.deltas, key_type=bytes, value_type=bytes,
                             partitions=settings.topic_partitions)
    dlq_topic = app.topic(topics.assembler_dlq, key_type=bytes, value_type=bytes,
                          partitions=settings.topic_partitions)

    def table(name: str) -> faust.Table:
        return app.Table(name, default=None, partitions=settings.topic_partitions,
                         schema=faust.Schema(key_type=str, key_serializer="json", value_serializer="json"))

    assembler = Assembler(
        table("pages"), table("syncs"), table("segments"), table("done"),
        chunk_size=settings.delta_chunk_size,
        timeout_seconds=settings.sync_timeout_seconds,
        partial_policy=settings.partial_policy,
    )
    app.assembler = assembler  # type: ignore[attr-defined]

    async def publish(out: Output) -> None:
        for delta in out.deltas:
            await deltas_topic.send(
                key=f"{delta.account}:{delta.list_name}".encode(),
                value=delta.model_dump_json().encode(),
            )
            log.info("delta chunk emitted", extra={
                "delta_id": delta.delta_id, "account": delta.account, "list": delta.list_name,
                "chunk": delta.chunk, "chunks": delta.chunks, "adds": len(delta.add),
                "removes": len(delta.remove), "complete": delta.complete,
            })
        for dead in out.dead_letters:
            await dlq_topic.send(key=dead.sync_key.encode(),
                                 value=orjson.dumps({"reason": dead.reason, "sync": dead.sync_key, **dead.detail}))

    def handle(record_value: bytes, partition: int) -> Output:
        if record_value == TICK:
            return assembler.on_tick(partition=partition, now=time.time())
        try:
            record = PageRecord.model_validate_json(record_value)
            payload = parse_heap_payload(orjson.dumps(record.payload))
        except ValidationError as exc:
            log.error("unreadable record on the pages topic; dead-lettered", extra={"partition": partition})
            out = Output()
            out.dead_letters.append(DeadLetter("unreadable pages record", f"partition-{partition}",
                                               {"errors": exc.errors(include_input=False, include_url=False),
                                                "value": record_value.decode("utf-8", "replace")}))
            return out
        if isinstance(payload, HeapSync):
            return assembler.on_sync_page(record.account, payload, partition=partition, now=time.time(),
                                          replay_id=record.replay_id)
        if isinstance(payload, HeapDrain):
            return assembler.on_drain(record.account, payload, request_id=record.request_id,
                                      partition=partition, now=time.time(), replay_id=record.replay_id)
        return Output()

    @app.agent(pages_topic)
    async def assemble(stream: Any) -> Any:
        async for event in stream.events():
            await publish(handle(event.value, event.message.partition))
            yield None

    tick_every = max(1.0, min(settings.sync_timeout_seconds / 4, 30.0))

    @app.timer(interval=tick_every, on_leader=True)
    async def tick() -> None:
        for partition in range(settings.topic_partitions):
            await pages_topic.send(value=TICK, partition=partition)

    return app
