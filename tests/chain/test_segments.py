"""Per-segment settings and email identities on the real chain (issue 14, #2 and #3): broker, ingress, Faust
worker and sink as processes, the Cordial simulator over HTTP, the operator's commands through the CLI."""

from __future__ import annotations

import uuid

import orjson
import pytest

from heapsync.topic_reader import read_topic
from heapsync_dev.samples import heap_request
from tests.conftest import Pipeline, http
from tests.ops.test_e2e import cli, wait_for

pytestmark = pytest.mark.integration

SEGMENT = "15225086"  # heap_request's default segment, named "Heap Test Segment"


def write_accounts(pipeline: Pipeline, segments: str) -> None:
    pipeline.write_accounts(
        "[accounts.acme]\n"
        f'heap_webhook_secrets = ["{pipeline.secret}"]\n'
        f'cordial_api_key = "{pipeline.cordial_key}"\n'
        f'cordial_base_url = "{pipeline.sim_url}/v2"\n' + segments)


def test_a_pinned_list_name_survives_a_segment_rename(pipeline: Pipeline) -> None:
    write_accounts(pipeline, f'[accounts.acme.segments."{SEGMENT}"]\nlist_name = "Customers"\n')
    pipeline.start_all()
    assert pipeline.post(heap_request(str(uuid.uuid4()), 1, 1, add=["a@example.com", "b@example.com"])).status == 200
    assert pipeline.wait_for_members("Customers", {"a@example.com", "b@example.com"}) == {
        "a@example.com", "b@example.com"}, pipeline.logs()

    # renamed in Heap: the same segment id, a new name; the list stays the one it was pinned to
    assert pipeline.post(heap_request(str(uuid.uuid4()), 1, 1, add=["c@example.com"], remove=["a@example.com"],
                                      segment_name="Renamed Segment")).status == 200
    expected = {"b@example.com", "c@example.com"}
    assert pipeline.wait_for_members("Customers", expected) == expected, pipeline.logs()
    assert set(pipeline.lists()) == {"Customers"}  # no HeapTestSegment, no RenamedSegment


def test_a_disabled_segment_sends_nothing_to_cordial_and_shows_in_status(pipeline: Pipeline) -> None:
    write_accounts(pipeline, '[accounts.acme.segments."777"]\nenabled = false\n')
    pipeline.start_all()
    paused = str(uuid.uuid4())
    assert pipeline.post(heap_request(paused, 1, 1, add=["x@example.com"], segment_id="777",
                                      segment_name="Paused Segment")).status == 200  # acknowledged
    # another segment of the same account flows as before
    assert pipeline.post(heap_request(str(uuid.uuid4()), 1, 1, add=["y@example.com"])).status == 200
    assert pipeline.wait_for_members("HeapTestSegment", {"y@example.com"}) == {"y@example.com"}, pipeline.logs()

    def skipped() -> list[dict[str, object]]:
        rows = cli(pipeline, "status")["disabled_segments"]
        return rows if rows and rows[0]["syncs_skipped"] == 1 else []

    [row] = wait_for("the disabled segment's sync skipped, in heapsync status", skipped, pipeline, every=2)
    assert (row["account"], row["segment_id"], row["list_name"]) == ("acme", "777", None)
    assert row["last_skipped_at"]
    assert "PausedSegment" not in pipeline.lists()  # no list made, no contact sent

    page = http("GET", f"http://127.0.0.1:{pipeline.admin_port}/status.json").body
    assert page["disabled_segments"] == [{"account": "acme", "segment_id": "777", "list_name": None}]
    html = str(http("GET", f"http://127.0.0.1:{pipeline.admin_port}/status").body)
    assert "Disabled segments" in html and "777" in html

    # the page is kept in the pages topic (a replay sends it once the segment is enabled)
    kept = [orjson.loads(r.value or b"{}") for r in read_topic(pipeline.broker.bootstrap, f"{pipeline.prefix}.pages",
                                                               idle_timeout=10.0)]
    assert any(d.get("payload", {}).get("data", {}).get("sync_info", {}).get("sync_task_id") == paused for d in kept)


def test_case_variants_of_an_email_end_as_one_contact(pipeline: Pipeline) -> None:
    pipeline.start_all()
    sync = str(uuid.uuid4())
    # page 2 removes Ann (as written elsewhere) and adds Bob again, padded and in capitals
    assert pipeline.post(heap_request(sync, 2, 2, add=[" BOB@Example.com "], remove=["ann@EXAMPLE.com"])).status == 200
    assert pipeline.post(heap_request(sync, 1, 2, add=["Ann@Example.com", "bob@example.com"])).status == 200
    later = str(uuid.uuid4())
    assert pipeline.post(heap_request(later, 1, 1, add=["Carl@Example.COM"])).status == 200
    expected = {"bob@example.com", "carl@example.com"}
    assert pipeline.wait_for_members("HeapTestSegment", expected) == expected, pipeline.logs()
