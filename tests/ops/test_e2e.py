"""Operations on the real chain (Tansu, ingress, Faust worker, sink, simulator over HTTP):
a stopped sink's backlog drains, a bug-fix replay restores the lists, dead letters re-driven
after their cause is fixed end applied. The operator commands run as the CLI, like an operator would."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import uuid
import zlib
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from confluent_kafka import Producer

from heapsync.contracts import RejectedRecord
from heapsync.kafka import java_partition
from heapsync.topic_reader import read_topic
from heapsync_dev.samples import heap_request
from tests.conftest import Pipeline, http

pytestmark = pytest.mark.integration

LIST = "HeapTestSegment"


def cli(pipeline: Pipeline, *args: str, ok: tuple[int, ...] = (0,)) -> Any:
    """Run ``heapsync <args> --json`` against the pipeline's topics; the parsed JSON output."""
    res = subprocess.run([sys.executable, "-m", "heapsync_ops.cli", *args, "--json"], env=pipeline.env(),
                         capture_output=True, text=True, timeout=180)
    assert res.returncode in ok, f"heapsync {' '.join(args)} -> {res.returncode}\n{res.stdout}\n{res.stderr[-3000:]}"
    return json.loads(res.stdout)


def wait_for(what: str, check: Any, pipeline: Pipeline, timeout: float = 120.0, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}; last: {last}\n{pipeline.logs()}")


def users(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}@example.com" for i in range(n)]


def sink_lag(doc: dict[str, Any], pipeline: Pipeline) -> int:
    return doc["lag_total"].get(f"{pipeline.prefix}-sink", 0)


def cordial(pipeline: Pipeline, method: str, path: str, body: dict[str, Any]) -> int:
    auth = base64.b64encode(f"{pipeline.cordial_key}:".encode()).decode()
    return http(method, f"{pipeline.sim_url}/v2{path}", json.dumps(body).encode(),
                {"Content-Type": "application/json", "Authorization": f"Basic {auth}"}).status


def test_stopped_sink_backlog_drains_and_a_bug_fix_replay_gives_the_same_lists(pipeline: Pipeline) -> None:
    pipeline.start_simulator()
    pipeline.start_ingest()
    pipeline.start("process", "process")
    # the sink is down while syncs arrive
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    first = users("a", 10)
    assert pipeline.post(heap_request(a, 2, 2, add=first[5:])).status == 200
    assert pipeline.post(heap_request(a, 1, 2, add=first[:5])).status == 200
    assert pipeline.post(heap_request(b, 1, 1, add=["b0@example.com"], remove=first[:2])).status == 200
    # an open sync of another segment: 1 of 3 pages
    open_sync = str(uuid.uuid4())
    assert pipeline.post(heap_request(open_sync, 1, 3, add=["o@example.com"], segment_id="77",
                                      segment_name="Open Segment")).status == 200

    def backlog() -> dict[str, Any] | None:
        doc = cli(pipeline, "status")
        opened = [s for s in doc["open_syncs"] if s["sync"].endswith(open_sync)]
        # two delta chunks wait; Tansu may count a batch of them as one (its high watermark lags), Kafka as two
        return doc if sink_lag(doc, pipeline) >= 1 and opened else None

    doc = wait_for("the sink's backlog and the open sync in status", backlog, pipeline, timeout=150, every=3)
    [opened] = [s for s in doc["open_syncs"] if s["sync"].endswith(open_sync)]
    assert (opened["pages_received"], opened["total_pages"], opened["account"]) == (1, 3, "acme")
    assert opened["age_seconds"] >= 0
    assert pipeline.lists().get(LIST) is None  # nothing applied while the sink is down

    pipeline.start("sink", "sink")
    expected = (set(first) - set(first[:2])) | {"b0@example.com"}
    assert pipeline.wait_for_members(LIST, expected) == expected, pipeline.logs()
    drained = wait_for("the backlog to drain", lambda: (lambda d: d if sink_lag(d, pipeline) == 0 else None)(
        cli(pipeline, "status")), pipeline, timeout=60, every=2)
    assert drained["lag_total"][f"{pipeline.prefix}-assembler"] == 0

    # two more syncs, then a "processor bug" is simulated by damaging Cordial's list directly
    since = (datetime.now(timezone.utc) - timedelta(milliseconds=50)).isoformat()
    c, d = str(uuid.uuid4()), str(uuid.uuid4())
    assert pipeline.post(heap_request(c, 1, 2, add=["c0@example.com", "c1@example.com"])).status == 200
    assert pipeline.post(heap_request(c, 2, 2, remove=["a5@example.com"])).status == 200
    assert pipeline.post(heap_request(d, 1, 1, add=["d0@example.com"], remove=["c1@example.com"])).status == 200
    expected = (expected - {"a5@example.com", "c1@example.com"}) | {"c0@example.com", "d0@example.com"}
    assert pipeline.wait_for_members(LIST, expected) == expected, pipeline.logs()
    assert cordial(pipeline, "PUT", "/contacts/email:c0@example.com", {LIST: False}) == 200
    assert cordial(pipeline, "POST", "/contacts", {"channels": {"email": {"address": "c1@example.com"}},
                                                   LIST: True}) == 200
    assert set(pipeline.lists()[LIST]) != expected

    dry = cli(pipeline, "replay", "pages", "--since", since, "--dry-run")
    assert dry["produced"] == 0
    assert sorted((g["sync"], g["records"]) for g in dry["groups"]) == sorted([(c, 2), (d, 1)])
    assert dry["incomplete_syncs"] == []
    done = cli(pipeline, "replay", "pages", "--since", since, "--account", "acme")
    assert done["produced"] == 3
    assert pipeline.wait_for_members(LIST, expected) == expected, pipeline.logs()
    # the open sync was older than --since: untouched, still open and alone
    assert "OpenSegment" not in pipeline.lists()


