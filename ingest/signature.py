"""Heap's ``Heap-Hash`` signature: parse the header and check it. Pure functions, no I/O.

``Heap-Hash: ts:<epoch ms>,hmac:<sig>`` where sig = HMAC-SHA256(secret, ts + body),
``ts`` exactly as sent, immediately followed by the raw body. Heap's reference
encodes sig in Base64; a later change used lowercase hex. Which one Heap sends
today is unknown, so both are accepted (hex in either case; Base64 standard or
URL-safe, padded or not).

Parsing is forgiving about form (pair order, spaces, case of keys, extra pairs)
and strict about substance (one ``ts`` of digits, one ``hmac``, bounded length).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
from dataclasses import dataclass
from enum import Enum
from typing import Iterable

MAX_HEADER_LENGTH = 1024
"""Longer headers are refused before any work: a real one is about 70 characters."""

MAX_TS_DIGITS = 16
SECONDS_TS_BELOW = 100_000_000_000
"""A ``ts`` below this (11 digits) reads as epoch seconds rather than milliseconds.

Heap's reference sends milliseconds; epoch seconds are 10 digits until the year 2286,
and milliseconds have been 13 digits since 2001, so the two cannot be confused.
The signature covers the ``ts`` string as sent, whatever its unit.
"""


class SignatureProblem(str, Enum):
    MISSING = "missing Heap-Hash header"
    MALFORMED = "malformed Heap-Hash header"
    MISMATCH = "signature does not match"
    STALE = "timestamp is stale"
    FUTURE = "timestamp is in the future"

    @property
    def is_timestamp(self) -> bool:
        """True when the signature was right but the ``ts`` is outside the window (the answer then says the window)."""
        return self in (SignatureProblem.STALE, SignatureProblem.FUTURE)


@dataclass(frozen=True)
class HeapHash:
    ts: str
    signature: str

    @property
    def ts_ms(self) -> int:
        value = int(self.ts)
        return value * 1000 if value < SECONDS_TS_BELOW else value


@dataclass(frozen=True)
class Window:
    """How far a signed ``ts`` may lie in the past and in the future, in milliseconds."""

    max_age_ms: int
    max_future_ms: int

    @classmethod
    def of_seconds(cls, max_age: float, max_future: float) -> Window:
        return cls(int(max_age * 1000), int(max_future * 1000))


class SignatureError(Exception):
    def __init__(self, problem: SignatureProblem) -> None:
        super().__init__(problem.value)
        self.problem = problem


def parse_heap_hash(header: str | None) -> HeapHash:
    """Parse ``ts:...,hmac:...``: pairs in any order, spaces around, keys in any case.

    Unknown pairs are ignored (Heap may add some); a repeated ``ts`` or ``hmac`` is
    refused, since which one to believe would be a guess.
    """
    if header is None or not header.strip():
        raise SignatureError(SignatureProblem.MISSING)
    if len(header) > MAX_HEADER_LENGTH:
        raise SignatureError(SignatureProblem.MALFORMED)
    pairs: dict[str, str] = {}
    for part in header.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition(":")
        if not sep:
            raise SignatureError(SignatureProblem.MALFORMED)
        key = key.strip().lower()
        if key in ("ts", "hmac") and key in pairs:
            raise SignatureError(SignatureProblem.MALFORMED)
        pairs[key] = value.strip()
    ts, sig = pairs.get("ts"), pairs.get("hmac")
    if not ts or not sig or len(ts) > MAX_TS_DIGITS or not (ts.isascii() and ts.isdigit()):
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


def decode_signature(sig: str) -> list[bytes]:
    """Every 32-byte reading of ``sig``: hex, Base64, URL-safe Base64 (padding optional).

    Decoding is strict (no characters outside the alphabet are skipped), so one
    digest has few spellings.
    """
    candidates: list[bytes] = []
    if not sig.isascii():
        return candidates
    if len(sig) == 64:
        try:
            candidates.append(bytes.fromhex(sig))
        except ValueError:
            pass
    padded = sig + "=" * (-len(sig) % 4)
    for altchars in (None, b"-_"):
        try:
            raw = base64.b64decode(padded, altchars=altchars, validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(raw) == 32:
            # a string valid in both alphabets has no '+/-_' and decodes the same in both
            candidates.append(raw)
            break
    return candidates


def check_timestamp(heap_hash: HeapHash, now_ms: int, window: Window) -> None:
    age = now_ms - heap_hash.ts_ms
    if age > window.max_age_ms:
        raise SignatureError(SignatureProblem.STALE)
    if -age > window.max_future_ms:
        raise SignatureError(SignatureProblem.FUTURE)


@functools.lru_cache(maxsize=64)
def _keyed(secret: bytes) -> hmac.HMAC:
    """An HMAC-SHA256 keyed with ``secret``, to be copied: saves the digest lookup and key setup per request."""
    return hmac.new(secret, digestmod=hashlib.sha256)


def signature_matches(heap_hash: HeapHash, body: bytes, secrets: Iterable[bytes]) -> bool:
    """True when one of ``secrets`` made the signature over ``ts`` + ``body``.

    Every secret and every reading of the signature is compared, each in constant
    time, with no early exit: timing tells nothing about which secret nearly matched.
    """
    given = decode_signature(heap_hash.signature)
    matched = False
    for secret in secrets:
        mac = _keyed(secret).copy()  # the key schedule is done once per secret, not per request
        mac.update(heap_hash.ts.encode())
        mac.update(body)
        expected = mac.digest()
        for candidate in given:
            matched |= hmac.compare_digest(expected, candidate)
    return matched


def verify(heap_hash: HeapHash, body: bytes, secrets: Iterable[bytes], *, now_ms: int, window: Window) -> None:
    """Raise ``SignatureError`` unless one of ``secrets`` signed ``body`` within ``window``.

    The signature is checked before the timestamp, so a request that is not
    signed learns nothing about the window.
    """
    if not signature_matches(heap_hash, body, secrets):
        raise SignatureError(SignatureProblem.MISMATCH)
    check_timestamp(heap_hash, now_ms, window)


def check(header: str | None, body: bytes, secrets: Iterable[bytes], *, now_ms: int, window: Window) -> HeapHash:
    """Parse and verify in one call; what the ingress does for every request."""
    heap_hash = parse_heap_hash(header)
    verify(heap_hash, body, secrets, now_ms=now_ms, window=window)
    return heap_hash
