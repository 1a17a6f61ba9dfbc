"""The webhook under hostile input, in-process (issue 16 #1, #2, #11): the real aiohttp app, served on a
loopback port as the ingress serves it, with a recording stand-in for Kafka so that "nothing was written"
is checked directly. Requests are written byte by byte over a socket where the exact bytes matter.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from heapsync.contracts import RejectedRecord
from heapsync.producer import ResilientProducer
from heapsync.settings import Settings, parse_accounts
from heapsync_dev.samples import heap_request
from ingest.app import create_app
from ingest.signature import heap_hash_header

SECRET = "hardening-secret"
PATH = "/heap/listMembership/acme"
ACCOUNTS = parse_accounts(f'[accounts.acme]\nheap_webhook_secrets = ["{SECRET}"]\ncordial_api_key = "k"\n')


@dataclass
class RecordingProducer:
    """Stands in for the Kafka producer: every record the ingress writes is kept here."""

    sent: list[tuple[str, bytes | None, bytes]] = field(default_factory=list)

    async def send(self, topic: str, value: bytes, key: bytes | None = None, timeout: float = 10.0) -> None:
        self.sent.append((topic, key, value))

    def list_topics(self, timeout: float = 2.0) -> set[str]:
        return set()

    def close(self, timeout: float = 10.0) -> int:
        return 0


@dataclass
class Ingress:
    server: TestServer
    producer: RecordingProducer

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"


@pytest.fixture
async def make_ingress() -> AsyncIterator[Any]:
    servers: list[TestServer] = []

    async def start(**settings: Any) -> Ingress:
        producer = RecordingProducer()
        app = create_app(Settings(**settings), ACCOUNTS, cast(ResilientProducer, producer))
        server = TestServer(app, host="127.0.0.1")
        # as ingest/server.py runs it: the ingress decodes bodies itself, lingering 2 s
        await server.start_server(auto_decompress=False, lingering_time=2.0)
        servers.append(server)
        return Ingress(server, producer)

    yield start
    for server in servers:
        await server.close()


def signed(body: bytes, **extra: str) -> dict[str, str]:
    return {"Content-Type": "application/json",
            "Heap-Hash": heap_hash_header(SECRET.encode(), int(time.time() * 1000), body), **extra}


@dataclass
class Answer:
    status: int
    doc: dict[str, Any]


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    return Answer(status, json.loads(await reader.readexactly(length)))


async def raw_post(port: int, headers: Iterable[tuple[bytes, bytes]], body: bytes) -> Answer:
    """One request written exactly as given (header bytes that are not UTF-8 included)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [b"POST " + PATH.encode() + b" HTTP/1.1", b"Host: 127.0.0.1",
                 b"Content-Length: " + str(len(body)).encode(), *(k + b": " + v for k, v in headers)]
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        await writer.drain()
        return await read_answer(reader)
    finally:
        writer.close()


async def metric(port: int, name: str) -> float:
    """``name`` as /metrics shows it; the test server runs in this process, so read its registry
    (/metrics itself is on the admin listener, tests/ingest/test_admin_listener.py)."""
    from prometheus_client import REGISTRY, generate_latest

    text = generate_latest(REGISTRY).decode()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


BODIES_READ = "heapsync_ingest_body_bytes_count"
"""How many webhook bodies the ingress has read (``/metrics``): what a refusal before the body leaves alone."""


# ---------------------------------------------------------------- #2: no Heap-Hash, no body read


def bomb(decoded: int = 15 * 1024 * 1024) -> bytes:
    """A gzip body of ~15 KB that inflates to ``decoded`` bytes of valid JSON."""
    return gzip.compress(b"[" + b" " * (decoded - 2) + b"]", compresslevel=9)


async def test_a_gzip_bomb_without_a_usable_heap_hash_is_refused_before_its_body_is_read(make_ingress: Any) -> None:
    ingress = await make_ingress()
    body = bomb()
    assert len(body) < 20_000
    before = await metric(ingress.port, BODIES_READ)
    async with aiohttp.ClientSession() as session:
        answers = []
        for heap_hash in (None, "ts:abc,hmac:x", "ts:1,hmac:not-a-sha256-digest"):
            headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
            if heap_hash is not None:
                headers["Heap-Hash"] = heap_hash
            async with session.post(ingress.url, data=body, headers=headers) as resp:
                answers.append((resp.status, await resp.json()))
    assert answers == [(403, {"error": "Invalid signature", "reason": "missing Heap-Hash header"}),
                       (403, {"error": "Invalid signature", "reason": "malformed Heap-Hash header"}),
                       (403, {"error": "Invalid signature"})]
    assert await metric(ingress.port, BODIES_READ) == before, "no body was read, so none was inflated or hashed"
    assert ingress.producer.sent == []


async def test_an_unknown_account_is_still_404_before_the_signature(make_ingress: Any) -> None:
    ingress = await make_ingress()
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{ingress.port}/heap/listMembership/nobody", data=bomb(),
                                headers={"Content-Encoding": "gzip"}) as resp:
            assert (resp.status, await resp.json()) == (404, {"error": "Unknown account"})
    assert ingress.producer.sent == []


# ---------------------------------------------------------------- #1: data after the end of the gzip stream


