"""A sync larger than the worker's memory settings, through the real worker on the real broker (issue 15):
the delta is exact and the worker's peak RSS stays under a bound that the one-dict emission exceeds."""

from __future__ import annotations

import os
import random
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
from confluent_kafka import Producer

from heapsync.contracts import PageRecord, delta_id_for
from heapsync_dev.samples import heap_request
from ingest.app import record_key
from tests.conftest import Pipeline
from tests.processors.test_crash import DeltaReader, Pages, assert_exact, reader  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

PAGES = int(os.environ.get("HEAPSYNC_TEST_LARGE_SYNC_PAGES", "600"))
PER_PAGE = 1000
CAP = 20_000
"""The cache and emission bounds of the worker under test: the sync is 20 times larger."""
RSS_BOUND_MB = float(os.environ.get("HEAPSYNC_TEST_LARGE_SYNC_RSS_MB", "190"))
"""Peak RSS the worker must stay under. Measured on this sync (600,000 ids, RocksDB store): 160 MB
streamed (a worker at rest is ~150 MB); 223 MB with the one-dict emission of the code before issue 15."""


def large_sync(rnd: random.Random, tag: str) -> Pages:
    """Adds, removes of ids added on earlier pages, and re-adds of removed ones: page order matters."""
    users = [f"{tag}-{i:07d}@example.com" for i in range(PAGES * PER_PAGE)]
    out: Pages = []
    removed: list[str] = []
    for n in range(PAGES):
        add = users[n * PER_PAGE:(n + 1) * PER_PAGE - 10] + removed[-5:]  # re-adds
        remove = rnd.sample(users[:n * PER_PAGE], 10) if n else []
        removed = remove
        out.append((add, remove))
    return out


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def produce_pages(pipeline: Pipeline, sync: str, pages: Pages) -> None:
    """The pages as the ingress writes them (PageRecord, key account+segment), straight to the topic."""
    producer = Producer({"bootstrap.servers": pipeline.broker.bootstrap, "enable.idempotence": True,
                         "linger.ms": 5, "compression.type": "lz4", "message.max.bytes": 16 * 1024 * 1024})
    key = record_key("acme", "15")
    for n, (add, remove) in enumerate(pages, start=1):
        record = PageRecord(account="acme", request_id=str(uuid.uuid4()), received_at=datetime.now(timezone.utc),
                            payload=heap_request(sync, n, len(pages), add=add, remove=remove, segment_id="15",
                                                 segment_name="Large Segment"))
        while True:
            try:
                producer.produce(f"{pipeline.prefix}.pages", record.model_dump_json().encode(), key=key)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    assert producer.flush(60) == 0


def test_sync_larger_than_the_memory_settings_is_exact_with_bounded_worker_rss(
        pipeline: Pipeline, reader: DeltaReader) -> None:  # noqa: F811
    pipeline.extra_env.update({
        "HEAPSYNC_PROCESSOR_CACHE_MAX_IDS": str(CAP),
        "HEAPSYNC_PROCESSOR_EMIT_MAX_IDS": str(CAP),
        "HEAPSYNC_DELTA_CHUNK_SIZE": "5000",
    })
    worker = pipeline.start("process", "process")
    sync = str(uuid.uuid4())
    pages = large_sync(random.Random(15), "big")
    produce_pages(pipeline, sync, pages)
    chunks = reader.wait_for(delta_id_for("acme", sync), timeout=600)
    rss = peak_rss_mb(worker.popen.pid)
    print(f"worker peak RSS {rss:.0f} MB for {PAGES * PER_PAGE:,} ids")
    assert_exact(chunks, pages)
    assert "scratch files" in worker.output(), "the sync was not assembled through the spilled buckets"
    assert not list((pipeline.workdir / "processor" / "scratch").glob("*")), "scratch files left behind"
    assert rss < RSS_BOUND_MB, f"worker peak RSS {rss:.0f} MB, bound {RSS_BOUND_MB:.0f} MB"
