"""``total_pages`` and ``page_number`` are bounded (issue 16 #9): beyond the bound a signed page is a 400.

The assembler sizes a sync's state by ``total_pages`` (a digest per page, the missing pages at a
timeout), so one signed page announcing 10^15 pages must not get in.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

import pytest
from pydantic import ValidationError

from heapsync.contracts import MAX_TOTAL_PAGES, HeapSync, PageRecord, parse_heap_payload
from heapsync_dev.samples import heap_request
from ingest import openapi
from processors.records import parse_record
from tests.conftest import Pipeline


def paths(exc: ValidationError) -> set[str]:
    return {".".join(str(p) for p in e["loc"]) for e in exc.errors()}


def test_the_bound_itself_is_accepted() -> None:
    p = parse_heap_payload(json.dumps(heap_request("t", MAX_TOTAL_PAGES, MAX_TOTAL_PAGES, add=["a"])))
    assert isinstance(p, HeapSync) and p.data.sync_info.total_pages == MAX_TOTAL_PAGES == 100_000


@pytest.mark.parametrize("page, total, field", [
    (1, MAX_TOTAL_PAGES + 1, "data.sync_info.total_pages"),
    (1, 10**15, "data.sync_info.total_pages"),
    (10**15, 10**15, "data.sync_info.page_number"),
])
def test_beyond_the_bound_is_refused_naming_the_field(page: int, total: int, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_heap_payload(json.dumps(heap_request("t", page, total, add=["a"])))
    assert field in paths(err.value)


def test_a_record_from_before_the_bound_is_refused_by_the_assembler_not_assembled() -> None:
    raw = PageRecord(account="acme", request_id="r", received_at=datetime.now(timezone.utc),
                     payload=heap_request("t", 1, 10**15, add=["a"])).model_dump_json().encode()
    with pytest.raises(ValidationError):  # the worker dead-letters it as an unreadable pages record
        parse_record(raw)


def test_the_openapi_document_states_the_bound() -> None:
    props = openapi.document()["components"]["schemas"]["SyncInfo"]["properties"]
    assert props["total_pages"]["maximum"] == props["page_number"]["maximum"] == MAX_TOTAL_PAGES


@pytest.mark.integration
def test_the_ingress_answers_400_beyond_the_bound(pipeline: Pipeline) -> None:
    pipeline.start_ingest()
    res = pipeline.post(heap_request(str(uuid.uuid4()), 1, 10**15, add=["a@example.com"]))
    assert res.status == 400 and res.body["error"] == "Invalid payload", res.body
    assert [e["path"] for e in res.body["errors"]] == ["data.sync_info.total_pages"]
    assert "100000" in res.body["errors"][0]["message"]
    ok = pipeline.post(heap_request(str(uuid.uuid4()), 2, MAX_TOTAL_PAGES, add=["a@example.com"]))
    assert ok.status == 200, ok.body
