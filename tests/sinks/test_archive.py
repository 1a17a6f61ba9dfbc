"""The archive sink: what it wrote is read back, as an auditor or a warehouse load would."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer

from heapsync.contracts import Delta
from heapsync.settings import Settings
from heapsync.topic_reader import read_topic
from heapsync_dev.processes import free_port
from sinks.archive import ArchiveWriter, recover_partial
from tests.conftest import Pipeline, http


def read_archive(directory: Path) -> list[dict]:
    """Only completed files, the way a loader must read them."""
    return [json.loads(line) for f in sorted(directory.glob("dt=*/*.jsonl")) for line in f.read_text().splitlines()]


class Clock:
    def __init__(self) -> None:
        self.now = 1_790_000_000.0

    def __call__(self) -> float:
        return self.now


def test_files_rotate_by_size_and_by_age_and_only_complete_files_are_final(tmp_path: Path) -> None:
    clock = Clock()
    w = ArchiveWriter(tmp_path, max_bytes=100, max_seconds=60, clock=clock)
    for i in range(3):
        w.write(json.dumps({"n": i, "pad": "x" * 40}).encode())
    # 2 lines (~56 bytes each) fill the first file past 100 bytes: the third opened a second file
    assert len(list(tmp_path.glob("dt=*/*.jsonl"))) == 1
    assert len(list(tmp_path.glob("dt=*/*.jsonl.part"))) == 1
    clock.now += 61
    assert w.due()
    w.write(b'{"n": 3}')
    assert len(list(tmp_path.glob("dt=*/*.jsonl"))) == 2
    w.close()
    assert not list(tmp_path.glob("dt=*/*.part"))
    assert [d["n"] for d in read_archive(tmp_path)] == [0, 1, 2, 3]
    assert all(p.parent.name.startswith("dt=") for p in w.completed)


def test_a_part_file_left_by_a_crash_keeps_its_complete_lines(tmp_path: Path) -> None:
    folder = tmp_path / "dt=2026-11-24"
    folder.mkdir()
    part = folder / "deltas-x.jsonl.part"
    part.write_bytes(b'{"n": 1}\n{"n": 2}\n{"n": 3, "cut')
    final = recover_partial(part)
    assert final is not None and final.name == "deltas-x.jsonl" and not part.exists()
    assert final.read_bytes() == b'{"n": 1}\n{"n": 2}\n'
    empty = folder / "deltas-y.jsonl.part"
    empty.write_bytes(b'{"half')
    assert recover_partial(empty) is None and not empty.exists()
    # the writer completes left-overs on start
    (folder / "deltas-z.jsonl.part").write_bytes(b'{"n": 9}\n')
    ArchiveWriter(tmp_path, max_bytes=10, max_seconds=10).recover()
    assert sorted(d["n"] for d in read_archive(tmp_path)) == [1, 2, 9]


@pytest.mark.integration
def test_archive_process_writes_every_delta_and_records_its_progress(pipeline: Pipeline, tmp_path: Path) -> None:
    env = pipeline.env()
    settings = Settings(kafka_bootstrap=env["HEAPSYNC_KAFKA_BOOTSTRAP"], topic_prefix=pipeline.prefix,
                        topic_partitions=3)
    from heapsync.kafka import ensure_topics

    ensure_topics(settings)
    deltas = [Delta(delta_id=f"d{i}", account="acme", segment_id="1", segment_name="Heap Test Segment",
                    list_name="HeapTestSegment", identity_field="email", kind="sync", sync_task_id=f"s{i}",
                    chunk=1, chunks=1, add=[f"u{i}@example.com"]) for i in range(5)]
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    for d in deltas[:3]:
        producer.produce(settings.topics.deltas, d.model_dump_json().encode(), key=b"acme:HeapTestSegment")
    producer.flush(10)

    out = tmp_path / "archive"
    metrics_port = free_port()
    proc = pipeline.start("archive", "archive", "--dir", str(out), "--max-seconds", "1",
                          env=pipeline.env(HEAPSYNC_ARCHIVE_GROUP=f"{pipeline.prefix}-archive",
                                           HEAPSYNC_METRICS_PORT=str(metrics_port)))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(read_archive(out)) < 3:
        time.sleep(0.5)
    # deltas that arrive while it runs land in later files
    for d in deltas[3:]:
        producer.produce(settings.topics.deltas, d.model_dump_json().encode(), key=b"acme:HeapTestSegment")
    producer.flush(10)
    while time.monotonic() < deadline and len(read_archive(out)) < 5:
        time.sleep(0.5)
    scraped = http("GET", f"http://127.0.0.1:{metrics_port}/metrics").body
    assert 'heapsync_sink_chunks_total{result="applied",sink="archive"} 5.0' in scraped, scraped
    proc.stop()
    assert proc.popen.returncode == 0, pipeline.logs()

    lines = read_archive(out)
    assert sorted(Delta.model_validate(d).delta_id for d in lines) == [f"d{i}" for i in range(5)], pipeline.logs()
    assert len(list(out.glob("dt=*/*.jsonl"))) >= 2  # rotated by age at least once
    assert not list(out.glob("dt=*/*.part"))  # a clean stop completes the open file

    progress = [json.loads(r.value or b"{}") for r in read_topic(settings.kafka_bootstrap, settings.topics.sink_progress)]
    assert sorted(p["chunk_key"] for p in progress if p["sink"] == "archive") == [f"d{i}:1" for i in range(5)]
