"""Helpers for the sink's real-chain tests: produce deltas straight into the deltas topic
(no Faust worker needed) and read the sink's dead-letter and progress topics back."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from heapsync.contracts import Delta
from heapsync.kafka import ensure_topics
from heapsync.settings import Settings
from tests.conftest import Pipeline, http


def settings_for(pipeline: Pipeline) -> Settings:
    return Settings(kafka_bootstrap=pipeline.broker.bootstrap, topic_prefix=pipeline.prefix, topic_partitions=3)


def make_delta(list_name: str, add: list[str] = (), remove: list[str] = (), *, account: str = "acme",
               delta_id: str | None = None, chunk: int = 1, chunks: int = 1, kind: str = "sync") -> Delta:
    return Delta(delta_id=delta_id or uuid.uuid4().hex, account=account, segment_id="1", segment_name=list_name,
                 list_name=list_name, identity_field="email", kind=kind, chunk=chunk, chunks=chunks,
                 add=list(add), remove=list(remove))


def produce(pipeline: Pipeline, *deltas: Delta) -> None:
    """Publish deltas keyed like the assembler does (account:list), so one list stays on one partition."""
    settings = settings_for(pipeline)
    ensure_topics(settings)
    producer = Producer({"bootstrap.servers": pipeline.broker.bootstrap, "enable.idempotence": True})
    for d in deltas:
        producer.produce(settings.topics.deltas, d.model_dump_json().encode(), key=f"{d.account}:{d.list_name}".encode())
    assert producer.flush(30) == 0


def read_topic(pipeline: Pipeline, topic: str, *, at_least: int = 0, timeout: float = 15.0) -> list[tuple[str, Any]]:
    """(key, JSON value) of every record so far; waits until ``at_least`` are there or time runs out.

    Assigns partitions directly (no consumer group to join), reading each to its end."""
    out: list[tuple[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        out = _read_all(pipeline, topic)
        if len(out) >= at_least or time.monotonic() > deadline:
            return out
        time.sleep(0.5)


def _read_all(pipeline: Pipeline, topic: str) -> list[tuple[str, Any]]:
    consumer = Consumer({"bootstrap.servers": pipeline.broker.bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "enable.partition.eof": True})
    out: list[tuple[str, Any]] = []
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or not meta.partitions:
            return out
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        at_end: set[int] = set()
        deadline = time.monotonic() + 10
        while len(at_end) < len(meta.partitions) and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.3):
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        at_end.add(msg.partition())
                    continue
                out.append(((msg.key() or b"").decode(), json.loads(msg.value())))
    finally:
        consumer.close()
    return out


def sim_state(pipeline: Pipeline) -> dict[str, Any]:
    return http("GET", f"{pipeline.sim_url}/_sim/state").body


def sim_members(pipeline: Pipeline, account: str, list_name: str) -> set[str]:
    return set(http("GET", f"{pipeline.sim_url}/_sim/lists").body.get(account, {}).get(list_name, []))


def wait_for(pred: Any, timeout: float = 60.0, interval: float = 0.3) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())
