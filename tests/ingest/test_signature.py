"""Heap-Hash parsing and checking: unit examples and hypothesis properties."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ingest.signature import (
    HeapHash,
    SignatureError,
    SignatureProblem,
    Window,
    check,
    decode_signature,
    heap_hash_header,
    parse_heap_hash,
    sign,
)

NOW_MS = 1_763_900_000_000
WINDOW = Window.of_seconds(3600, 60)
SECRET = b"webhook-secret"
BODY = b'{"action_type":"segment.users.sync"}'

secrets_st = st.binary(min_size=1, max_size=64)
bodies = st.binary(max_size=2048)
encodings = st.sampled_from(["base64", "hex"])


def problem_of(header: str | None, body: bytes = BODY, secrets: list[bytes] | None = None,
               now_ms: int = NOW_MS, window: Window = WINDOW) -> SignatureProblem | None:
    try:
        check(header, body, secrets or [SECRET], now_ms=now_ms, window=window)
    except SignatureError as exc:
        return exc.problem
    return None


# ---------------------------------------------------------------- examples


def test_heaps_reference_form_base64_and_hex_both_pass() -> None:
    for encoding in ("base64", "hex"):
        assert problem_of(heap_hash_header(SECRET, NOW_MS, BODY, encoding)) is None


def test_signature_is_hmac_sha256_of_ts_then_body_without_separator() -> None:
    digest = hmac.new(SECRET, f"{NOW_MS}".encode() + BODY, hashlib.sha256).digest()
    header = f"ts:{NOW_MS},hmac:{base64.b64encode(digest).decode()}"
    assert problem_of(header) is None
    header = f"ts:{NOW_MS},hmac:{digest.hex()}"
    assert problem_of(header) is None


@pytest.mark.parametrize("template", [
    "ts:{ts},hmac:{sig}",
    "hmac:{sig},ts:{ts}",
    "  TS : {ts} ,  HMAC:{sig}  ",
    "Ts:{ts},Hmac:{sig},",
    "ts:{ts},hmac:{sig},v:2",  # unknown pairs are ignored
    ",ts:{ts},,hmac:{sig}",
])
def test_header_form_is_forgiving(template: str) -> None:
    sig = sign(SECRET, str(NOW_MS), BODY)
    assert problem_of(template.format(ts=NOW_MS, sig=sig)) is None


def test_hex_in_upper_case_and_base64_url_safe_unpadded_pass() -> None:
    digest = hmac.new(SECRET, f"{NOW_MS}".encode() + BODY, hashlib.sha256).digest()
    assert problem_of(f"ts:{NOW_MS},hmac:{digest.hex().upper()}") is None
    assert problem_of(f"ts:{NOW_MS},hmac:{base64.urlsafe_b64encode(digest).decode().rstrip('=')}") is None


@pytest.mark.parametrize("header, problem", [
    (None, SignatureProblem.MISSING),
    ("", SignatureProblem.MISSING),
    ("   ", SignatureProblem.MISSING),
    ("ts:1", SignatureProblem.MALFORMED),
    ("hmac:abc", SignatureProblem.MALFORMED),
    ("ts=1,hmac=abc", SignatureProblem.MALFORMED),
    ("ts:abc,hmac:abc", SignatureProblem.MALFORMED),
    ("ts:-5,hmac:abc", SignatureProblem.MALFORMED),
    ("ts:１２３,hmac:abc", SignatureProblem.MALFORMED),  # non-ASCII digits
    ("ts:1,ts:2,hmac:abc", SignatureProblem.MALFORMED),
    ("ts:1,hmac:a,hmac:b", SignatureProblem.MALFORMED),
    ("ts:" + "9" * 17 + ",hmac:abc", SignatureProblem.MALFORMED),
    ("ts:1,hmac:" + "a" * 2000, SignatureProblem.MALFORMED),
])
def test_malformed_headers(header: str | None, problem: SignatureProblem) -> None:
    assert problem_of(header) is problem


def test_every_secret_is_tried_for_rotation() -> None:
    header = heap_hash_header(b"new-secret", NOW_MS, BODY)
    assert problem_of(header, secrets=[b"old-secret", b"new-secret"]) is None
    assert problem_of(header, secrets=[b"new-secret", b"old-secret"]) is None
    assert problem_of(header, secrets=[b"old-secret"]) is SignatureProblem.MISMATCH


def test_stale_and_future_timestamps() -> None:
    old = NOW_MS - WINDOW.max_age_ms - 1
    assert problem_of(heap_hash_header(SECRET, old, BODY)) is SignatureProblem.STALE
    assert problem_of(heap_hash_header(SECRET, NOW_MS - WINDOW.max_age_ms, BODY)) is None
    ahead = NOW_MS + WINDOW.max_future_ms + 1
    assert problem_of(heap_hash_header(SECRET, ahead, BODY)) is SignatureProblem.FUTURE
    assert problem_of(heap_hash_header(SECRET, NOW_MS + WINDOW.max_future_ms, BODY)) is None


def test_the_window_is_configurable() -> None:
    header = heap_hash_header(SECRET, NOW_MS - 120_000, BODY)  # two minutes old
    assert problem_of(header, window=Window.of_seconds(3600, 60)) is None
    assert problem_of(header, window=Window.of_seconds(60, 1)) is SignatureProblem.STALE


def test_a_wrong_signature_says_mismatch_even_when_the_ts_is_stale() -> None:
    """An unsigned request learns nothing about the window."""
    header = heap_hash_header(b"guess", NOW_MS - 10 * WINDOW.max_age_ms, BODY)
    assert problem_of(header) is SignatureProblem.MISMATCH


def test_ts_in_epoch_seconds_is_read_as_seconds() -> None:
    ts_s = NOW_MS // 1000
    assert HeapHash(str(ts_s), "x").ts_ms == ts_s * 1000
    assert problem_of(heap_hash_header(SECRET, ts_s, BODY)) is None


def test_lenient_base64_decoders_do_not_skip_junk() -> None:
    digest = hmac.new(SECRET, f"{NOW_MS}".encode() + BODY, hashlib.sha256).digest()
    b64 = base64.b64encode(digest).decode()
    assert decode_signature(b64) == [digest]
    assert decode_signature(b64[:10] + "!" + b64[10:]) == []
    assert decode_signature("é" * 44) == []


# ---------------------------------------------------------------- properties


@given(secret=secrets_st, body=bodies, encoding=encodings,
       age_ms=st.integers(-WINDOW.max_future_ms, WINDOW.max_age_ms))
def test_any_body_signed_within_the_window_passes(secret: bytes, body: bytes, encoding: str, age_ms: int) -> None:
    header = heap_hash_header(secret, NOW_MS - age_ms, body, encoding)
    assert problem_of(header, body, [secret]) is None


@given(secret=secrets_st, body=bodies, encoding=encodings, data=st.data())
def test_any_tampered_body_is_a_mismatch(secret: bytes, body: bytes, encoding: str, data: st.DataObject) -> None:
    header = heap_hash_header(secret, NOW_MS, body, encoding)
    tampered = data.draw(bodies.filter(lambda b: b != body), label="tampered")
    assert problem_of(header, tampered, [secret]) is SignatureProblem.MISMATCH


@given(secret=secrets_st, other=secrets_st, body=bodies, encoding=encodings)
def test_a_wrong_secret_is_a_mismatch(secret: bytes, other: bytes, body: bytes, encoding: str) -> None:
    assume(hmac.new(secret, b"", hashlib.sha256).digest() != hmac.new(other, b"", hashlib.sha256).digest())
    header = heap_hash_header(other, NOW_MS, body, encoding)
    assert problem_of(header, body, [secret]) is SignatureProblem.MISMATCH


@given(secrets=st.lists(secrets_st, min_size=1, max_size=5, unique=True), data=st.data(), body=bodies,
       encoding=encodings)
def test_rotation_any_of_the_accounts_secrets_signs(secrets: list[bytes], data: st.DataObject, body: bytes,
                                                    encoding: str) -> None:
    signer = data.draw(st.sampled_from(secrets), label="signer")
    assert problem_of(heap_hash_header(signer, NOW_MS, body, encoding), body, secrets) is None


@given(body=bodies, encoding=encodings, ts=st.integers(0, 10**15).map(str))
def test_a_changed_ts_is_a_mismatch(body: bytes, encoding: str, ts: str) -> None:
    """The ts is signed too: moving it to pass the window breaks the signature."""
    sig = sign(SECRET, str(NOW_MS), body, encoding)
    assume(ts != str(NOW_MS))
    assert problem_of(f"ts:{ts},hmac:{sig}", body) is SignatureProblem.MISMATCH


@given(secret=secrets_st, body=bodies, encoding=encodings,
       beyond_ms=st.integers(1, 10**9), past=st.booleans())
def test_signed_but_outside_the_window_is_stale_or_future(secret: bytes, body: bytes, encoding: str,
                                                          beyond_ms: int, past: bool) -> None:
    ts = NOW_MS - WINDOW.max_age_ms - beyond_ms if past else NOW_MS + WINDOW.max_future_ms + beyond_ms
    expected = SignatureProblem.STALE if past else SignatureProblem.FUTURE
    assert problem_of(heap_hash_header(secret, ts, body, encoding), body, [secret]) is expected


@settings(max_examples=300)
@given(header=st.one_of(st.none(), st.text(max_size=200),
                        st.lists(st.tuples(st.sampled_from(["ts", "hmac", "TS", " x", ""]), st.text(max_size=50)))
                        .map(lambda pairs: ",".join(f"{k}:{v}" for k, v in pairs))))
def test_any_header_gives_a_problem_never_a_crash(header: str | None) -> None:
    assert problem_of(header) in set(SignatureProblem) | {None}
    assert problem_of(header) is not None or header is not None


@given(st.lists(st.sampled_from(["ts", "hmac"]), min_size=2, max_size=2, unique=True),
       st.lists(st.sampled_from(["", " ", "  "]), min_size=4, max_size=4),
       st.booleans(), encodings)
def test_pair_order_spacing_and_case_do_not_matter(order: list[str], spaces: list[str], upper: bool,
                                                   encoding: str) -> None:
    values = {"ts": str(NOW_MS), "hmac": sign(SECRET, str(NOW_MS), BODY, encoding)}
    a, b = order
    key = str.upper if upper else str
    header = f"{spaces[0]}{key(a)}{spaces[1]}:{values[a]},{spaces[2]}{key(b)}:{spaces[3]}{values[b]}"
    assert parse_heap_hash(header) == HeapHash(values["ts"], values["hmac"])
    assert problem_of(header) is None


@pytest.mark.parametrize("problem", list(SignatureProblem))
def test_only_a_stale_or_future_timestamp_is_a_timestamp_problem(problem: SignatureProblem) -> None:
    # the ingress answers these with the accepted window; one rule, in the signature module
    assert problem.is_timestamp == (problem in (SignatureProblem.STALE, SignatureProblem.FUTURE))
