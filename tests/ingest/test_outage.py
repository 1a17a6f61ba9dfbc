"""Broker outage: the ingress answers 503 (never 200) while Kafka is away, and 200 again once it is back.

Uses its own Tansu broker on a fixed port, so it can be stopped and started on the
same address without disturbing other tests. Tansu keeps data in memory only, so
after the restart the topics are re-created (as a durable Kafka would still have
them) and the pages accepted before the outage are checked before it begins.
"""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from heapsync.kafka import ensure_topics
from heapsync.settings import Settings
from heapsync_dev.broker import EmbeddedBroker
from heapsync_dev.samples import heap_request
from tests.conftest import Pipeline
from tests.ingest_support import Reply, has_request_ids, raw_request, read_topic, signed_headers

pytestmark = pytest.mark.integration

PATH = "/heap/listMembership/acme"
PRODUCE_TIMEOUT = 3.0


def test_broker_outage_gives_503_never_200_and_recovers(tmp_path: Path) -> None:
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log").start()
    pipeline = Pipeline(broker, tmp_path)
    pipeline.extra_env["HEAPSYNC_PRODUCE_TIMEOUT_SECONDS"] = str(PRODUCE_TIMEOUT)
    pipeline.extra_env["HEAPSYNC_INGEST_QUEUE_MAX_KBYTES"] = "1024"  # the smallest local queue allowed
    settings = Settings(kafka_bootstrap=broker.bootstrap, topic_prefix=pipeline.prefix, topic_partitions=3)
    pages_topic = settings.topics.pages
    try:
        pipeline.start_ingest()

        def post(label: str, pad: int = 0) -> Reply:
            page = heap_request(f"outage-{label}", 1, 1, add=[f"{label}@example.com"])
            if pad:
                page["pad"] = "x" * pad
            body = json.dumps(page).encode()
            return raw_request(pipeline.ingest_port, "POST", PATH, body, signed_headers(pipeline.secret, body),
                               timeout=60)

        before = [post(f"before-{i}") for i in range(5)]
        assert [r.status for r in before] == [200] * 5
        ids = [r.json["request_id"] for r in before]
        stored = read_topic(broker.bootstrap, pages_topic, has_request_ids(ids))
        assert set(ids) <= {r.value["request_id"] for r in stored}

        broker.stop()
        during: list[tuple[Reply, float]] = []
        for i in range(4):
            started = time.monotonic()
            during.append((post(f"down-{i}"), time.monotonic() - started))
        assert [r.status for r, _ in during] == [503] * 4, [r.raw for r, _ in during]
        for reply, elapsed in during:
            assert reply.headers["Retry-After"].isdigit() and reply.json["error"] == "Service unavailable"
            assert elapsed < PRODUCE_TIMEOUT + 5, "answered within the bounded produce timeout"
        assert raw_request(pipeline.ingest_port, "GET", "/readyz").status == 503

        # pages that would overflow the local producer queue are refused at once, not queued
        with ThreadPoolExecutor(4) as pool:
            big = list(pool.map(lambda i: post(f"big-{i}", pad=400_000), range(4)))
        assert [r.status for r in big] == [503] * 4
        assert any(r.json["reason"] == "local producer queue is full" for r in big), [r.raw for r in big]

        broker.start()
        ensure_topics(settings)
        deadline = time.monotonic() + 90
        recovered: list[Reply] = []
        while time.monotonic() < deadline:
            reply = post(f"recover-{uuid.uuid4().hex[:6]}")
            assert reply.status in (200, 503), reply.raw
            if reply.status == 200:
                recovered.append(reply)
                break
            time.sleep(0.5)
        assert recovered, "the ingress takes pages again once the broker is back\n" + pipeline.logs()
        after = [post(f"after-{i}") for i in range(5)]
        assert [r.status for r in after] == [200] * 5
        ids = [r.json["request_id"] for r in recovered + after]
        stored = read_topic(broker.bootstrap, pages_topic, has_request_ids(ids))
        assert set(ids) <= {r.value["request_id"] for r in stored}
        assert raw_request(pipeline.ingest_port, "GET", "/readyz").status == 200
    finally:
        pipeline.stop_all()
        broker.stop()
