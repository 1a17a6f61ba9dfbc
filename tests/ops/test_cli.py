"""Operator commands against a real broker, without the Faust worker: topics, delta replay, status tables."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from heapsync.contracts import Delta
from heapsync.topic_reader import read_topic
from tests.conftest import Pipeline

pytestmark = pytest.mark.integration


def run(pipeline: Pipeline, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "heapsync_ops.cli", *args], env=pipeline.env(**env),
                          capture_output=True, text=True, timeout=120)


def commit_as(pipeline: Pipeline, group: str, offsets: list[Any]) -> None:
    """Commit ``offsets`` (TopicPartitions) for ``group``, as its consumers would, retrying while a fresh
    broker's group coordinator is still loading."""
    from confluent_kafka import Consumer, KafkaException

    committer = Consumer({"bootstrap.servers": pipeline.broker.bootstrap, "group.id": group,
                          "enable.auto.commit": False})
    try:
        for attempt in range(60):
            try:
                committer.commit(offsets=offsets, asynchronous=False)
                return
            except KafkaException:
                if attempt == 59:
                    raise
                time.sleep(0.5)
    finally:
        committer.close()


def test_topics_are_created_with_explicit_settings_and_drift_is_flagged(pipeline: Pipeline) -> None:
    res = run(pipeline, "topics", "--json")
    assert res.returncode == 0, res.stderr
    rows = {r["topic"].removeprefix(pipeline.prefix + "."): r for r in json.loads(res.stdout)}
    assert set(rows) == {"pages", "pages.rejected", "deltas", "deltas.dlq", "sink.dlq", "sink.progress", "dlq.redrive",
                         "sink.lists"}
    assert all(r["state"] == "created" and r["partitions"] == 3 for r in rows.values())
    # the removal rail's counts and held deltas must outlive the retention
    assert (rows["sink.lists"]["cleanup_policy"], rows["sink.lists"]["retention"]) == ("compact", "forever")
    assert rows["pages"]["retention"] == "14d" and rows["pages"]["cleanup_policy"] == "delete"
    assert rows["sink.progress"]["cleanup_policy"] == rows["dlq.redrive"]["cleanup_policy"] == "compact,delete"
    assert rows["sink.progress"]["retention"] == rows["dlq.redrive"]["retention"] == "14d"

    res = run(pipeline, "topics", "--json", "--no-create", HEAPSYNC_TOPIC_RETENTION_DAYS="7")
    rows = {r["topic"].removeprefix(pipeline.prefix + "."): r for r in json.loads(res.stdout)}
    assert rows["pages"]["state"].startswith("differs: retention.ms=1209600000 (wanted 604800000)")
    assert rows["sink.progress"]["state"].startswith("differs: retention.ms=1209600000 (wanted 604800000)")
    assert rows["deltas"]["state"].startswith("differs")
    assert rows["sink.lists"]["state"] == "ok"
    table = run(pipeline, "topics").stdout
    assert f"{pipeline.prefix}.pages" in table and "14d" in table


def test_replay_deltas_reproduces_chunks_in_their_partition_with_a_replay_id(pipeline: Pipeline) -> None:
    assert run(pipeline, "topics", "--json").returncode == 0
    topic = f"{pipeline.prefix}.deltas"
    producer = Producer({"bootstrap.servers": pipeline.broker.bootstrap})
    for i, lst in enumerate(["ListA", "ListB", "ListA"]):
        d = Delta(delta_id=f"d{i}", account="acme" if i < 2 else "other", segment_id=str(i), segment_name=lst,
                  list_name=lst, identity_field="email", kind="sync", add=[f"u{i}@example.com"])
        producer.produce(topic, d.model_dump_json().encode(), key=f"{d.account}:{lst}".encode())
    producer.flush(10)
    original = {json.loads(r.value or b"{}")["delta_id"]: r.partition for r in read_topic(pipeline.broker.bootstrap, topic)}

    dry = json.loads(run(pipeline, "replay", "deltas", "--from-offset", "0", "--account", "acme", "--dry-run",
                         "--json").stdout)
    assert (dry["selected"], dry["produced"], dry["skipped"]) == (2, 0, {"other account": 1})
    done = json.loads(run(pipeline, "replay", "deltas", "--from-offset", "0", "--segment", "ListA", "--json").stdout)
    assert done["produced"] == 2
    copies = [(json.loads(r.value or b"{}"), r.partition) for r in read_topic(pipeline.broker.bootstrap, topic)]
    replayed = [(d["delta_id"], p) for d, p in copies if d.get("replay_id") == done["replay_id"]]
    assert sorted(replayed) == sorted((k, original[k]) for k in ("d0", "d2"))
    # replaying again skips the copies of the first replay
    again = json.loads(run(pipeline, "replay", "deltas", "--from-offset", "0", "--json").stdout)
    assert again["produced"] == 3 and again["skipped"] == {"earlier replay": 2}
    bad = run(pipeline, "replay", "deltas", "--since", "yesterday")
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr


