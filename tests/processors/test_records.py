"""Reading pages-topic records: the one-pass parser agrees with the contract's models."""

from __future__ import annotations

from datetime import datetime, timezone

import orjson
import pytest
from pydantic import ValidationError

from heapsync.contracts import HeapDrain, HeapEnvelope, HeapSync, PageRecord
from heapsync_dev.samples import drain_request, heap_request
from processors.records import TICK, is_tick, parse_record


def record(payload: dict, replay_id: str | None = None) -> bytes:
    return PageRecord(account="acme", request_id="r1", received_at=datetime.now(timezone.utc), payload=payload,
                      replay_id=replay_id).model_dump_json().encode()


def test_sync_record_gives_ids_and_the_validated_request() -> None:
    page = parse_record(record(heap_request("s", 2, 3, add=["a", "b"], remove=["c"], segment_id=42), "rp"))
    assert isinstance(page.payload, HeapSync)
    assert (page.account, page.request_id, page.replay_id) == ("acme", "r1", "rp")
    assert (page.add, page.remove) == (["a", "b"], ["c"])
    assert page.payload.data.segment.id == "42"
    assert page.payload.customer_config.identity_field() == "email"


def test_missing_remove_is_no_removes_and_both_missing_is_invalid() -> None:
    body = heap_request("s", 1, 1, add=["a"])
    assert parse_record(record(body)).remove == []
    del body["data"]["add"]
    with pytest.raises(ValidationError):
        parse_record(record(body))


@pytest.mark.parametrize("members", [[{"id": ""}], [{"id": 5}], [{"name": "x"}], ["a"], {"id": "a"}])
def test_bad_members_are_rejected_like_the_contract_does(members: object) -> None:
    body = heap_request("s", 1, 1, add=["a"])
    body["data"]["add"] = members
    with pytest.raises(ValidationError):
        parse_record(record(body))


def test_page_number_above_total_is_invalid() -> None:
    with pytest.raises(ValidationError):
        parse_record(record(heap_request("s", 3, 2, add=["a"])))


def test_drain_and_unknown_actions() -> None:
    assert isinstance(parse_record(record(drain_request())).payload, HeapDrain)
    other = parse_record(record({"action_type": "segment.users.rename", "customer_config": {"fields": []}}))
    assert type(other.payload) is HeapEnvelope


def test_garbage_is_a_validation_error_and_ticks_are_recognised() -> None:
    for raw in (b"{not json", b"[]", orjson.dumps({"account": "a"})):
        with pytest.raises(ValidationError):
            parse_record(raw)
    assert is_tick(TICK) and not is_tick(record(drain_request()))
