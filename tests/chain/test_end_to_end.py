"""The real chain: Tansu broker, ingress, Faust worker and sink as processes, simulator over HTTP."""

from __future__ import annotations

import uuid

import pytest

from heapsync_dev.samples import drain_request, heap_request
from tests.conftest import Pipeline

pytestmark = pytest.mark.integration

LIST = "HeapTestSegment"


def test_signed_pages_fill_the_list_and_later_removals_stick(pipeline: Pipeline) -> None:
    pipeline.start_all()
    first = str(uuid.uuid4())
    users = [f"user{i}@example.com" for i in range(10)]
    # pages arrive out of order; page 2 removes a user that page 1 added
    r2 = pipeline.post(heap_request(first, 2, 2, add=users[5:], remove=["user0@example.com"]))
    r1 = pipeline.post(heap_request(first, 1, 2, add=users[:5]))
    assert (r1.status, r2.status) == (200, 200), (r1.body, r2.body)
    expected = set(users) - {"user0@example.com"}
    assert pipeline.wait_for_members(LIST, expected) == expected, pipeline.logs()

    second = str(uuid.uuid4())
    assert pipeline.post(heap_request(second, 1, 1, add=["new@example.com"],
                                      remove=["user1@example.com", "user2@example.com"])).status == 200
    expected = (expected - {"user1@example.com", "user2@example.com"}) | {"new@example.com"}
    assert pipeline.wait_for_members(LIST, expected) == expected, pipeline.logs()

    # a drain empties the list
    assert pipeline.post(drain_request()).status == 200
    assert pipeline.wait_for_members(LIST, set()) == set(), pipeline.logs()


def test_bad_signature_is_403_and_changes_nothing(pipeline: Pipeline) -> None:
    pipeline.start_all()
    good = str(uuid.uuid4())
    assert pipeline.post(heap_request(good, 1, 1, add=["a@example.com"])).status == 200
    assert pipeline.wait_for_members(LIST, {"a@example.com"}) == {"a@example.com"}, pipeline.logs()

    forged = pipeline.post(heap_request(str(uuid.uuid4()), 1, 1, add=["evil@example.com"],
                                        remove=["a@example.com"]), secret="wrong-secret")
    assert forged.status == 403
    assert forged.body == {"error": "Invalid signature"}

    # a later valid sync is applied, and the forged one never was
    later = str(uuid.uuid4())
    assert pipeline.post(heap_request(later, 1, 1, add=["b@example.com"])).status == 200
    expected = {"a@example.com", "b@example.com"}
    assert pipeline.wait_for_members(LIST, expected) == expected, pipeline.logs()


def test_unknown_account_and_schema_errors(pipeline: Pipeline) -> None:
    pipeline.start_simulator()
    pipeline.start_ingest()
    assert pipeline.post(heap_request("x", 1, 1, add=["a@example.com"]), account="nobody").status == 404
    bad = heap_request("x", 3, 2, add=["a@example.com"])
    res = pipeline.post(bad)
    assert res.status == 400
    assert any("sync_info" in e["path"] for e in res.body["errors"]), res.body
    res = pipeline.post(b"{not json")
    assert res.status == 400 and res.body["error"] == "Invalid payload"
