"""Heap's payload as docs/design.md describes it, and what the models accept and refuse."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from heapsync.contracts import HeapDrain, HeapEnvelope, HeapSync, delta_id_for, parse_heap_payload
from heapsync_dev.samples import drain_request, heap_request

SEED = {
    "id_token": "bc2ae9f9-51ce-404e-9bf9-6b98cbc36f9e",
    "action_type": "segment.users.sync",
    "customer_config": {"fields": [{
        "field_id": "heap_identity_user_property", "field_display_name": "Heap Identity User Property",
        "field_type": "identity_mapping", "value": {"id": "email", "display_name": "email"}}]},
    "data": {
        "segment": {"id": "15225086", "name": "Heap Test Segment"},
        "sync_info": {"page_number": 1, "total_pages": 2, "sync_task_id": "ce011f7a-f60e-4c8c-9b9d-90c6b5ec455b"},
        "add": [{"id": "user1@email.com"}],
        "remove": [{"id": "user2@email.com"}],
    },
}


def parse(doc: dict) -> object:
    return parse_heap_payload(json.dumps(doc))


def test_seed_payload_parses() -> None:
    p = parse(SEED)
    assert isinstance(p, HeapSync)
    assert p.data.segment.id == "15225086"
    assert p.customer_config.identity_field() == "email"
    assert [m.id for m in p.data.add or []] == ["user1@email.com"]


def test_integer_segment_id_and_free_form_task_id() -> None:
    p = parse(heap_request("FreeCustomersSync", 1, 1, add=["a"], segment_id=15225086))
    assert isinstance(p, HeapSync) and p.data.segment.id == "15225086"


def test_only_one_of_add_remove_needed_but_not_none() -> None:
    assert isinstance(parse(heap_request("t", 1, 1, add=["a"])), HeapSync)
    assert isinstance(parse(heap_request("t", 1, 1, remove=["a"])), HeapSync)
    with pytest.raises(ValidationError, match="at least one"):
        parse(heap_request("t", 1, 1))


@pytest.mark.parametrize("mutate, path", [
    (lambda d: d["data"]["sync_info"].update(page_number=3), "data.sync_info"),
    (lambda d: d["data"]["sync_info"].update(page_number=0), "data.sync_info.page_number"),
    (lambda d: d["data"]["sync_info"].update(page_number="1"), "data.sync_info.page_number"),
    (lambda d: d["data"]["sync_info"].pop("sync_task_id"), "data.sync_info.sync_task_id"),
    (lambda d: d["data"]["segment"].pop("name"), "data.segment.name"),
    (lambda d: d["data"]["add"].append({"name": "x"}), "data.add.1.id"),
    (lambda d: d["customer_config"]["fields"][0].pop("value"), "customer_config.fields.0.value"),
    (lambda d: d.pop("action_type"), "action_type"),
])
def test_schema_errors_name_the_field(mutate, path: str) -> None:
    doc = json.loads(json.dumps(SEED))
    mutate(doc)
    with pytest.raises(ValidationError) as info:
        parse(doc)
    paths = {".".join(str(p) for p in e["loc"]) for e in info.value.errors()}
    assert any(p.startswith(path) for p in paths), paths


def test_drain_and_unknown_actions() -> None:
    assert isinstance(parse(drain_request()), HeapDrain)
    other = {**SEED, "action_type": "segment.users.something"}
    p = parse(other)
    assert type(p) is HeapEnvelope and p.action_type == "segment.users.something"


def test_delta_id_is_deterministic_and_account_scoped() -> None:
    assert delta_id_for("acme", "t1") == delta_id_for("acme", "t1")
    assert delta_id_for("acme", "t1") != delta_id_for("beta", "t1")
