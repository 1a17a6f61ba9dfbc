"""Reading the pages topic: one record's bytes -> the page the assembler needs, parsed once.

The ingress writes a :class:`heapsync.contracts.PageRecord` whose ``payload`` is
the Heap body as received. A page carries up to thousands of ``{"id": ...}``
members; building a pydantic object per member costs several milliseconds a
page, most of the assembler's time. So the record is decoded once (orjson), the
small rest of the payload is validated with the contract's pydantic models, and
the member lists are checked by hand with the same rule (a non-empty string
``id``). Anything unusual falls back to the full pydantic parse, whose error
messages end up in the dead letter.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from heapsync.contracts import (
    DRAIN_ACTION,
    SYNC_ACTION,
    TICK,
    HeapDrain,
    HeapEnvelope,
    HeapSync,
    PageRecord,
    is_tick,
    parse_heap_payload,
)

__all__ = ["TICK", "IncomingPage", "is_tick", "parse_record"]  # ticks: heapsync.contracts.Tick
_ID = operator.itemgetter("id")


@dataclass(frozen=True)
class IncomingPage:
    """A pages-topic record: who sent it and the validated Heap request.

    For a sync, ``add``/``remove`` hold the member ids and ``payload.data.add``/``remove``
    are left empty (``None`` when Heap sent none), so ids are never held twice.
    """

    account: str
    request_id: str
    replay_id: str | None
    payload: HeapSync | HeapDrain | HeapEnvelope
    add: list[str]
    remove: list[str]
    signed_digest: str | None = None  # a drain's identity (see PageRecord); None in records from before it


def _member_ids(members: Any) -> list[str] | None:
    """Ids of ``[{"id": "..."}]``; None when the list is not that shape (the slow path then explains)."""
    if members is None:
        return []
    if type(members) is not list:
        return None
    try:
        ids = list(map(_ID, members))  # C-level loops: this runs for every id of every page
    except (TypeError, KeyError):
        return None
    if ids and (set(map(type, ids)) != {str} or "" in ids):
        return None
    return ids


def _fast(raw: bytes) -> IncomingPage | None:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(doc) is not dict or type(doc.get("payload")) is not dict:
        return None
    payload = doc["payload"]
    data = payload.get("data")
    add: list[str] = []
    remove: list[str] = []
    if payload.get("action_type") == SYNC_ACTION and type(data) is dict:
        found_add, found_remove = _member_ids(data.get("add")), _member_ids(data.get("remove"))
        if found_add is None or found_remove is None:
            return None
        add, remove = found_add, found_remove
        payload = {**payload, "data": {**data, **{k: [] for k in ("add", "remove") if data.get(k) is not None}}}
    try:
        record = PageRecord.model_validate({**doc, "payload": {}})
        parsed = _validate_payload(payload)
    except ValidationError:
        return None
    return IncomingPage(record.account, record.request_id, record.replay_id, parsed, add, remove,
                        record.signed_digest)


def _validate_payload(payload: dict[str, Any]) -> HeapSync | HeapDrain | HeapEnvelope:
    action = payload.get("action_type")
    if action == SYNC_ACTION:
        return HeapSync.model_validate(payload)
    if action == DRAIN_ACTION:
        return HeapDrain.model_validate(payload)
    return HeapEnvelope.model_validate(payload)


def parse_record(raw: bytes) -> IncomingPage:
    """Raises ``pydantic.ValidationError`` when the record is not a readable PageRecord."""
    fast = _fast(raw)
    if fast is not None:
        return fast
    record = PageRecord.model_validate_json(raw)  # raises with field paths
    payload = parse_heap_payload(orjson.dumps(record.payload))
    add: list[str] = []
    remove: list[str] = []
    if isinstance(payload, HeapSync):
        add = [m.id for m in payload.data.add or ()]
        remove = [m.id for m in payload.data.remove or ()]
    return IncomingPage(record.account, record.request_id, record.replay_id, payload, add, remove,
                        record.signed_digest)
