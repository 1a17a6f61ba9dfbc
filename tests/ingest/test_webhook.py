"""The running ingress (a real process on the session Tansu broker), seen from Heap's and an operator's side."""

from __future__ import annotations

import gzip
import json
import signal
import threading
import time
import uuid

import pytest

from heapsync_dev.samples import drain_request, heap_request
from tests.conftest import Pipeline
from tests.ingest_support import has_request_ids, raw_request, read_topic, signed_headers

pytestmark = pytest.mark.integration

PATH = "/heap/listMembership/acme"
LIMIT = 64 * 1024


def body_of(payload: dict) -> bytes:
    return json.dumps(payload).encode()


def test_what_heap_gets_back_and_what_lands_in_kafka(pipeline: Pipeline) -> None:
    pipeline.extra_env["HEAPSYNC_MAX_BODY_BYTES"] = str(LIMIT)
    pipeline.start_ingest()
    port, secret = pipeline.ingest_port, pipeline.secret

    # accepted: both encodings; the record is keyed by account and segment
    page = body_of(heap_request(str(uuid.uuid4()), 1, 1, add=["a@example.com"], segment_id=77))
    ok = raw_request(port, "POST", PATH, page, signed_headers(secret, page))
    ok_hex = raw_request(port, "POST", PATH, page, signed_headers(secret, page, encoding="hex"))
    drain = body_of(drain_request(segment_id="77"))
    ok_drain = raw_request(port, "POST", PATH, drain, signed_headers(secret, drain))
    assert [r.status for r in (ok, ok_hex, ok_drain)] == [200, 200, 200], ok.raw
    assert ok.json["status"] == "accepted" and ok.headers["X-Request-Id"] == ok.json["request_id"]

    # a stale signature: 403 that says so, without the expected signature
    stale = raw_request(port, "POST", PATH, page,
                        signed_headers(secret, page, ts_ms=int(time.time() * 1000) - 7_200_000))
    assert stale.status == 403 and stale.json["reason"] == "timestamp is stale", stale.raw
    assert stale.json["max_age_seconds"] == 3600
    wrong = raw_request(port, "POST", PATH, page, signed_headers("not-the-secret", page))
    assert (wrong.status, wrong.json) == (403, {"error": "Invalid signature"})
    unsigned = raw_request(port, "POST", PATH, page, {"Content-Type": "application/json"})
    assert unsigned.status == 403 and unsigned.json["reason"] == "missing Heap-Hash header"

    # the signature is checked before the body is parsed: garbage unsigned is 403, not 400
    assert raw_request(port, "POST", PATH, b"{nope", {"Content-Type": "application/json"}).status == 403

    # 404, 405 with Allow, 415
    assert raw_request(port, "POST", "/heap/listMembership/nobody", page, signed_headers(secret, page)).status == 404
    get = raw_request(port, "GET", PATH)
    assert get.status == 405 and get.headers["Allow"] == "POST" and get.json["error"] == "Method not allowed"
    form = raw_request(port, "POST", PATH, page, {**signed_headers(secret, page), "Content-Type": "text/plain"})
    assert form.status == 415 and "error" in form.json

    # 413 by Content-Length, and while reading a chunked body that declares no length
    big = b'{"pad":"' + b"x" * (LIMIT + 10) + b'"}'
    assert raw_request(port, "POST", PATH, big, signed_headers(secret, big)).status == 413
    chunks = (big[i:i + 8192] for i in range(0, len(big), 8192))
    chunked = raw_request(port, "POST", PATH, chunks, signed_headers(secret, big), chunked=True)
    assert chunked.status == 413 and chunked.json["limit_bytes"] == LIMIT
    small_chunked = raw_request(port, "POST", PATH, iter([page[:10], page[10:]]), signed_headers(secret, page),
                                chunked=True)
    assert small_chunked.status == 200, small_chunked.raw

    # compressed bodies: decoded, signed as decoded, and the decoded size counts against the limit
    gz = raw_request(port, "POST", PATH, gzip.compress(page), {**signed_headers(secret, page),
                                                               "Content-Encoding": "gzip"})
    assert gz.status == 200, gz.raw
    bomb = b"[" + b" " * (LIMIT * 4) + b"]"
    r_bomb = raw_request(port, "POST", PATH, gzip.compress(bomb), {**signed_headers(secret, bomb),
                                                                    "Content-Encoding": "gzip"})
    assert r_bomb.status == 413
    broken = raw_request(port, "POST", PATH, b"\x1f\x8bnot gzip", {**signed_headers(secret, page),
                                                                  "Content-Encoding": "gzip"})
    assert broken.status == 400 and broken.json["error"] == "Unreadable body"
    brotli = raw_request(port, "POST", PATH, page, {**signed_headers(secret, page), "Content-Encoding": "br"})
    assert brotli.status == 415 and "error" in brotli.json

    # signed but invalid: 400 with field paths
    bad_range = body_of(heap_request("t", 3, 2, add=["b@example.com"]))
    r_range = raw_request(port, "POST", PATH, bad_range, signed_headers(secret, bad_range))
    assert r_range.status == 400 and [e["path"] for e in r_range.json["errors"]] == ["data.sync_info"]
    missing = heap_request("t", 1, 1, add=["c@example.com"])
    del missing["data"]["segment"]["name"]
    missing["data"]["add"].append({})
    bad_fields = body_of(missing)
    r_fields = raw_request(port, "POST", PATH, bad_fields, signed_headers(secret, bad_fields))
    assert r_fields.status == 400
    assert {e["path"] for e in r_fields.json["errors"]} == {"data.segment.name", "data.add.1.id"}
    assert "c@example.com" not in r_fields.raw.decode()  # errors do not echo ids
    not_json = b'{"action_type": "segment.users.sync",'
    r_json = raw_request(port, "POST", PATH, not_json, signed_headers(secret, not_json))
    assert r_json.status == 400 and r_json.json["errors"][0]["path"] == "(body)"

    # another action type: acknowledged, and kept
    other = body_of({"action_type": "segment.users.rename", "data": {"segment": {"id": 1}}})
    r_other = raw_request(port, "POST", PATH, other, signed_headers(secret, other, **{"X-Request-Id": "heap-42"}))
    assert r_other.status == 200 and r_other.json["status"] == "kept" and r_other.json["request_id"] == "heap-42"

    topics = f"{pipeline.prefix}.pages", f"{pipeline.prefix}.pages.rejected"
    accepted = [ok.json["request_id"], ok_hex.json["request_id"], ok_drain.json["request_id"],
                small_chunked.json["request_id"], gz.json["request_id"]]
    pages = read_topic(pipeline.broker.bootstrap, topics[0], has_request_ids(accepted))
    assert sorted(r.value["request_id"] for r in pages) == sorted(accepted)
    assert {r.key for r in pages} == {b"acme:77"} and len({r.partition for r in pages}) == 1
    assert pages[0].value["payload"] == json.loads(page) and pages[0].value["account"] == "acme"

    kept = {r_range.json["request_id"]: bad_range, r_fields.json["request_id"]: bad_fields,
            r_json.json["request_id"]: not_json, "heap-42": other}
    rejected = read_topic(pipeline.broker.bootstrap, topics[1], has_request_ids(kept))
    by_id = {r.value["request_id"]: r.value for r in rejected}
    assert set(by_id) == set(kept), "only signed requests are kept, each once"
    for rid, raw in kept.items():
        record = by_id[rid]
        assert record["body"].encode() == raw and record["account"] == "acme" and record["received_at"]
        assert "Heap-Hash" not in record["headers"] and "heap-hash" not in {h.lower() for h in record["headers"]}
        assert record["headers"].get("Content-Type") == "application/json"
    assert by_id["heap-42"]["reason"] == "unsupported action_type 'segment.users.rename'"
    assert by_id[r_fields.json["request_id"]]["errors"] == r_fields.json["errors"]


