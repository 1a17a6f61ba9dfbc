"""Replay throughput: ``heapsync replay pages`` over N page records (read, filter, re-produce with
a replay id) against the ceiling of the slower of a raw confluent-kafka read of the same records
and a raw produce of the same bytes (a replay reads and produces at once, so it can at best go at the
pace of the slower half), on one embedded Tansu broker."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone

import orjson
from confluent_kafka import Producer

from heapsync.contracts import PageRecord
from heapsync.kafka import ensure_topics
from heapsync.settings import Settings
from heapsync.topic_reader import read_topic
from heapsync_dev.broker import EmbeddedBroker
from heapsync_dev.samples import heap_request
from heapsync_ops.replay import Filter, run_replay

RECORDS = 20_000


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench replay",
                                     description="heapsync replay pages against a raw read and produce (Tansu only).")
    parser.parse_args(argv or [])
    with EmbeddedBroker() as broker:
        settings = Settings(kafka_bootstrap=broker.bootstrap, topic_prefix=f"bench{uuid.uuid4().hex[:6]}",
                            topic_partitions=6)
        ensure_topics(settings)
        producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 5})
        values = []
        for i in range(RECORDS):
            rec = PageRecord(account="acme", request_id=str(i), received_at=datetime.now(timezone.utc),
                             payload=heap_request(f"s{i // 4}", i % 4 + 1, 4, add=[f"u{i}-{j}@x.io" for j in range(20)],
                                                  segment_id=str(i % 50)))
            values.append((f"acme:{i % 50}".encode(), rec.model_dump_json().encode()))
        for key, value in values:
            producer.produce(settings.topics.pages, value, key=key)
            producer.poll(0)
        producer.flush(60)

        t0 = time.perf_counter()
        read = sum(1 for _ in read_topic(broker.bootstrap, settings.topics.pages))
        raw_read = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 5, "enable.idempotence": True})
        for key, value in values:
            out.produce(settings.topics.pages + ".ceiling", orjson.dumps({**orjson.loads(value), "replay_id": "x"}),
                        key=key)
            out.poll(0)
        out.flush(60)
        raw_produce = time.perf_counter() - t0
        ceiling = max(raw_read, raw_produce)

        t0 = time.perf_counter()
        report = run_replay(settings, "pages", since_ms=None, from_offset=0, flt=Filter(), dry_run=False)
        measured = time.perf_counter() - t0
    assert read == RECORDS and report.produced == RECORDS, (read, report.as_json())
    print(f"  {RECORDS} page records (~{len(values[0][1])} bytes each), 6 partitions, Tansu")
    print(f"  raw read {RECORDS / raw_read:,.0f} rec/s, raw produce {RECORDS / raw_produce:,.0f} rec/s "
          f"-> ceiling {RECORDS / ceiling:,.0f} rec/s (the slower half)")
    print(f"  heapsync replay: {RECORDS / measured:,.0f} rec/s, ratio {ceiling / measured:.2f} of the ceiling")
