"""Dead letters too large for one record: split into parts when written, joined back when read.

Why: a timed-out sync of many large pages made one dead letter bigger than the topic's record
limit (16 MiB); the send failed, the worker restarted on the same offset and the partition
stalled. Now no dead-letter record, key included, is larger than ``max_bytes``
(``HEAPSYNC_DEAD_LETTER_PART_BYTES``, 1 MB by default, so it also fits a broker left at Kafka's
default limit).

A dead letter that fits is written as before, one JSON object, so old and small ones read
the same way. One that does not fit becomes ``n`` records under the same key (one partition,
in order), each a JSON object::

    {"reason": ..., <the dead letter's scalar fields, strings cut to 200 characters>,
     "split": {"group": <sha256 of the whole, 32 hex>, "part": i, "parts": n, "bytes": <size of the whole>},
     "data": <base64 of the i-th slice of the whole record's bytes>}

Each part says what it is a part of (``dlq list`` can name it even alone); readers
(:func:`join`) put the parts of a group back together and check the hash. Repeats of a
group (a worker that crashed after sending it sends it again) have the same group id and
are read once. Pure functions only.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:  # the assembler writes parts: no Kafka client import for it
    from heapsync.topic_reader import Record

PART_MAX_BYTES = 1_000_000
"""Default size bound of one dead-letter record (key + value)."""
MIN_PART_BYTES = 16_384
"""Below this the fixed fields of a part leave too little room for its data."""
KEY_MAX_BYTES = 512
SUMMARY_MAX_CHARS = 200


def record_key(key: str) -> bytes:
    """The record key of a dead letter: its sync key, or a hash of it when that is very long
    (the key counts toward the record size; Heap sets the sync task id's length)."""
    raw = key.encode()
    return raw if len(raw) <= KEY_MAX_BYTES else b"sha256:" + hashlib.sha256(raw).hexdigest().encode()


def summary(doc: Any) -> dict[str, Any]:
    """The small fields of a dead letter (reason, sync, segment, ...): scalars, strings cut short."""
    if not isinstance(doc, dict):
        return {}
    out: dict[str, Any] = {}
    for k, v in doc.items():
        if k in ("split", "data") or not isinstance(k, str) or len(k) > 64:
            continue
        if v is None or isinstance(v, (bool, int, float)):
            out[k] = v
        elif isinstance(v, str):
            out[k] = v[:SUMMARY_MAX_CHARS]
    return out


def split(key: bytes, value: bytes, max_bytes: int = PART_MAX_BYTES) -> list[tuple[bytes, bytes]]:
    """``(key, value)`` records for one dead letter, none larger than ``max_bytes`` (key + value)."""
    if max_bytes < MIN_PART_BYTES:
        raise ValueError(f"max_bytes must be at least {MIN_PART_BYTES}")
    key = key[:KEY_MAX_BYTES] if len(key) > KEY_MAX_BYTES else key
    if len(key) + len(value) <= max_bytes:
        return [(key, value)]
    try:
        head = summary(orjson.loads(value))
    except orjson.JSONDecodeError:
        head = {}
    group = hashlib.sha256(value).hexdigest()[:32]

    def part(i: int, n: int, data: str) -> bytes:
        return orjson.dumps({**head, "split": {"group": group, "part": i, "parts": n, "bytes": len(value)},
                             "data": data})

    room = max_bytes - len(key) - len(part(10**9, 10**9, ""))  # the largest a part's fixed fields get
    if room < max_bytes // 2:  # many long fields: the reason alone names the parts
        head = {"reason": str(head.get("reason", ""))[:SUMMARY_MAX_CHARS]}
        room = max_bytes - len(key) - len(part(10**9, 10**9, ""))
    per_part = room // 4 * 3  # raw bytes whose base64 fits the room
    slices = [value[i:i + per_part] for i in range(0, len(value), per_part)]
    return [(key, part(i, len(slices), base64.b64encode(s).decode())) for i, s in enumerate(slices, start=1)]


def _split_info(rec: Record) -> tuple[str, int, int, dict[str, Any]] | None:
    """(group, part, parts, doc) of a part record; None for an ordinary one."""
    if not rec.value or b'"split"' not in rec.value:
        return None
    try:
        doc = orjson.loads(rec.value)
    except orjson.JSONDecodeError:
        return None
    info = doc.get("split") if isinstance(doc, dict) else None
    if not isinstance(info, dict) or not isinstance(doc.get("data"), str):
        return None
    group, part, parts = info.get("group"), info.get("part"), info.get("parts")
    if not (isinstance(group, str) and isinstance(part, int) and isinstance(parts, int) and 1 <= part <= parts):
        return None
    return group, part, parts, doc


def _joined(parts: dict[int, tuple[Record, dict[str, Any]]], group: str, total: int) -> Record:
    first_rec, first_doc = parts[min(parts)]
    info = first_doc["split"]
    if len(parts) == total:
        try:
            whole = b"".join(base64.b64decode(parts[i][1]["data"], validate=True) for i in range(1, total + 1))
        except (binascii.Error, ValueError):
            whole = b""
        if hashlib.sha256(whole).hexdigest()[:32] == group:
            return dataclasses.replace(first_rec, value=whole)
        problem = "its parts do not add up to the dead letter they were cut from"
    else:
        problem = f"only {len(parts)} of its {total} parts were found"
    doc = {**summary(first_doc), "split": {**info, "found": sorted(parts)},
           "incomplete": f"this dead letter was split into {total} records and {problem}"}
    return dataclasses.replace(first_rec, value=orjson.dumps(doc))


def join(records: Iterable[Record]) -> list[Record]:
    """Records as read, each split dead letter replaced by one record holding the whole (where its
    first part was, with that part's topic, partition and offset). A group with parts missing, or
    whose parts do not match its hash, becomes a record saying so under ``"incomplete"``."""
    out: list[Record | tuple[str, str]] = []  # a record, or the place of a group's first part
    groups: dict[tuple[str, str], dict[int, tuple[Record, dict[str, Any]]]] = {}
    sizes: dict[tuple[str, str], int] = {}
    for rec in records:
        info = _split_info(rec)
        if info is None:
            out.append(rec)
            continue
        group, part, parts, doc = info
        gk = (rec.topic, group)
        if gk not in groups:
            groups[gk] = {}
            sizes[gk] = parts
            out.append(gk)
        groups[gk].setdefault(part, (rec, doc))  # a repeat of a part (a resent group) is read once
    return [_joined(groups[item], item[1], sizes[item]) if isinstance(item, tuple) else item for item in out]