def test_health_readiness_metrics_openapi_and_logs(pipeline: Pipeline) -> None:
    proc = pipeline.start_ingest()
    port, secret = pipeline.ingest_port, pipeline.secret
    assert raw_request(port, "GET", "/healthz").json == {"status": "ok"}
    ready = raw_request(port, "GET", "/readyz")
    assert ready.status == 200 and ready.json["status"] == "ready"
    doc = raw_request(pipeline.admin_port, "GET", "/openapi.json")  # the admin listener, not the webhook's port
    assert doc.status == 200 and "/heap/listMembership/{account_id}" in doc.json["paths"]

    page = body_of(heap_request("m", 1, 1, add=["secret-user@example.com", "b@example.com"], remove=["c@x.io"]))
    assert raw_request(port, "POST", PATH, page, signed_headers(secret, page)).status == 200
    assert raw_request(port, "POST", PATH, page, signed_headers("wrong", page)).status == 403
    # a big page is checked and parsed off the event loop; same answer
    big = body_of(heap_request("big", 1, 1, add=[f"user{i}@example.com" for i in range(12_000)]))
    assert raw_request(port, "POST", PATH, big, signed_headers(secret, big)).status == 200

    text = raw_request(pipeline.admin_port, "GET", "/metrics").raw.decode()
    route = 'route="/heap/listMembership/{account_id}"'
    assert f'heapsync_ingest_requests_total{{{route},status="200"}} 2.0' in text
    assert f'heapsync_ingest_requests_total{{{route},status="403"}} 1.0' in text
    assert 'heapsync_ingest_ids_total{op="add"} 12002.0' in text
    assert 'heapsync_ingest_signature_failures_total{problem="mismatch"} 1.0' in text
    for name in ("heapsync_ingest_request_seconds_bucket", "heapsync_ingest_body_bytes_count",
                 'heapsync_ingest_produce_seconds_count{outcome="acked",topic="pages"} 2.0'):
        assert name in text

    assert proc.stop() == 0
    lines = [json.loads(line) for line in proc.output().splitlines() if line.startswith("{")]
    requests = [line for line in lines if line["msg"] == "request"]
    # at INFO, accepted pages are not logged one by one (they are in the pages topic); refusals are
    assert {line["status"] for line in requests} == {403}
    assert requests[0]["reason"] == "signature does not match" and requests[0]["account"] == "acme"
    assert all(len(line["request_id"]) == 32 for line in requests)
    assert secret not in proc.output() and "secret-user@example.com" not in proc.output()
    assert "c@x.io" not in proc.output()


