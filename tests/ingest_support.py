"""Helpers for the ingress tests: read a topic back, post raw HTTP (chunked too), sign bodies."""

from __future__ import annotations

import http.client
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from ingest.signature import heap_hash_header


@dataclass
class Record:
    key: bytes | None
    value: Any
    partition: int
    offset: int


def read_topic(bootstrap: str, topic: str, until: Callable[[list[Record]], bool], timeout: float = 30.0) -> list[Record]:
    """Every record of ``topic`` from the start, until ``until(records)`` or ``timeout``.

    Partitions are assigned from the beginning (no group join, no committed offsets),
    so every call sees every record.
    """
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"test-read-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest", "enable.auto.commit": False,
    })
    records: list[Record] = []
    try:
        deadline = time.monotonic() + timeout
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        while time.monotonic() < deadline and not until(records):
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
                    continue
                raise RuntimeError(msg.error().str())
            value = msg.value()
            records.append(Record(msg.key(), json.loads(value) if value else None, msg.partition(), msg.offset()))
    finally:
        consumer.close()
    return records


def has_request_ids(ids: Iterable[str]) -> Callable[[list[Record]], bool]:
    wanted = set(ids)
    return lambda records: wanted <= {r.value.get("request_id") for r in records if isinstance(r.value, dict)}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw)


def raw_request(port: int, method: str, path: str, body: bytes | Iterable[bytes] | None = None,
                headers: dict[str, str] | None = None, *, chunked: bool = False, timeout: float = 30.0) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        resp = conn.getresponse()
        return Reply(resp.status, {k: v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def signed_headers(secret: str, body: bytes, *, ts_ms: int | None = None, encoding: str = "base64",
                   **extra: str) -> dict[str, str]:
    ts = ts_ms if ts_ms is not None else int(time.time() * 1000)
    return {"Content-Type": "application/json", "Heap-Hash": heap_hash_header(secret.encode(), ts, body, encoding),
            **extra}