def test_replay_draws_a_progress_bar_on_a_terminal_and_status_prints_tables(pipeline: Pipeline, tmp_path: Path) -> None:
    assert run(pipeline, "topics", "--json").returncode == 0
    producer = Producer({"bootstrap.servers": pipeline.broker.bootstrap})
    for i in range(5):
        producer.produce(f"{pipeline.prefix}.pages", b'{"control":"tick"}', partition=i % 3)
    producer.flush(10)
    # a pseudo-terminal on stderr: rich draws its bar there, stdout stays the report
    leader, follower = pty.openpty()
    res = subprocess.run([sys.executable, "-m", "heapsync_ops.cli", "replay", "pages", "--from-offset", "0", "--dry-run"],
                         env=pipeline.env(), stdout=subprocess.PIPE, stderr=follower, text=True, timeout=120)
    os.close(follower)
    drawn = b""
    try:
        while chunk := os.read(leader, 65536):
            drawn += chunk
    except OSError:
        pass
    os.close(leader)
    assert res.returncode == 0
    assert "scanning" in drawn.decode(errors="replace") and "5/5" in drawn.decode(errors="replace")
    assert "skipped tick: 5" in res.stdout

    status = run(pipeline, "status")
    assert status.returncode == 0, status.stderr
    for title in ("consumer lag", "open syncs: none", "dead letters (not re-driven): none", "last applied per list"):
        assert title in status.stdout


def test_dlq_list_and_show_for_an_operator(pipeline: Pipeline) -> None:
    assert run(pipeline, "topics", "--json").returncode == 0
    producer = Producer({"bootstrap.servers": pipeline.broker.bootstrap})
    producer.produce(f"{pipeline.prefix}.sink.dlq", json.dumps({
        "sink": "cordial", "reason": "cordial rejected the operation", "delta_id": "d1", "chunk": 1,
        "account": "acme", "list_name": "L", "operation": "add", "contact_id": "who@example.com",
        "identity_key": "email", "status": 422}).encode(), key=b"d1", partition=1)
    producer.flush(10)
    listed = run(pipeline, "dlq", "list")
    assert listed.returncode == 0 and "sink:1:0" in listed.stdout and "add on list L" in listed.stdout
    assert "who@example.com" not in listed.stdout  # only `dlq show` prints user ids
    shown = json.loads(run(pipeline, "dlq", "show", "sink:1:0").stdout)
    assert shown["state"] == "pending" and shown["entry"]["contact_id"] == "who@example.com"
    assert run(pipeline, "dlq", "show", "sink:1:99").returncode == 1
    assert run(pipeline, "dlq", "list", "--topic", "sink", "--reason", "timed out").stdout.strip() == "dead letters: none"


def test_status_lag_is_exact_per_partition(pipeline: Pipeline) -> None:
    """Known records and commits give known lag: committed, end and lag per group and partition."""
    from confluent_kafka import TopicPartition

    if pipeline.broker.kind == "tansu":
        pytest.skip("Tansu reports a partition's end as the first offset of its last batch: lag is approximate there")
    assert run(pipeline, "topics", "--json").returncode == 0
    pages, deltas = f"{pipeline.prefix}.pages", f"{pipeline.prefix}.deltas"
    assembler, sink = f"{pipeline.prefix}-assembler", f"{pipeline.prefix}-sink"
    producer = Producer({"bootstrap.servers": pipeline.broker.bootstrap})
    for partition, count in ((0, 5), (1, 3)):
        for _ in range(count):
            producer.produce(pages, b"{}", partition=partition)
    for _ in range(4):
        producer.produce(deltas, b"{}", partition=2)
    assert producer.flush(30) == 0
    commit_as(pipeline, assembler, [TopicPartition(pages, 0, 2)])
    commit_as(pipeline, sink, [TopicPartition(deltas, 2, 4)])

    res = run(pipeline, "status", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout)
    lag = {(r["group"], r["partition"]): (r["committed"], r["end"], r["lag"]) for r in doc["lag"]}
    assert lag == {
        (assembler, 0): (2, 5, 3), (assembler, 1): (None, 3, 3), (assembler, 2): (None, 0, 0),
        (sink, 0): (None, 0, 0), (sink, 1): (None, 0, 0), (sink, 2): (4, 4, 0),
    }
    assert doc["lag_total"] == {assembler: 6, sink: 0}
    assert doc["lag_unknown"] == {}
    assert "total lag: " + f"{assembler}: 6, {sink}: 0" in run(pipeline, "status").stdout


