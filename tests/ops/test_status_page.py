"""The ingress's read-only status page: the aggregation directly, then the real page in headless Chromium."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest
from confluent_kafka import KafkaError, KafkaException, Producer

from heapsync.contracts import AppliedChunk, RejectedRecord, read_dead_letter
from heapsync.dlq_parts import split
from heapsync.kafka import ensure_topics
from heapsync.settings import Settings
from heapsync.topic_reader import Record, TopicFollower
from heapsync_dev.broker import EmbeddedBroker
from heapsync_dev.processes import free_port
from heapsync_ops.status_page import StatusBoard, Tailer, render_html, retry_delay
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
        board.on_applied(doc)
    board.on_dead_letter("sink", read_dead_letter("sink", {
        "sink": "cordial", "reason": "cordial rejected the operation", "delta_id": "d2", "account": "acme",
        "list_name": "HeapTestSegment", "operation": "add", "contact_id": "secret.person@example.com"}),
        1_790_000_000_000)
    board.on_dead_letter("assembler", read_dead_letter("assembler", {
        "reason": "sync timed out with pages missing", "sync": "acme|s7", "segment_name": "Other Segment"}),
        1_790_000_000_000)
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


def test_a_dead_letter_written_in_parts_counts_once() -> None:
    doc = {"reason": "sync timed out with pages missing", "sync": "acme|s7", "segment_name": "Big Segment",
           "missing_pages": list(range(20_000))}
    records = split(b"acme|s7", orjson.dumps(doc), 16_384)
    assert len(records) > 1
    board = StatusBoard()
    for _key, value in records:
        board.on_dead_letter("assembler", read_dead_letter("assembler", orjson.loads(value)), 1_790_000_000_000)
    snap = board.snapshot()
    assert snap["failure_counts"] == {"assembler: sync timed out with pages missing": 1}


def test_a_discarded_delta_says_discarded_not_applied_with_zero_changes() -> None:
    """``heapsync held discard`` records every chunk of the held delta as done with ``discarded`` set: the page
    must not count it as applied (0 adds, 0 removes, "cordial 2/2", green)."""
    board = StatusBoard()
    board.on_applied(applied("d1", 1, 1))
    for n in (1, 2):
        board.on_applied(applied("d9", n, 2, adds=0, removes=0).model_copy(update={"discarded": True}))
    snap = board.snapshot()
    [d9, d1] = snap["lists"][0]["syncs"]
    assert (d9["delta_id"], d9["applied"], d9["discarded"]) == ("d9", {}, {"cordial": 2})
    assert (d1["applied"], d1["discarded"]) == ({"cordial": 1}, {})
    page = render_html(snap)
    [row] = [r for r in page.split("<tr") if "task-d9" in r]
    assert "cordial discarded" in row and "cordial: held and discarded by an operator, nothing sent" in row
    assert "cordial 2/2" not in row and "class='warn'" in row
    assert (d9["last_at"], row.split("<td>")[-1]) == ("", "-</td></tr>")  # never applied: no "last applied" time


def test_a_delta_discarded_on_one_sink_and_applied_on_another_names_the_sink_that_sent_nothing() -> None:
    """The archive applied the delta, Cordial's operator discarded it: the row says which sink sent nothing,
    is not green, and "last applied" is the archive's time, not when the discard was recorded."""
    board = StatusBoard()
    sent, discarded = datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc), datetime(2026, 12, 1, 17, 0, tzinfo=timezone.utc)
    board.on_applied(applied("d9", 1, 1, sink="archive").model_copy(update={"applied_at": sent}))
    board.on_applied(applied("d9", 1, 1, adds=0, removes=0).model_copy(
        update={"discarded": True, "applied_at": discarded}))
    [d9] = board.snapshot()["lists"][0]["syncs"]
    assert (d9["applied"], d9["discarded"]) == ({"archive": 1}, {"cordial": 1})
    assert d9["last_at"].startswith("2026-12-01T09:00")
    [row] = [r for r in render_html(board.snapshot()).split("<tr") if "task-d9" in r]
    assert "archive 1/1" in row and "cordial discarded" in row
    assert "cordial: held and discarded by an operator, nothing sent" in row and "archive: held" not in row
    assert "class='warn'" in row


