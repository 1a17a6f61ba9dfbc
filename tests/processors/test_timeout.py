"""Timeouts through the real worker: ticks on the pages topic time out a sync that lost a page."""

from __future__ import annotations

import time
import uuid

import orjson
import pytest
from confluent_kafka import Consumer

from heapsync.contracts import delta_id_for
from heapsync_dev.processes import free_port
from tests.conftest import Pipeline, http
from tests.processors.test_crash import DeltaReader, post_pages, reader  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration


def test_a_sync_missing_a_page_becomes_a_partial_delta_and_its_late_page_a_dead_letter(
        pipeline: Pipeline, reader: DeltaReader) -> None:  # noqa: F811
    metrics_port = free_port()
    pipeline.extra_env.update({"HEAPSYNC_SYNC_TIMEOUT_SECONDS": "4", "HEAPSYNC_METRICS_PORT": str(metrics_port)})
    pipeline.start_ingest()
    worker = pipeline.start("process", "process")

    lossy, after = str(uuid.uuid4()), str(uuid.uuid4())
    post_pages(pipeline, lossy, [(["a@example.com"], []), (["b@example.com"], [])], [1])
    post_pages(pipeline, after, [(["c@example.com"], ["a@example.com"])], [1])

    [partial] = reader.wait_for(delta_id_for("acme", lossy), timeout=180)
    assert (partial.complete, partial.missing_pages, partial.add) == (False, [2], ["a@example.com"])
    [later] = reader.wait_for(delta_id_for("acme", after))
    assert later.complete and later.remove == ["a@example.com"]
    assert reader.order.index((partial.delta_id, None)) < reader.order.index((later.delta_id, None))

    # the missing page turns up after the partial delta went out: dead-lettered, not applied
    post_pages(pipeline, lossy, [(["a@example.com"], []), (["b@example.com"], [])], [2])
    dlq = Consumer({"bootstrap.servers": pipeline.broker.bootstrap, "group.id": f"{pipeline.prefix}-dlq",
                    "auto.offset.reset": "earliest"})
    dlq.subscribe([f"{pipeline.prefix}.deltas.dlq"])
    letters = []
    deadline = time.monotonic() + 60
    while not letters and time.monotonic() < deadline:
        msg = dlq.poll(0.5)
        if msg is not None and not msg.error():
            letters.append(orjson.loads(msg.value()))
    dlq.close()
    assert letters and letters[0]["reason"] == "late page for an emitted sync"
    assert (letters[0]["page_number"], letters[0]["adds"], letters[0]["removes"]) == (2, 1, 0)
    assert letters[0]["record"]["payload"]["data"]["sync_info"]["page_number"] == 2  # re-drivable as is
    assert "add" not in letters[0] and orjson.dumps(letters[0]).count(b"b@example.com") == 1  # the ids once
    assert letters[0]["sync_emitted_at"] <= partial.emitted_at.timestamp()  # when the sync went out without it
    reader.poll(2.0)
    assert len(reader.seen[(partial.delta_id, None)]) == 1  # nothing re-emitted for the late page

    metrics = http("GET", f"http://127.0.0.1:{metrics_port}/metrics").body
    for line in ("heapsync_assembler_partial_deltas_total 1.0", "heapsync_assembler_late_pages_total 1.0",
                 "heapsync_assembler_pages_total 3.0", "heapsync_assembler_deltas_total 2.0"):
        assert line in metrics, metrics
    assert "heapsync_assembler_open_syncs{" in metrics

    # the worker's own lines are JSON with their fields (Faust must not replace our log handler),
    # and they name syncs and lists, never users
    lines = [orjson.loads(line) for line in worker.output().splitlines() if line.startswith('{"ts"')]
    emitted = {line["delta_id"]: line for line in lines if line["msg"] == "delta emitted"}
    assert {partial.delta_id, later.delta_id} <= set(emitted)
    assert (emitted[partial.delta_id]["complete"], emitted[partial.delta_id]["missing_pages"]) == (False, 1)
    assert "example.com" not in worker.output()
