"""What a delta asks of Cordial, as plain data: pure, so the mapping is tested directly.

- add    -> upsert the contact with ``<list>: true``   (``POST /contacts``)
- remove -> set ``<list>: false`` on the contact       (``PUT /contacts/<key>:<id>``; 404 = already gone)
- drain  -> empty the list                             (``PUT /accountlists/<id>/clear``)

Subscribe status is never sent unless the account asks for it explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

from heapsync.contracts import Delta
from heapsync.settings import Account


@dataclass(frozen=True)
class Operation:
    kind: Literal["add", "remove", "clear"]
    list_name: str
    contact_id: str = ""
    identity_key: str = "email"

    def contact_path(self) -> str:
        """``email:a%40b.c``: Cordial's ``<key>:<value>`` contact reference, URL-encoded."""
        return f"{quote(self.identity_key, safe='')}:{quote(self.contact_id, safe='')}"

    def body(self, account: Account) -> dict[str, Any]:
        if self.kind == "remove":
            return {self.list_name: False}
        body: dict[str, Any]
        if self.identity_key == "email":
            body = {"channels": {"email": {"address": self.contact_id}}}
        else:
            body = {self.identity_key: self.contact_id}
        body[self.list_name] = True
        if account.subscribe_status is not None:
            body["channels"] = body.get("channels") or {"email": {}}
            body["channels"].setdefault("email", {})["subscribeStatus"] = account.subscribe_status
        return body


def delta_ref(delta: Delta) -> dict[str, object]:
    """What a dead letter or log line carries to find its delta again (no contact ids)."""
    return {"delta_id": delta.delta_id, "chunk": delta.chunk, "chunks": delta.chunks, "chunk_key": delta.chunk_key,
            "account": delta.account, "list_name": delta.list_name, "segment_id": delta.segment_id,
            "sync_task_id": delta.sync_task_id}


def plan(delta: Delta, account: Account) -> list[Operation]:
    if delta.kind == "drain":
        return [Operation("clear", delta.list_name)]
    key = account.identity_key(delta.identity_field)
    ops = [Operation("remove", delta.list_name, i, key) for i in delta.remove]
    ops += [Operation("add", delta.list_name, i, key) for i in delta.add]
    return ops


def estimated_operations(delta: Delta, chunk_size: int) -> int:
    """The whole delta's size as seen from one chunk: every chunk but the last is full,
    so all chunks of one delta reach the same estimate (and take the same path)."""
    n = len(delta.add) + len(delta.remove)
    if delta.chunks == 1:
        return n
    return max(n, chunk_size) * delta.chunks


def use_bulk(delta: Delta, threshold: int, chunk_size: int) -> bool:
    """Big sync deltas go through a contact import; drains and small deltas through the REST API."""
    return delta.kind == "sync" and estimated_operations(delta, chunk_size) > threshold