async def test_data_after_the_gzip_stream_is_400_without_reading_the_rest(make_ingress: Any) -> None:
    """gzip(b"{}") and then 48 MiB of zeros, chunked: the old code read all of it uncounted (past the 16 MiB
    limit, copying its buffer each chunk) and answered as if the body were ``{}``."""
    ingress = await make_ingress()
    chunk, total = 64 * 1024, 48 * 1024 * 1024
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        yield gzip.compress(b"{}")
        while sent < total:
            sent += chunk
            yield b"\0" * chunk

    headers = {**signed(b"{}"), "Content-Encoding": "gzip"}
    async with aiohttp.ClientSession() as session:
        async with session.post(ingress.url, data=body(), headers=headers) as resp:
            status, doc = resp.status, await resp.json()
    assert (status, doc) == (400, {"error": "Unreadable body", "reason": "data after the end of the compressed stream"})
    assert sent < total // 2, "the ingress stopped reading at the first byte after the stream"
    assert ingress.producer.sent == []


async def test_a_compressed_body_counts_its_bytes_as_sent(make_ingress: Any) -> None:
    ingress = await make_ingress(max_body_bytes=1 << 20, max_compressed_body_bytes=1000)
    page = json.dumps(heap_request("c", 1, 1, add=[f"user{i}@example.com" for i in range(60)])).encode()
    packed = gzip.compress(page, compresslevel=0)  # stored, not compressed: more than 1000 bytes as sent
    async with aiohttp.ClientSession() as session:
        async with session.post(ingress.url, data=packed, headers={**signed(page), "Content-Encoding": "gzip"}) as resp:
            assert (resp.status, await resp.json()) == (413, {"error": "Body too large", "limit_bytes": 1000,
                                                             "counted": "compressed"})
        async with session.post(ingress.url, data=gzip.compress(page),  # 2.2 KB decoded, 451 bytes as sent
                                headers={**signed(page), "Content-Encoding": "gzip"}) as resp:
            assert resp.status == 200, await resp.text()
    assert [topic for topic, _, _ in ingress.producer.sent] == ["heapsync.pages"]


# ---------------------------------------------------------------- #2: concurrent body reads are bounded


async def test_body_reads_at_once_are_bounded_and_a_stalled_body_times_out(make_ingress: Any) -> None:
    ingress = await make_ingress(ingest_max_body_reads=1, produce_timeout_seconds=0.5,
                                 ingest_body_read_timeout_seconds=3.0)
    page = json.dumps(heap_request("slot", 1, 1, add=["a@example.com"])).encode()
    # a chunked body whose sender stalls after the first chunk holds the only read slot
    reader, writer = await asyncio.open_connection("127.0.0.1", ingress.port)
    head = [b"POST " + PATH.encode() + b" HTTP/1.1", b"Host: x", b"Transfer-Encoding: chunked",
            *(k.encode() + b": " + v.encode() for k, v in signed(page).items())]
    writer.write(b"\r\n".join(head) + b"\r\n\r\n" + b"%x\r\n%s\r\n" % (10, page[:10]))
    await writer.drain()
    await asyncio.sleep(0.2)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(ingress.url, data=page, headers=signed(page)) as resp:
                doc = await resp.json()
                assert resp.status == 503 and resp.headers["Retry-After"] == "5", doc
                assert doc["reason"] == "too many bodies being read"
            # the stalled sender loses its slot when its body does not arrive in time
            stalled = await asyncio.wait_for(read_answer(reader), 10)
            assert (stalled.status, stalled.doc) == (408, {"error": "Body not received in time",
                                                            "timeout_seconds": 3.0})
            async with session.post(ingress.url, data=page, headers=signed(page)) as resp:
                assert resp.status == 200, await resp.text()
    finally:
        writer.close()
    assert len(ingress.producer.sent) == 1


# ---------------------------------------------------------------- #11: header bytes that are not UTF-8


async def test_a_header_byte_that_is_not_utf8_gives_a_400_and_the_request_is_kept(make_ingress: Any) -> None:
    ingress = await make_ingress()
    body = b'{"action_type": "segment.users.sync"}'  # signed, but not a valid sync
    headers = [(k.encode(), v.encode()) for k, v in signed(body).items()]
    answer = await raw_post(ingress.port, [*headers, (b"X-Forwarded-For", b"caf\xe9")], body)
    assert answer.status == 400 and answer.doc["error"] == "Invalid payload", answer
    [(topic, key, value)] = ingress.producer.sent
    record = RejectedRecord.model_validate_json(value)
    assert topic == "heapsync.pages.rejected" and key == b"acme" and record.request_id == answer.doc["request_id"]
    assert record.headers["X-Forwarded-For"] == "caf\\xe9" and record.body == body.decode()

    odd_type = await raw_post(ingress.port, [(b"Content-Type", b"text/caf\xe9")], body)
    assert odd_type.status == 415 and odd_type.doc["content_type"] == "text/caf\\xe9"
    odd_encoding = await raw_post(ingress.port, [*headers, (b"Content-Encoding", b"caf\xe9")], body)
    assert odd_encoding.status == 415 and odd_encoding.doc["content_encoding"] == "caf\\xe9"
    assert len(ingress.producer.sent) == 1


async def test_a_content_type_the_stdlib_parser_chokes_on_is_415_not_500(make_ingress: Any) -> None:
    """Found by tests/ingest/test_fuzz.py: aiohttp's ``content_type`` raises IndexError on ``;0*``."""
    ingress = await make_ingress()
    answer = await raw_post(ingress.port, [(b"Content-Type", b";0*")], b"{}")
    assert (answer.status, answer.doc["content_type"]) == (415, ";0*")
    assert ingress.producer.sent == []
