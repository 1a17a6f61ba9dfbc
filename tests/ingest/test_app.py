"""The ingress's pure helpers and its OpenAPI document (no broker, no server)."""

from __future__ import annotations

import base64
import gzip
import os
import zlib
from datetime import datetime, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict
from pydantic import BaseModel

from heapsync import contracts
from heapsync.contracts import PageRecord, RejectedRecord
from heapsync_dev.samples import drain_request, heap_request
from ingest import app, openapi, records, signature
from ingest import body as reading

NOW = datetime(2026, 11, 24, 5, 0, 1, 123456, tzinfo=timezone.utc)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20,
)


@given(extra=st.dictionaries(st.text(max_size=10), json_values, max_size=3),
       ids=st.lists(st.text(min_size=1, max_size=30), max_size=20), indent=st.booleans())
def test_page_record_bytes_reads_back_as_the_page_record(extra: dict[str, Any], ids: list[str], indent: bool) -> None:
    payload = {**extra, **heap_request("task", 1, 1, add=ids, remove=[])}
    body = orjson.dumps(payload, option=orjson.OPT_INDENT_2 if indent else 0)
    raw = records.page_record_bytes("acme", "req-1", NOW, body)
    expected = PageRecord(account="acme", request_id="req-1", received_at=NOW, payload=payload)
    assert PageRecord.model_validate_json(raw) == expected
    assert orjson.loads(raw)["payload"] == payload


def test_rejected_record_keeps_the_raw_request_without_secrets() -> None:
    headers = CIMultiDict({"Content-Type": "application/json", "Heap-Hash": "ts:1,hmac:abc",
                           "authorization": "Bearer x", "User-Agent": "heap"})
    raw = records.rejected_record_bytes("acme", "req-2", NOW, "invalid payload",
                                    [{"path": "data", "message": "m", "type": "t"}], records.safe_headers(headers),
                                    b'{"half":')
    record = RejectedRecord.model_validate_json(raw)
    assert record.body == '{"half":' and record.body_base64 is None and not record.body_truncated
    assert record.headers == {"Content-Type": "application/json", "User-Agent": "heap"}
    assert record.errors[0]["path"] == "data" and record.reason == "invalid payload"


def test_rejected_record_keeps_exact_bytes_that_are_not_utf8() -> None:
    body = b'{"id":"\xff\xfe"}'
    record = RejectedRecord.model_validate_json(records.rejected_record_bytes("a", "r", NOW, "x", [], {}, body))
    assert base64.b64decode(record.body_base64 or "") == body