def test_dead_letters_redriven_after_the_cause_is_fixed_end_applied(pipeline: Pipeline) -> None:
    pipeline.extra_env.update({
        "HEAPSYNC_PARTIAL_POLICY": "dead-letter",
        "HEAPSYNC_SYNC_TIMEOUT_SECONDS": "4",
        "HEAPSYNC_SINK_MAX_RETRIES": "0",
    })
    pipeline.start_all()
    # Cordial fails every call: the sink dead-letters the operations
    assert http("POST", f"{pipeline.sim_url}/_sim/config", b'{"error_rate": 1.0}').status == 200
    assert pipeline.post(heap_request(str(uuid.uuid4()), 1, 1, add=["a1@example.com", "a2@example.com"])).status == 200
    wait_for("two sink dead letters", lambda: len(cli(pipeline, "dlq", "list", "--topic", "sink")) >= 2, pipeline,
             timeout=150, every=3)
    assert http("POST", f"{pipeline.sim_url}/_sim/config", b'{"error_rate": 0.0}').status == 200  # cause fixed

    # a sync that never completes: dead-lettered by the assembler with the page it held
    assert pipeline.post(heap_request(str(uuid.uuid4()), 1, 2, add=["b1@example.com"], segment_id="2",
                                      segment_name="Segment Two")).status == 200
    # an invalid request (kept in the rejected topic) and one an older, stricter validator rejected
    assert pipeline.post(heap_request("x", 3, 2, add=["z@example.com"])).status == 400
    valid_body = json.dumps(heap_request(str(uuid.uuid4()), 1, 1, add=["c1@example.com"], segment_id="3",
                                         segment_name="Segment Three"))
    producer = Producer({"bootstrap.servers": pipeline.broker.bootstrap})
    producer.produce(f"{pipeline.prefix}.pages.rejected", RejectedRecord(
        account="acme", request_id="old-validator", received_at=datetime.now(timezone.utc),
        reason="invalid payload", body=valid_body).model_dump_json().encode(), key=b"acme")
    producer.flush(10)
    wait_for("the assembler's dead letter", lambda: cli(pipeline, "dlq", "list", "--topic", "assembler"),
             pipeline, timeout=90, every=2)
    status = cli(pipeline, "status")
    assert status["dead_letters"]["sink"] == {"cordial kept failing": 2}
    assert status["dead_letters"]["rejected"] == {"invalid payload": 2}

    report = cli(pipeline, "dlq", "redrive", ok=(2,))  # 2: one entry is still invalid
    outcomes = {(o["entry"].split(":")[0], o["outcome"]) for o in report["outcomes"]}
    assert outcomes == {("sink", "redriven"), ("assembler", "redriven"), ("rejected", "redriven"),
                        ("rejected", "failed")}, report
    assert report["produced"] == {"pages": 1, "deltas": 2}, report

    for name, members in ((LIST, {"a1@example.com", "a2@example.com"}), ("SegmentTwo", {"b1@example.com"}),
                          ("SegmentThree", {"c1@example.com"})):
        assert pipeline.wait_for_members(name, members) == members, pipeline.logs()

    # a re-driven delta lands on the partition the worker gives its list (murmur2, as Kafka's Java
    # clients), not librdkafka's CRC32 one: here they differ (3 partitions), so order holds per list
    assert java_partition(f"acme:{LIST}".encode(), 3) != zlib.crc32(f"acme:{LIST}".encode()) % 3
    partitions: dict[bytes | None, set[int]] = {}
    for rec in read_topic(pipeline.broker.bootstrap, f"{pipeline.prefix}.deltas", idle_timeout=5.0):
        partitions.setdefault(rec.key, set()).add(rec.partition)
    assert partitions[f"acme:{LIST}".encode()] == {java_partition(f"acme:{LIST}".encode(), 3)}, partitions
    assert all(len(found) == 1 for found in partitions.values()), partitions

    # nothing is re-driven twice; the still-invalid request is tried again and kept
    again = cli(pipeline, "dlq", "redrive", ok=(2,))
    assert again["produced"] == {"pages": 0, "deltas": 0} and again["skipped_already_redriven"] == 4, again
    pending = cli(pipeline, "dlq", "list")
    assert [(e["reason"], e["state"]) for e in pending] == [("invalid payload", "failed")]
