"""How the ingress writes what it received: the records of the pages and rejected topics, and their keys.

Pure functions over plain data: no aiohttp, no Kafka. The handler (``ingest/app.py``) decides what to
write; these decide the bytes, so a record reads back as the ``heapsync.contracts`` model it names.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson

from heapsync.contracts import RejectedRecord

SECRET_HEADERS = frozenset({
    "heap-hash", "authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key",
    "x-auth-token", "x-amz-security-token",
})
REJECTED_RECORD_MAX_BYTES = 15 * 1024 * 1024
"""Below the topics' 16 MiB ``max.message.bytes``; a rejected body that would not fit is cut and flagged."""


def record_key(account: str, segment_id: str) -> bytes:
    """All pages and syncs of one segment go to one partition, in order."""
    return f"{account}:{segment_id}".encode()


def printable(text: str) -> str:
    """``text`` fit for JSON: bytes that were not UTF-8 spelled ``\\xNN``, exactly and in plain text.

    aiohttp decodes header bytes as UTF-8 with ``surrogateescape``, so a byte such as ``\\xe9``
    arrives as a lone surrogate, which no JSON encoder (orjson, pydantic) accepts: without this,
    a record or an answer holding such a header would fail to serialise (a 500, nothing kept).
    """
    if text.isascii():  # the common case, without encoding anything
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte (not from a parser): replace it
        raw = text.encode("utf-8", "replace")
    return raw.decode("utf-8", "backslashreplace")


def safe_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Request headers fit to keep: anything that carries or derives from a secret is left out,
    and the rest is made printable (``printable``), so that the record holding them always serialises."""
    return {printable(k): printable(v) for k, v in headers.items() if k.lower() not in SECRET_HEADERS}


def page_record_bytes(account: str, request_id: str, received_at: datetime, body: bytes,
                      signed_digest: str | None = None) -> bytes:
    """A ``PageRecord`` as JSON, with the already-validated raw body embedded as ``payload``.

    Equal to ``PageRecord(...).model_dump_json()`` when read back, without
    re-serialising a body of thousands of ids (``tests/ingest/test_app.py`` checks it).
    ``signed_digest`` (drains) is written only when set, so a sync's record is as before.
    """
    head = orjson.dumps({"schema_version": 1, "account": account, "request_id": request_id,
                         "received_at": received_at, "replay_id": None,
                         **({"signed_digest": signed_digest} if signed_digest else {})})
    return head[:-1] + b',"payload":' + body + b"}"


def rejected_record_bytes(account: str, request_id: str, received_at: datetime, reason: str,
                          errors: list[dict[str, Any]], headers: dict[str, str], body: bytes) -> bytes:
    """A ``RejectedRecord`` holding the raw request, cut to fit a Kafka record when it must."""
    try:
        text, b64 = body.decode("utf-8"), None
    except UnicodeDecodeError:
        text, b64 = body.decode("utf-8", errors="replace"), base64.b64encode(body).decode()
    record = RejectedRecord(account=account, request_id=request_id, received_at=received_at, reason=reason,
                            errors=errors, headers=headers, body=text, body_base64=b64)
    raw = record.model_dump_json().encode()
    if len(raw) <= REJECTED_RECORD_MAX_BYTES:
        return raw
    # worst case JSON escaping is 6 bytes per character (\u0000); keep what surely fits
    keep = REJECTED_RECORD_MAX_BYTES // 8
    record = record.model_copy(update={"body": text[:keep], "body_base64": None, "body_truncated": True})
    return record.model_dump_json().encode()