def test_a_rejected_body_too_big_for_one_record_is_cut_and_flagged() -> None:
    body = b"\x01" * (records.REJECTED_RECORD_MAX_BYTES // 5)  # escapes to 6 bytes each: would not fit
    raw = records.rejected_record_bytes("a", "r", NOW, "x", [], {}, body)
    record = RejectedRecord.model_validate_json(raw)
    assert len(raw) <= records.REJECTED_RECORD_MAX_BYTES
    assert record.body_truncated and body.decode().startswith(record.body)


def test_request_ids_from_callers_are_kept_only_when_sane() -> None:
    assert app.request_id_from("abc-123") == "abc-123"
    for junk in (None, "", "a b", "x" * 200, "user@example.com", "\n"):
        rid = app.request_id_from(junk)
        assert rid != junk and len(rid) == 32


def test_records_of_one_segment_share_a_key() -> None:
    assert records.record_key("acme", "15225086") == records.record_key("acme", "15225086") == b"acme:15225086"
    assert records.record_key("acme", "1") != records.record_key("other", "1")


# ---------------------------------------------------------------- the OpenAPI document


def _resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    return doc["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else node


def test_openapi_payload_schemas_match_the_pydantic_models() -> None:
    """The hand-written document cannot drift from what the ingress validates."""
    doc = openapi.document()
    schemas = doc["components"]["schemas"]
    models: dict[str, type[BaseModel]] = {
        "FieldValue": contracts.FieldValue, "CustomerField": contracts.CustomerField,
        "CustomerConfig": contracts.CustomerConfig, "Segment": contracts.Segment, "SyncInfo": contracts.SyncInfo,
        "Member": contracts.Member, "SyncData": contracts.SyncData, "DrainData": contracts.DrainData,
        "HeapSync": contracts.HeapSync, "HeapDrain": contracts.HeapDrain,
    }
    for name, model in models.items():
        required = {n for n, f in model.model_fields.items() if f.is_required()}
        assert set(schemas[name]["required"]) == required, name
        assert set(schemas[name]["properties"]) == set(model.model_fields), name


def test_openapi_document_is_well_formed() -> None:
    doc = openapi.document()
    assert doc["openapi"].startswith("3.0")
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                refs.append(node["$ref"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    assert refs and all(r.rsplit("/", 1)[1] in doc["components"]["schemas"] for r in refs)
    post = doc["paths"]["/heap/listMembership/{account_id}"]["post"]
    assert {"200", "400", "403", "404", "405", "413", "415", "503"} <= set(post["responses"])
    assert "Retry-After" in post["responses"]["503"]["headers"]
    assert any(p["name"] == "Heap-Hash" and p["required"] for p in post["parameters"])
    # the samples satisfy the required fields the document lists
    for sample, name in ((heap_request("t", 1, 1, add=["a"]), "HeapSync"), (drain_request(), "HeapDrain")):
        assert set(doc["components"]["schemas"][name]["required"]) <= set(sample)
    assert orjson.loads(orjson.dumps(doc)) == doc


# ---------------------------------------------------------------- examine: the pure core of the webhook

SECRET = b"s3cret"
WINDOW = signature.Window.of_seconds(3600, 60)
NOW_MS = 1_763_900_000_000


def examine(body: bytes, secret: bytes = SECRET, ts_ms: int = NOW_MS) -> app.Examined:
    header = signature.heap_hash_header(secret, ts_ms, body)
    return app.examine(header, body, [SECRET], NOW_MS, WINDOW)


def test_examine_takes_a_signed_sync_and_a_drain() -> None:
    found = examine(orjson.dumps(heap_request("t", 1, 2, add=["a@x.io"], remove=[], segment_id=9)))
    assert found.problem is None and found.errors is None and found.action == "segment.users.sync"
    assert isinstance(found.payload, contracts.HeapSync) and found.payload.data.segment.id == "9"
    assert isinstance(examine(orjson.dumps(drain_request())).payload, contracts.HeapDrain)


def test_examine_checks_the_signature_before_looking_at_the_body() -> None:
    assert examine(b"{not json", secret=b"other").problem is signature.SignatureProblem.MISMATCH
    assert examine(b"{not json", ts_ms=NOW_MS - 7_200_000).problem is signature.SignatureProblem.STALE


def test_examine_reports_field_paths_and_keeps_unknown_actions_apart() -> None:
    assert examine(b"[1, 2]").errors == [{"path": "(body)", "message": "Input should be an object",
                                          "type": "dict_type"}]
    assert examine(b'{"action_type": 5}').errors[0]["path"] == "action_type"  # type: ignore[index]
    bad = heap_request("t", 2, 1, add=[""])
    paths = {e["path"] for e in examine(orjson.dumps(bad)).errors or []}
    assert paths == {"data.sync_info", "data.add.0.id"}
    other = examine(b'{"action_type": "segment.users.merge"}')
    assert other.action == "segment.users.merge" and other.payload is None and other.errors is None


@given(body=st.binary(max_size=400) | json_values.map(orjson.dumps))
def test_examine_never_raises_on_a_signed_body(body: bytes) -> None:
    found = examine(body)
    assert found.problem is None
    assert (found.errors is not None) or (found.action is not None)
    assert found.payload is None or found.errors is None


def test_loop_metrics_expose_like_prometheus_client() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from ingest.metrics import LoopHistogram, _LoopCollector

    ours = LoopHistogram("t_seconds", "doc", ["route"], buckets=(0.1, 1.0))
    registry = CollectorRegistry()
    registry.register(_LoopCollector([ours]))
    reference_registry = CollectorRegistry()
    reference = Histogram("t_seconds", "doc", ["route"], buckets=(0.1, 1.0), registry=reference_registry)
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        ours.labels("/x").observe(value)
        reference.labels("/x").observe(value)
    lines = lambda reg: sorted(line for line in generate_latest(reg).decode().splitlines()  # noqa: E731
                               if line.startswith("t_seconds") and "_created" not in line)
    assert lines(registry) == lines(reference_registry)


# ---------------------------------------------------------------- bodies: decoded within limits, chunk by chunk


def decode(chunks: list[bytes], encoding: str | None, limit: int = 1 << 20, wire_limit: int = 1 << 20) -> bytes:
    decoder = reading.BodyDecoder(encoding, limit, wire_limit)
    for chunk in chunks:
        decoder.feed(chunk)
    return decoder.finish()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


@given(body=st.binary(max_size=3000), encoding=st.sampled_from(["gzip", "deflate", None, "identity"]),
       cuts=st.lists(st.integers(0, 10_000), max_size=6))
def test_a_body_decodes_to_what_was_sent_however_it_is_chunked(body: bytes, encoding: str | None,
                                                               cuts: list[int]) -> None:
    sent = gzip.compress(body) if encoding == "gzip" else zlib.compress(body) if encoding == "deflate" else body
    assert decode(split(sent, cuts), encoding) == body


@given(body=st.binary(max_size=2000), trailing=st.binary(min_size=1, max_size=200),
       encoding=st.sampled_from(["gzip", "deflate"]), cuts=st.lists(st.integers(0, 10_000), max_size=6))
def test_any_byte_after_the_compressed_stream_is_refused(body: bytes, trailing: bytes, encoding: str,
                                                         cuts: list[int]) -> None:
    """Issue 16 #1: what followed the end of the stream went uncounted into ``unused_data``."""
    sent = (gzip.compress(body) if encoding == "gzip" else zlib.compress(body)) + trailing
    with pytest.raises(reading.UnreadableBody, match="after the end of the compressed stream"):
        decode(split(sent, cuts), encoding)


def test_trailing_bytes_are_refused_at_the_first_chunk_that_holds_them() -> None:
    decoder = reading.BodyDecoder("gzip", 1 << 20, 1 << 20)
    decoder.feed(gzip.compress(b"{}"))  # the stream ends exactly at a chunk's end
    with pytest.raises(reading.UnreadableBody):
        decoder.feed(b"\0" * 65536)
    second_member = reading.BodyDecoder("gzip", 1 << 20, 1 << 20)
    with pytest.raises(reading.UnreadableBody):
        second_member.feed(gzip.compress(b"{}") + gzip.compress(b"{}"))


@given(size=st.integers(1, 5000), limit=st.integers(1, 5000), encoding=st.sampled_from(["gzip", "deflate", None]),
       cuts=st.lists(st.integers(0, 10_000), max_size=4))
def test_the_decoded_size_is_bounded_however_it_is_chunked(size: int, limit: int, encoding: str | None,
                                                           cuts: list[int]) -> None:
    body = b" " * size
    sent = gzip.compress(body) if encoding == "gzip" else zlib.compress(body) if encoding == "deflate" else body
    if size > limit:
        with pytest.raises(reading.BodyTooLarge) as exc:
            decode(split(sent, cuts), encoding, limit=limit)
        assert exc.value.limit == limit and exc.value.counted == "decoded"
    else:
        assert decode(split(sent, cuts), encoding, limit=limit) == body


def test_compressed_bytes_count_against_their_own_limit() -> None:
    sent = gzip.compress(os.urandom(4000))  # does not compress: more bytes sent than decoded
    with pytest.raises(reading.BodyTooLarge) as exc:
        decode(split(sent, [1000, 2000, 3000]), "gzip", limit=1 << 20, wire_limit=3000)
    assert exc.value.limit == 3000 and exc.value.counted == "compressed"
    with pytest.raises(reading.UnreadableBody, match="ends early"):
        decode([gzip.compress(b"{}")[:-3]], "gzip")
    with pytest.raises(reading.UnsupportedEncoding):
        reading.BodyDecoder("br", 10, 10)


# ---------------------------------------------------------------- header bytes that are not UTF-8


def test_header_bytes_that_are_not_utf8_are_kept_exactly_and_serialise() -> None:
    """Issue 16 #11: aiohttp hands such bytes over as lone surrogates, which no JSON encoder takes."""
    escaped = b"caf\xe9 \xff".decode("utf-8", "surrogateescape")  # what aiohttp makes of the raw bytes
    headers = CIMultiDict({"X-Forwarded-For": escaped, "User-Agent": "héllo", "Heap-Hash": escaped})
    kept = records.safe_headers(headers)
    assert kept == {"X-Forwarded-For": "caf\\xe9 \\xff", "User-Agent": "héllo"}
    raw = records.rejected_record_bytes("acme", "r", NOW, "invalid payload", [], kept, b"{}")
    assert RejectedRecord.model_validate_json(raw).headers["X-Forwarded-For"] == "caf\\xe9 \\xff"
    assert records.printable("plain") == "plain" and records.printable("\ud800x") == "?x"


@given(raw=st.binary(max_size=40))
def test_any_header_bytes_become_printable_json(raw: bytes) -> None:
    text = records.printable(raw.decode("utf-8", "surrogateescape"))
    assert orjson.loads(orjson.dumps(text)) == text
    if raw.isascii():
        assert text == raw.decode()
