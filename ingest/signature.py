"""Heap's ``Heap-Hash`` signature: parse the header and check it. Pure functions.

``Heap-Hash: ts:<epoch ms>,hmac:<sig>`` where sig = HMAC-SHA256(secret, ts + body).
Heap's reference encodes sig in Base64; a later change used lowercase hex. Which
one Heap sends today is unknown, so both are accepted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from enum import Enum
from typing import Iterable


class SignatureProblem(str, Enum):
    MISSING = "missing Heap-Hash header"
    MALFORMED = "malformed Heap-Hash header"
    STALE = "timestamp is outside the accepted window"
    MISMATCH = "signature does not match"


@dataclass(frozen=True)
class HeapHash:
    ts: str
    signature: str


class SignatureError(Exception):
    def __init__(self, problem: SignatureProblem) -> None:
        super().__init__(problem.value)
        self.problem = problem


def parse_heap_hash(header: str | None) -> HeapHash:
    """Parse ``ts:...,hmac:...``: pairs in any order, spaces around, keys in any case."""
    if header is None or not header.strip():
        raise SignatureError(SignatureProblem.MISSING)
    pairs: dict[str, str] = {}
    for part in header.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition(":")
        if not sep:
            raise SignatureError(SignatureProblem.MALFORMED)
        key = key.strip().lower()
        if key in pairs:
            raise SignatureError(SignatureProblem.MALFORMED)
        pairs[key] = value.strip()
    ts, sig = pairs.get("ts"), pairs.get("hmac")
    if not ts or not sig or not ts.isascii() or not ts.isdigit():
        raise SignatureError(SignatureProblem.MALFORMED)
    return HeapHash(ts=ts, signature=sig)


def sign(secret: bytes, ts: str, body: bytes, encoding: str = "base64") -> str:
    """The signature Heap would send; used by ``send-sample``, tests and benchmarks."""
    digest = hmac.new(secret, ts.encode() + body, hashlib.sha256).digest()
    if encoding == "hex":
        return digest.hex()
    return base64.b64encode(digest).decode()


def heap_hash_header(secret: bytes, ts_ms: int, body: bytes, encoding: str = "base64") -> str:
    ts = str(ts_ms)
    return f"ts:{ts},hmac:{sign(secret, ts, body, encoding)}"


def _decode_signature(sig: str) -> list[bytes]:
    """Every 32-byte reading of ``sig``: hex, then Base64 (standard or URL-safe)."""
    candidates: list[bytes] = []
    if len(sig) == 64:
        try:
            candidates.append(bytes.fromhex(sig))
        except ValueError:
            pass
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        try:
            raw = decode(sig + "=" * (-len(sig) % 4))
        except (binascii.Error, ValueError):
            continue
        if len(raw) == 32:
            candidates.append(raw)
    return candidates


def check_timestamp(ts: str, now_ms: int, max_age_ms: int, max_future_ms: int) -> None:
    age = now_ms - int(ts)
    if age > max_age_ms or -age > max_future_ms:
        raise SignatureError(SignatureProblem.STALE)


def verify(
    heap_hash: HeapHash,
    body: bytes,
    secrets: Iterable[bytes],
    *,
    now_ms: int,
    max_age_ms: int,
    max_future_ms: int,
) -> None:
    """Raise ``SignatureError`` unless one of ``secrets`` signed ``body`` recently.

    The signature is checked before the timestamp so that an unsigned request
    learns nothing about the window. Every secret is tried, each compare in
    constant time, so timing does not tell which secret nearly matched.
    """
    given = _decode_signature(heap_hash.signature)
    message = heap_hash.ts.encode() + body
    matched = False
    for secret in secrets:
        expected = hmac.new(secret, message, hashlib.sha256).digest()
        for candidate in given:
            matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise SignatureError(SignatureProblem.MISMATCH)
    check_timestamp(heap_hash.ts, now_ms, max_age_ms, max_future_ms)