def test_page_escapes_names() -> None:
    board = StatusBoard()
    board.on_applied(applied("d1", 1, 1, list_name="<script>x</script>"))
    assert "<script>x" not in render_html(board.snapshot())


def test_retry_delays_double_up_to_the_cap() -> None:
    assert [retry_delay(n, 1.0, 60.0) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert retry_delay(10**6, 1.0, 60.0) == 60.0


class FlakyFollower:
    """A follower whose first polls fail like ``list_topics`` against an absent broker, then reads one record."""

    def __init__(self, failures: int, record: Record) -> None:
        self.failures, self.records, self.polls, self.closed = failures, [record], 0, False

    def poll(self) -> list[Record]:
        self.polls += 1
        if self.polls <= self.failures:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "Failed to get metadata: Local: Broker transport failure"))
        out, self.records = self.records, []
        return out

    def close(self) -> None:
        self.closed = True


def progress_record(settings: Settings, sync: str = "d1") -> Record:
    value = applied(sync, 1, 1).model_dump_json().encode()
    return Record(settings.topics.sink_progress, 0, 0, 1_790_000_000_000, None, value)


async def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def test_the_reader_retries_a_failing_list_topics_and_then_reads(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 16 #14: one broker error at start used to stop the page from updating for good."""
    settings = Settings(topic_prefix="t")
    board = StatusBoard()
    follower = FlakyFollower(3, progress_record(settings))
    made: list[tuple[str, set[str]]] = []

    def factory(bootstrap: str, topics: Iterable[str]) -> FlakyFollower:
        made.append((bootstrap, set(topics)))
        return follower

    tailer = Tailer(settings, board, follower_factory=factory, retry_base_seconds=0.001, retry_max_seconds=0.01)

    async def run() -> None:
        tailer.ensure_started()
        await wait_for(lambda: board.records == 1)
        assert tailer.task is not None and not tailer.task.done()
        await tailer.stop()

    with caplog.at_level(logging.WARNING, logger="heapsync.status_page"):
        asyncio.run(run())
    assert board.snapshot()["lists"][0]["syncs"][0]["delta_id"] == "d1"
    assert (tailer.failures, len(made), follower.closed) == (0, 1, True)  # one follower throughout: nothing read twice
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert [r.failures for r in retries] == [1, 2, 3]  # type: ignore[attr-defined]


def test_the_page_says_when_it_cannot_read_the_topics() -> None:
    assert "3 broker errors in a row" in render_html(StatusBoard().snapshot(), reader_failures=3)
    assert "broker errors" not in render_html(StatusBoard().snapshot())


def test_the_reader_retries_when_the_follower_cannot_even_be_made() -> None:
    settings = Settings(topic_prefix="t")
    board = StatusBoard()
    attempts = 0

    def factory(bootstrap: str, topics: Iterable[str]) -> FlakyFollower:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise KafkaException(KafkaError(KafkaError._INVALID_ARG, "no broker yet"))
        return FlakyFollower(0, progress_record(settings))

    tailer = Tailer(settings, board, follower_factory=factory, retry_base_seconds=0.001, retry_max_seconds=0.01)

    async def run() -> None:
        tailer.ensure_started()
        await wait_for(lambda: board.records == 1)
        await tailer.stop()

    asyncio.run(run())
    assert attempts == 3


def test_an_odd_record_is_skipped_without_stopping_the_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(topic_prefix="t")
    board = StatusBoard()
    tailer = Tailer(settings, board)
    monkeypatch.setattr(board, "on_applied", lambda doc: 1 / 0)
    tailer._feed(settings.topics.sink_progress, b'{"chunk_key": "x"}', 0)  # logged and skipped, not raised


@pytest.mark.integration
def test_the_page_recovers_when_the_broker_comes_up_after_the_ingress(tmp_path: Path) -> None:
    port = free_port()
    settings = Settings(kafka_bootstrap=f"127.0.0.1:{port}", topic_prefix=f"t{uuid.uuid4().hex[:8]}",
                        topic_partitions=1)
    board = StatusBoard()
    tailer = Tailer(settings, board, retry_base_seconds=0.2, retry_max_seconds=1.0,
                    follower_factory=lambda b, t: TopicFollower(b, t, metadata_timeout=1.0))

    async def run() -> None:
        tailer.ensure_started()
        await wait_for(lambda: tailer.failures >= 1)  # no broker yet: list_topics fails
        with EmbeddedBroker(port=port, log_path=tmp_path / "late-broker.log"):
            await asyncio.get_running_loop().run_in_executor(None, ensure_topics, settings)
            producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
            doc = applied("late", 1, 1)
            producer.produce(settings.topics.sink_progress, doc.model_dump_json().encode(), key=b"k")
            producer.flush(10)
            await wait_for(lambda: board.records == 1, timeout=60)
            assert tailer.failures == 0 and tailer.task is not None and not tailer.task.done()
            await tailer.stop()

    asyncio.run(run())
    assert board.snapshot()["lists"][0]["syncs"][0]["delta_id"] == "late"


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


class ListFollower:
    """Hands out the first batch of records, then the second once ``go`` is set, then nothing."""

    def __init__(self, first: list[Record], second: list[Record]) -> None:
        import threading

        self.batches = [first, second]
        self.go = threading.Event()

    def poll(self) -> list[Record]:
        if len(self.batches) == 1 and not self.go.wait(0.05):
            return []
        return self.batches.pop(0) if self.batches else []

    def close(self) -> None:
        pass


def test_the_page_shows_what_the_removal_rail_holds_until_it_is_decided() -> None:
    from heapsync.contracts import HeldChunk
    from tests.sink_helpers import make_delta

    settings = Settings(topic_prefix="t")
    topic = settings.topics.sink_lists
    held = HeldChunk(sink="cordial", role="held", seq=1, reason="would remove 8 of 10 members (more than 50%)",
                     members=10, removes=8, partition=0, offset=5,
                     delta=make_delta("Churn", remove=[f"u{i}@example.com" for i in range(8)], delta_id="d-held"))
    waiting = held.model_copy(update={"role": "waiting", "seq": 2, "reason": "",
                                      "delta": make_delta("Churn", add=["n@example.com"], delta_id="d-later")})
    key = {c.delta.delta_id: f"cordial|held|{c.delta.chunk_key}".encode() for c in (held, waiting)}
    follower = ListFollower(
        [Record(topic, 0, 0, 0, key["d-held"], held.model_dump_json().encode()),
         Record(topic, 0, 1, 0, key["d-later"], waiting.model_dump_json().encode())],
        [Record(topic, 0, 2, 0, key["d-held"], None), Record(topic, 0, 3, 0, key["d-later"], None)])
    board = StatusBoard()
    tailer = Tailer(settings, board, follower_factory=lambda b, t: follower)
    pages: list[str] = []

    async def run() -> None:
        tailer.ensure_started()
        await wait_for(lambda: bool(board.snapshot()["held"]))
        pages.append(render_html(board.snapshot()))
        follower.go.set()  # the sink carried the decision out: tombstones
        await wait_for(lambda: not board.snapshot()["held"])
        pages.append(render_html(board.snapshot()))
        await tailer.stop()

    asyncio.run(run())
    assert "would remove 8 of 10 members (more than 50%)" in pages[0] and "d-held" in pages[0]
    assert "heapsync held release|discard" in pages[0] and "example.com" not in pages[0]
    assert "Nothing held." in pages[1]