def test_sigterm_finishes_requests_in_flight_and_every_200_is_in_kafka(pipeline: Pipeline) -> None:
    # a long producer linger keeps every accepted request in flight for half a second,
    # so the SIGTERM surely lands while requests are waiting for Kafka
    pipeline.extra_env["HEAPSYNC_INGEST_LINGER_MS"] = "500"
    proc = pipeline.start_ingest()
    port, secret = pipeline.ingest_port, pipeline.secret
    answers: list[tuple[int, str | None]] = []
    answered_at: list[float] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(n: int) -> None:
        i = 0
        while not stop.is_set() and i < 400:
            body = body_of(heap_request(f"sig-{n}", 1, 1, add=[f"u{n}-{i}@example.com"]))
            try:
                r = raw_request(port, "POST", PATH, body, signed_headers(secret, body), timeout=20)
                answer = (r.status, r.json.get("request_id") if r.status == 200 else None)
            except OSError:
                answer = (0, None)  # refused once the ingress stopped listening
            with lock:
                answers.append(answer)
                answered_at.append(time.monotonic())
            i += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with lock:
            if sum(1 for s, _ in answers if s == 200) >= 40:
                break
        time.sleep(0.05)
    signalled = time.monotonic()
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.popen.wait(30) == 0, proc.output()[-3000:]
    stop.set()
    for t in threads:
        t.join(30)

    accepted = [rid for status, rid in answers if status == 200]
    assert len(accepted) >= 40, answers[-10:]
    finished_after = [a for a, t in zip(answers, answered_at) if t > signalled and a[0] == 200]
    assert finished_after, "requests in flight at SIGTERM were answered 200 before the exit"
    assert {s for s, _ in answers} <= {200, 503, 0}
    pages = read_topic(pipeline.broker.bootstrap, f"{pipeline.prefix}.pages", has_request_ids(accepted), 60)
    assert set(accepted) <= {r.value["request_id"] for r in pages}
    assert "producer flushed" in proc.output()


