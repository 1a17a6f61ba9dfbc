"""The ingress's read-only status page: the aggregation directly, then the real page in headless Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from confluent_kafka import Producer

from heapsync.contracts import AppliedChunk, RejectedRecord
from heapsync.kafka import ensure_topics
from heapsync.settings import Settings
from ingest.status_page import StatusBoard, render_html
from tests.conftest import Pipeline, http

CHROMIUM = Path("/usr/bin/chromium")


def applied(sync: str, chunk: int, chunks: int, *, sink: str = "cordial", replay_id: str | None = None,
            adds: int = 3, removes: int = 1, list_name: str = "HeapTestSegment") -> AppliedChunk:
    key = f"{sync}:{chunk}" + (f"@{replay_id}" if replay_id else "")
    return AppliedChunk(sink=sink, chunk_key=key, delta_id=sync, chunk=chunk, chunks=chunks, account="acme",
                        list_name=list_name, segment_id="1", sync_task_id=f"task-{sync}", kind="sync",
                        complete=True, adds=adds, removes=removes)


def test_board_shows_progress_per_sink_adds_removes_and_failures_without_user_ids() -> None:
    board = StatusBoard(recent=2)
    for doc in (applied("d1", 1, 2), applied("d1", 2, 2), applied("d1", 1, 2, sink="archive"),
                applied("d2", 1, 1), applied("d1", 1, 2, replay_id="r9")):
        board.on_applied(doc.model_dump(mode="json"))
    board.on_dead_letter("sink", {"sink": "cordial", "reason": "cordial rejected the operation", "delta_id": "d2",
                                  "account": "acme", "list_name": "HeapTestSegment", "operation": "add",
                                  "contact_id": "secret.person@example.com"}, 1_790_000_000_000)
    board.on_dead_letter("assembler", {"reason": "sync timed out with pages missing", "sync": "acme|s7",
                                       "segment_name": "Other Segment"}, 1_790_000_000_000)
    snap = board.snapshot()
    [group] = snap["lists"]
    # two most recent syncs kept, newest first; the first d1 fell out when the replay arrived
    assert [(s["delta_id"], s["replay_id"]) for s in group["syncs"]] == [("d1", "r9"), ("d2", None)]
    d2 = group["syncs"][1]
    assert (d2["applied"], d2["adds"], d2["removes"], d2["dead_lettered"]) == ({"cordial": 1}, 3, 1, 1)
    assert snap["failure_counts"] == {"assembler: sync timed out with pages missing": 1,
                                      "sink: cordial rejected the operation": 1}
    assert snap["failures"][0]["list_name"] == "OtherSegment" and snap["failures"][0]["account"] == "acme"
    page = render_html(snap)
    assert "acme / HeapTestSegment" in page and "replay r9" in page
    assert "secret.person" not in page


def test_page_escapes_names() -> None:
    board = StatusBoard()
    board.on_applied(applied("d1", 1, 1, list_name="<script>x</script>").model_dump(mode="json"))
    assert "<script>x" not in render_html(board.snapshot())


def chromium(*args: str, profile: Path, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1200,900"]
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.integration
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (apt-get install chromium; "
                                                  ".ci/run installs it)")
def test_status_page_in_headless_chromium(pipeline: Pipeline, tmp_path: Path) -> None:
    env = pipeline.env()
    settings = Settings(kafka_bootstrap=env["HEAPSYNC_KAFKA_BOOTSTRAP"], topic_prefix=pipeline.prefix,
                        topic_partitions=3)
    ensure_topics(settings)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    t = settings.topics
    for doc in (applied("d1", 1, 2), applied("d1", 2, 2), applied("d1", 1, 2, sink="archive"),
                applied("d2", 1, 1, adds=7, removes=0, list_name="VipCustomers")):
        producer.produce(t.sink_progress, doc.model_dump_json().encode(), key=f"{doc.sink}|{doc.chunk_key}".encode())
    producer.produce(t.sink_dlq, b'{"sink":"cordial","reason":"cordial rejected the operation","delta_id":"d1",'
                                 b'"account":"acme","list_name":"HeapTestSegment","operation":"add",'
                                 b'"contact_id":"hidden@example.com","status":422}', key=b"d1")
    producer.produce(t.rejected, RejectedRecord(account="acme", request_id="r1", received_at=datetime.now(timezone.utc),
                                                reason="invalid payload", body="{}").model_dump_json().encode(),
                     key=b"acme")
    producer.flush(10)

    pipeline.start_ingest()
    base = f"http://127.0.0.1:{pipeline.admin_port}"  # the ingress's admin listener
    deadline = time.monotonic() + 60
    snap: dict = {}
    while time.monotonic() < deadline:
        snap = http("GET", f"{base}/status.json").body
        if snap.get("records_read", 0) >= 6:
            break
        time.sleep(0.5)
    assert snap.get("records_read") == 6, (snap, pipeline.logs())

    dom = chromium("--dump-dom", f"{base}/status", profile=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = dom.stdout
    for expected in ("heapsync status", "acme / HeapTestSegment", "acme / VipCustomers", "task-d1",
                     "cordial 2/2", "archive 1/2", "sink: cordial rejected the operation", "rejected: invalid payload"):
        assert expected in text, expected
    assert "hidden@example.com" not in text

    png = tmp_path / "status.png"
    shot = chromium(f"--screenshot={png}", f"{base}/status", profile=tmp_path / "profile-shot")
    assert shot.returncode == 0 and png.exists(), shot.stderr[-2000:]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000  # a rendered page, not a blank image
    keep = os.environ.get("HEAPSYNC_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(png, Path(keep) / "status.png")
