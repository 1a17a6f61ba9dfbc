"""A captured signed drain posted again must not clear the list again (issue 16 #3).

A drain has no sync id; it used to be named by the unsigned ``X-Request-Id``. Now the ingress
records the digest of what the HMAC covers (``ts`` and body) and the assembler names the drain by
it: the pure pieces first, then the real chain.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from datetime import datetime, timezone

import orjson
import pytest

from heapsync.contracts import PageRecord, delta_id_for, signed_digest
from heapsync_dev.samples import drain_request, heap_request
from ingest.records import page_record_bytes
from processors.records import parse_record
from tests.conftest import Pipeline
from tests.ingest_support import read_topic

NOW = datetime(2026, 12, 1, 19, 0, tzinfo=timezone.utc)
DRAIN = orjson.dumps(drain_request(segment_id="1"))


def test_the_digest_is_of_exactly_what_the_signature_covers() -> None:
    assert signed_digest("1764615600000", DRAIN) == hashlib.sha256(b"1764615600000" + DRAIN).hexdigest()
    assert signed_digest("1764615600000", DRAIN) != signed_digest("1764615600001", DRAIN)
    assert signed_digest("1764615600000", DRAIN) != signed_digest("1764615600000", DRAIN + b" ")


def test_the_pages_record_carries_the_digest_and_the_assembler_reads_it() -> None:
    digest = signed_digest("1764615600000", DRAIN)
    raw = page_record_bytes("acme", "req-1", NOW, DRAIN, digest)
    assert PageRecord.model_validate_json(raw) == PageRecord(
        account="acme", request_id="req-1", received_at=NOW, payload=orjson.loads(DRAIN), signed_digest=digest)
    assert parse_record(raw).signed_digest == digest
    # the slow path (a payload the one-pass parser leaves to pydantic) reads it too
    odd = page_record_bytes("acme", "req-1", NOW, orjson.dumps({**drain_request(), "data": {
        "segment": {"id": 7, "name": "Seven"}}}), digest)
    assert parse_record(odd).signed_digest == digest


def test_records_without_the_field_still_read_and_syncs_are_written_as_before() -> None:
    old = orjson.dumps({"schema_version": 1, "account": "acme", "request_id": "req-1", "received_at": NOW,
                        "replay_id": None, "payload": drain_request()})
    page = parse_record(old)
    assert (page.request_id, page.signed_digest) == ("req-1", None)
    sync = orjson.dumps(heap_request("t", 1, 1, add=["a@x.io"]))
    assert b"signed_digest" not in page_record_bytes("acme", "req-2", NOW, sync)


@pytest.mark.integration
def test_a_signed_drain_posted_three_times_clears_the_list_once(pipeline: Pipeline) -> None:
    pipeline.start_all()
    lst = "HeapTestSegment"
    first = ["a@example.com", "b@example.com"]
    assert pipeline.post(heap_request(str(uuid.uuid4()), 1, 1, add=first)).status == 200
    assert pipeline.wait_for_members(lst, set(first)) == set(first), pipeline.logs()

    drain = json.dumps(drain_request()).encode()
    ts_ms = int(time.time() * 1000)  # one signed request, captured: the same bytes and Heap-Hash each time
    ids = [f"drain-{n}-{uuid.uuid4().hex[:8]}" for n in range(3)]
    assert pipeline.post(drain, ts_ms=ts_ms, headers={"X-Request-Id": ids[0]}).status == 200
    assert pipeline.wait_for_members(lst, set()) == set(), pipeline.logs()

    # the list is filled again; then the captured drain comes back under new request ids
    assert pipeline.post(heap_request(str(uuid.uuid4()), 1, 1, add=["c@example.com"])).status == 200
    assert pipeline.wait_for_members(lst, {"c@example.com"}) == {"c@example.com"}, pipeline.logs()
    for rid in ids[1:]:
        replay = pipeline.post(drain, ts_ms=ts_ms, headers={"X-Request-Id": rid})
        assert (replay.status, replay.body["request_id"]) == (200, rid)
    last = str(uuid.uuid4())
    assert pipeline.post(heap_request(last, 1, 1, add=["d@example.com"])).status == 200

    # the segment's deltas come out in order: had a replay been a drain, it would have emptied the list before d
    expected = {"c@example.com", "d@example.com"}
    assert pipeline.wait_for_members(lst, expected) == expected, pipeline.logs()
    deltas = read_topic(pipeline.broker.bootstrap, f"{pipeline.prefix}.deltas",
                        lambda rs: any(r.value.get("sync_task_id") == last for r in rs))
    drains = [r.value for r in deltas if r.value["kind"] == "drain"]
    assert len(drains) == 1, drains
    assert drains[0]["delta_id"] == delta_id_for("acme", f"drain:signed={signed_digest(str(ts_ms), drain)}")
    pages = read_topic(pipeline.broker.bootstrap, f"{pipeline.prefix}.pages",
                       lambda rs: {r.value.get("request_id") for r in rs if isinstance(r.value, dict)} >= set(ids))
    digests = {r.value["signed_digest"] for r in pages if isinstance(r.value, dict) and r.value.get("request_id") in ids}
    assert digests == {signed_digest(str(ts_ms), drain)}  # all three taken, all one drain