def test_the_timestamp_window_is_set_by_the_environment(pipeline: Pipeline) -> None:
    pipeline.extra_env["HEAPSYNC_SIGNATURE_MAX_AGE_SECONDS"] = "60"
    pipeline.extra_env["HEAPSYNC_SIGNATURE_MAX_FUTURE_SECONDS"] = "5"
    pipeline.start_ingest()
    port, secret = pipeline.ingest_port, pipeline.secret
    page = body_of(heap_request("window", 1, 1, add=["w@example.com"]))
    now = int(time.time() * 1000)
    assert raw_request(port, "POST", PATH, page, signed_headers(secret, page, ts_ms=now - 30_000)).status == 200
    old = raw_request(port, "POST", PATH, page, signed_headers(secret, page, ts_ms=now - 120_000))
    assert old.status == 403 and old.json["reason"] == "timestamp is stale" and old.json["max_age_seconds"] == 60
    ahead = raw_request(port, "POST", PATH, page, signed_headers(secret, page, ts_ms=now + 60_000, encoding="hex"))
    assert ahead.status == 403 and ahead.json["reason"] == "timestamp is in the future"


def test_odd_header_bytes_are_kept_and_unsigned_bombs_are_never_read(pipeline: Pipeline) -> None:
    """Issue 16 #11: a header byte that is not UTF-8 gave a 500 and the request was lost; #1/#2: an unsigned
    gzip bomb was inflated and hashed before anything looked for Heap-Hash. Nothing refused reaches Kafka."""
    pipeline.start_ingest()
    port, secret = pipeline.ingest_port, pipeline.secret

    def bodies_read() -> str:
        text = raw_request(pipeline.admin_port, "GET", "/metrics").raw.decode()
        return next(line for line in text.splitlines() if line.startswith("heapsync_ingest_body_bytes_count"))

    # http.client sends str header values as Latin-1: the byte \xe9, not UTF-8
    bad = body_of(heap_request("odd", 3, 2, add=["b@example.com"]))  # page 3 of 2: signed but invalid
    odd = raw_request(port, "POST", PATH, bad, signed_headers(secret, bad, **{"X-Forwarded-For": "caf\xe9"}))
    assert odd.status == 400 and odd.json["error"] == "Invalid payload", odd.raw

    read_before = bodies_read()
    bomb = gzip.compress(b"[" + b" " * (15 * 1024 * 1024) + b"]")
    for heap_hash in (None, "ts:1", "ts:1,hmac:abc"):
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        if heap_hash:
            headers["Heap-Hash"] = heap_hash
        refused = raw_request(port, "POST", PATH, bomb, headers)
        assert refused.status == 403 and refused.json["error"] == "Invalid signature", refused.raw
    trailing = gzip.compress(b"{}") + b"\0" * 1024
    after_end = raw_request(port, "POST", PATH, trailing, {**signed_headers(secret, b"{}"), "Content-Encoding": "gzip"})
    assert after_end.status == 400 and after_end.json["reason"] == "data after the end of the compressed stream"
    assert bodies_read() == read_before, "the bombs were refused unread"

    marker = body_of(heap_request("odd-marker", 1, 1, add=["m@example.com"]))
    ok = raw_request(port, "POST", PATH, marker, signed_headers(secret, marker))
    assert ok.status == 200
    bootstrap = pipeline.broker.bootstrap
    pages = read_topic(bootstrap, f"{pipeline.prefix}.pages", has_request_ids([ok.json["request_id"]]))
    assert [r.value["request_id"] for r in pages] == [ok.json["request_id"]], "nothing refused was written"
    [kept] = read_topic(bootstrap, f"{pipeline.prefix}.pages.rejected", has_request_ids([odd.json["request_id"]]))
    assert kept.value["headers"]["X-Forwarded-For"] == "caf\\xe9" and kept.value["body"].encode() == bad