def test_status_does_not_count_the_workers_newest_tick_as_lag(pipeline: Pipeline) -> None:
    """A sync fully applied, then the leader's timer tick lands: the assembler is not behind, even
    before the group commits the tick (up to Faust's 2.8 s commit interval; `make run` showed lag 1
    on every pages partition). Ticks behind it, or a page after it, still count."""
    from confluent_kafka import TopicPartition

    from heapsync.contracts import TICK
    from heapsync.lag import LagProbe

    assert run(pipeline, "topics", "--json").returncode == 0
    pages, assembler = f"{pipeline.prefix}.pages", f"{pipeline.prefix}-assembler"
    producer = Producer({"bootstrap.servers": pipeline.broker.bootstrap})
    # partition: records, committed offset, lag: one batch each (Tansu's end is its last batch's first offset + 1)
    layout = {0: ([b"{}", TICK], 1, 0), 1: ([TICK, TICK], 0, 1), 2: ([TICK, b"{}"], 0, 2)}
    for partition, (records, _, _) in layout.items():
        for value in records:
            producer.produce(pages, value, partition=partition)
            assert producer.flush(30) == 0
    commit_as(pipeline, assembler, [TopicPartition(pages, p, c) for p, (_, c, _) in layout.items()])

    res = run(pipeline, "status", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout)
    lag = {r["partition"]: (r["committed"], r["end"], r["lag"]) for r in doc["lag"] if r["group"] == assembler}
    assert lag == {p: (c, len(records), want) for p, (records, c, want) in layout.items()}
    assert doc["lag_total"][assembler] == 3
    # the worker's heapsync_consumer_lag gauge: the same rule, so the alert and the CLI agree
    probe = LagProbe(pipeline.broker.bootstrap)
    try:
        assert {r.partition: r.lag for r in probe.rows(assembler, pages, ticks=True)} == {0: 0, 1: 1, 2: 2}
    finally:
        probe.close()


def test_status_on_a_fresh_kafka_waits_for_the_group_coordinator(kafka_tier: None, tmp_path: Path) -> None:
    """Right after Kafka starts, the first group request makes it create and load __consumer_offsets:
    status waits for the coordinator instead of crashing (the admin offsets call died with SIGSEGV)."""
    from heapsync_dev.apache_kafka import KafkaCluster

    with KafkaCluster(nodes=1, log_dir=tmp_path) as kafka:
        env = {**os.environ, "HEAPSYNC_KAFKA_BOOTSTRAP": kafka.bootstrap, "HEAPSYNC_TOPIC_PREFIX": "fresh",
               "HEAPSYNC_TOPIC_PARTITIONS": "2"}
        cli = [sys.executable, "-m", "heapsync_ops.cli"]
        assert subprocess.run([*cli, "topics"], env=env, capture_output=True, timeout=120).returncode == 0
        res = subprocess.run([*cli, "status", "--json"], env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, (res.returncode, res.stderr[-3000:])
        doc = json.loads(res.stdout)
        assert doc["lag_unknown"] == {}
        assert doc["lag_total"] == {"heapsync-assembler": 0, "heapsync-cordial-sink": 0}
        assert len(doc["lag"]) == 4


def test_replay_start_is_found_by_time_without_reading_earlier_records(pipeline: Pipeline) -> None:
    """--since looks the start up with offsets-for-times: on Apache Kafka only the records at or after
    the time are read (the progress estimate is exact); on any broker only those are yielded."""
    from tests.conftest import create_topic

    topic = create_topic(pipeline.broker.bootstrap, f"{pipeline.prefix}.timed", 2)
    producer = Producer({"bootstrap.servers": pipeline.broker.bootstrap})
    base = int(time.time() * 1000) - 60_000
    for i in range(10):
        producer.produce(topic, f"r{i}".encode(), partition=i % 2, timestamp=base + i * 1000)
    assert producer.flush(30) == 0
    estimates: list[int | None] = []
    got = [r.value for r in read_topic(pipeline.broker.bootstrap, topic, since_ms=base + 6000,
                                       on_start=estimates.append)]
    assert sorted(got) == [b"r6", b"r7", b"r8", b"r9"]
    if pipeline.broker.kind == "kafka":
        assert estimates == [4]
