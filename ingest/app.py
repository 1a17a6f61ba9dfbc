"""The webhook receiver: verify, validate, hand to Kafka, and only then answer 200.

Order of checks for ``POST /heap/listMembership/{account_id}``, the cheap ones first:
account (404) -> content type (415) -> a well-formed ``Heap-Hash`` header (403; before
a byte of the body is read) -> content encoding (415) -> a body read slot (503 with
Retry-After when all are busy) -> body while reading: size as sent and decoded (413),
decodes with nothing after its compressed stream (400), arrives in time (408) ->
signature, before any JSON parsing (403) -> payload (400, kept in the rejected
topic; an unknown action type is 200 and kept there too) -> produce (503 with
Retry-After when Kafka does not ack in time or the local queue is full) -> 200.
Nothing refused before the payload check is written anywhere.

Every answer is a JSON body and carries ``X-Request-Id``; every request is one
JSON log line and a few Prometheus observations (``ingest/metrics.py``).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import itertools
import logging
import re
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from heapsync.contracts import DRAIN_ACTION, SYNC_ACTION, HeapDrain, HeapSync, RejectedRecord, signed_digest
from heapsync.producer import ProduceError, QueueFull, ResilientProducer
from heapsync.settings import Account, Settings
from ingest import metrics, openapi, signature

log = logging.getLogger("heapsync.ingest")

WEBHOOK_PATH = "/heap/listMembership/{account_id}"
RETRY_AFTER_SECONDS = 5
"""Sent with every 503: long enough for a broker blip, short next to Heap's 4-hour cadence."""

SECRET_HEADERS = frozenset({
    "heap-hash", "authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key",
    "x-auth-token", "x-amz-security-token",
})
REJECTED_RECORD_MAX_BYTES = 15 * 1024 * 1024
"""Below the topics' 16 MiB ``max.message.bytes``; a rejected body that would not fit is cut and flagged."""

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_MODELS: dict[str, type[HeapSync] | type[HeapDrain]] = {SYNC_ACTION: HeapSync, DRAIN_ACTION: HeapDrain}

# --------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------


def json_response(status: int, doc: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json", headers=headers)


def json_error(status: int, error: str, headers: dict[str, str] | None = None, **extra: Any) -> web.Response:
    return json_response(status, {"error": error, **extra}, headers)


def record_key(account: str, segment_id: str) -> bytes:
    """All pages and syncs of one segment go to one partition, in order."""
    return f"{account}:{segment_id}".encode()


_ID_PREFIX = uuid.uuid4().hex[:16]
_ID_COUNTER = itertools.count(1)


def request_id_from(header: str | None) -> str:
    """The caller's ``X-Request-Id`` when it is a sane token, else a fresh one (never echo junk into logs).

    Fresh ids are a random per-process prefix and a counter: unique, and cheaper than a uuid4 per request.
    """
    if header and _REQUEST_ID.match(header):
        return header
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


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


def safe_headers(headers: Any) -> dict[str, str]:
    """Request headers fit to keep: anything that carries or derives from a secret is left out,
    and the rest is made printable (``printable``), so that the record holding them always serialises."""
    return {printable(k): printable(v) for k, v in headers.items() if k.lower() not in SECRET_HEADERS}


def describe_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Field paths and messages, without echoing input values (they may be emails)."""
    return [
        {"path": ".".join(str(p) for p in e["loc"]) or "(body)", "message": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_input=False, include_context=False)
    ]


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


OFFLOAD_BYTES = 256 * 1024
"""Bodies larger than this are checked and parsed on a worker thread, not on the event loop."""


@dataclass
class Examined:
    """What ``examine`` found: a signature problem, payload errors, or an action (and its payload if known)."""

    problem: signature.SignatureProblem | None = None
    errors: list[dict[str, Any]] | None = None
    action: str | None = None
    payload: HeapSync | HeapDrain | None = None


def examine(header: str | None, body: bytes, secrets: list[bytes], now_ms: int,
            window: signature.Window) -> Examined:
    """Signature first, then JSON, then the model of the action type. Pure: no I/O, no clock.

    A signed body that is not an object with a non-empty string ``action_type`` has errors; an
    unknown action type comes back without payload (kept, not refused); a known one is validated.
    """
    try:
        heap_hash = signature.parse_heap_hash(header)
    except signature.SignatureError as exc:
        return Examined(problem=exc.problem)
    return examine_signed(heap_hash, body, secrets, now_ms, window)


def examine_signed(heap_hash: signature.HeapHash, body: bytes, secrets: list[bytes], now_ms: int,
                   window: signature.Window) -> Examined:
    """``examine`` for a header already parsed (the handler parses it before reading the body)."""
    try:
        signature.verify(heap_hash, body, secrets, now_ms=now_ms, window=window)
    except signature.SignatureError as exc:
        return Examined(problem=exc.problem)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return Examined(errors=[{"path": "(body)", "message": f"Invalid JSON: {exc}", "type": "json_invalid"}])
    if not isinstance(doc, dict):
        return Examined(errors=[{"path": "(body)", "message": "Input should be an object", "type": "dict_type"}])
    action = doc.get("action_type")
    if not isinstance(action, str) or not action:
        return Examined(errors=[{"path": "action_type", "message": "Field required: a non-empty string",
                                 "type": "missing"}])
    model = _MODELS.get(action)
    if model is None:
        return Examined(action=action)
    try:
        return Examined(action=action, payload=model.model_validate(doc))
    except ValidationError as exc:
        return Examined(action=action, errors=describe_errors(exc))


class BodyTooLarge(Exception):
    """Over a limit: ``limit`` bytes ``counted`` as sent on the wire (compressed) or as decoded."""

    def __init__(self, limit: int, counted: str = "decoded") -> None:
        super().__init__(f"{counted} body over {limit} bytes")
        self.limit = limit
        self.counted = counted


class UnreadableBody(Exception):
    """The body does not decode with its Content-Encoding, or its framing is broken."""


class UnsupportedEncoding(Exception):
    pass


_ZLIB_AUTO = zlib.MAX_WBITS | 32  # zlib or gzip header, detected
TRAILING_DATA = "data after the end of the compressed stream"


def body_decoder(content_encoding: str | None) -> Any:
    """A zlib decompressor for gzip/deflate, None for identity; ``UnsupportedEncoding`` otherwise.

    The server runs with aiohttp's own decompression off, so that a body that does not
    decode is a JSON 400 here and its decoded size counts against the limit as it grows.
    """
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip", "deflate"):
        return zlib.decompressobj(_ZLIB_AUTO)
    raise UnsupportedEncoding(encoding)


class BodyDecoder:
    """Decode a body chunk by chunk within two limits: bytes as sent, and bytes decoded. Pure, no I/O.

    Each chunk is counted before it is decoded, decoding never yields more than the decoded limit
    allows (a gzip bomb stops at the limit), and the first byte after the end of the compressed
    stream is refused (a second gzip member, or padding sent to be buffered for free): nothing is
    collected that is not counted, and nothing is copied more than once.
    """

    __slots__ = ("limit", "wire_limit", "received", "size", "_zlib", "_chunks")

    def __init__(self, content_encoding: str | None, limit: int, wire_limit: int) -> None:
        self._zlib = body_decoder(content_encoding)  # UnsupportedEncoding first: before any byte
        self.limit = limit
        self.wire_limit = limit if self._zlib is None else wire_limit  # identity: as sent is as decoded
        self.received = 0
        self.size = 0
        self._chunks: list[bytes] = []

    @property
    def compressed(self) -> bool:
        return self._zlib is not None

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes as received; raise ``BodyTooLarge`` or ``UnreadableBody`` as soon as they are."""
        self.received += len(chunk)
        if self.received > self.wire_limit:
            raise BodyTooLarge(self.wire_limit, "compressed" if self.compressed else "decoded")
        if self._zlib is not None:
            if self._zlib.eof:
                if chunk:
                    raise UnreadableBody(TRAILING_DATA)
                return
            try:
                chunk = self._zlib.decompress(chunk, self.limit - self.size + 1)
            except zlib.error as exc:
                raise UnreadableBody(f"body does not decode: {exc}") from exc
            if self._zlib.unconsumed_tail:  # output stopped at the limit with input left: over it
                raise BodyTooLarge(self.limit)
            if self._zlib.unused_data:
                raise UnreadableBody(TRAILING_DATA)
        self._add(chunk)

    def finish(self) -> bytes:
        """The whole decoded body, once the last chunk was fed."""
        if self._zlib is not None:
            try:
                tail = self._zlib.flush()
            except zlib.error as exc:
                raise UnreadableBody(f"body does not decode: {exc}") from exc
            self._add(tail)
            if not self._zlib.eof:
                raise UnreadableBody("compressed body ends early")
        chunks = self._chunks
        if not chunks:
            return b""
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _add(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise BodyTooLarge(self.limit)
        if data:
            self._chunks.append(data)


def _payload_error(exc: RequestPayloadError) -> UnreadableBody:
    return UnreadableBody(str(exc).split(",", 1)[-1].strip()[:200])


async def read_body(request: web.Request, limit: int, wire_limit: int | None = None) -> bytes:
    """Read at most ``limit`` decoded bytes and ``wire_limit`` bytes as sent, counting as they arrive.

    Chunked bodies have no length, so every chunk is counted (``BodyDecoder``); a declared
    Content-Length over the limit is refused before a byte is read.
    """
    encoding = request.headers.get("Content-Encoding")
    length = request.content_length
    if encoding is None and length is not None:  # the common case: one call, no per-chunk loop
        if length > limit:
            raise BodyTooLarge(limit)
        try:
            return await request.content.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise UnreadableBody("body shorter than its Content-Length") from exc
        except RequestPayloadError as exc:
            raise _payload_error(exc) from exc
    decoder = BodyDecoder(encoding, limit, limit if wire_limit is None else wire_limit)
    if length is not None and length > decoder.wire_limit:
        raise BodyTooLarge(decoder.wire_limit, "compressed" if decoder.compressed else "decoded")
    try:
        async for chunk in request.content.iter_any():
            decoder.feed(chunk)
    except RequestPayloadError as exc:
        raise _payload_error(exc) from exc
    return decoder.finish()


def is_json_content_type(request: web.Request) -> bool:
    """JSON or ``*+json``; a request with no Content-Type at all is read as JSON (the signature decides)."""
    raw = request.headers.get("Content-Type")
    if raw is None or raw == "application/json":  # the common cases, without parsing the header
        return True
    try:
        ctype = request.content_type
    except Exception:  # noqa: BLE001 - the stdlib's header parser raises IndexError on some junk (";0*")
        return False
    return ctype == "application/json" or (ctype.startswith("application/") and ctype.endswith("+json"))


# --------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a handler tells the middleware to log beyond status and time."""

    account: str | None = None
    reason: str | None = None


OUTCOME_KEY = "heapsync_outcome"
REQUEST_ID_KEY = "heapsync_request_id"


class Unavailable(Exception):
    def __init__(self, cause: str, reason: str) -> None:
        super().__init__(reason)
        self.cause = cause
        self.reason = reason


DRAIN_MAX_BYTES = 64 * 1024
"""A body refused unread is drained (keeping the connection) only up to this declared length."""


def unread(request: web.Request, resp: web.Response) -> web.Response:
    """``resp``, for a request refused before its body was read.

    A small body with a Content-Length is left for aiohttp to drain, so the connection stays
    usable; a large or chunked one is not worth reading at all: the connection closes after the answer.
    """
    if not request.content.is_eof() and (request.content_length is None
                                         or request.content_length > DRAIN_MAX_BYTES):
        resp.force_close()
    return resp


class Ingress:
    """Handlers bound to one producer slot and one set of accounts."""

    def __init__(self, settings: Settings, accounts: dict[str, Account], producers: ResilientProducer) -> None:
        self.settings = settings
        self.accounts = accounts
        self.producers = producers
        self.topics = settings.topics
        self.window = signature.Window.of_seconds(settings.signature_max_age_seconds,
                                                  settings.signature_max_future_seconds)
        self._secrets = {account_id: account.secrets() for account_id, account in accounts.items()}
        self.draining = False  # set on shutdown: /readyz turns 503 while requests in flight finish
        self._openapi = orjson.dumps(openapi.document())
        self._produce_ok = {kind: metrics.PRODUCE_LATENCY.labels(kind, "acked") for kind in ("pages", "rejected")}
        self._ids_add, self._ids_remove = metrics.IDS.labels("add"), metrics.IDS.labels("remove")
        self._body_slots = asyncio.Semaphore(settings.ingest_max_body_reads)

    # ---- the webhook

    async def receive(self, request: web.Request) -> web.Response:
        outcome: Outcome = request[OUTCOME_KEY]
        request_id: str = request[REQUEST_ID_KEY]
        account_id = request.match_info["account_id"]
        account = self.accounts.get(account_id)
        if account is None:
            outcome.reason = "unknown account"
            return unread(request, json_error(404, "Unknown account"))
        outcome.account = account_id
        if not is_json_content_type(request):
            outcome.reason = "unsupported content type"
            return unread(request, json_error(415, "Content-Type must be application/json",
                                              content_type=printable(request.headers.get("Content-Type", ""))[:100]))
        # Everything that can be refused without the body is, before a byte of it is read: without a
        # well-formed Heap-Hash nothing can be accepted, so an unsigned body is never read, decoded or hashed.
        try:
            heap_hash = signature.parse_heap_hash(request.headers.get("Heap-Hash"))
        except signature.SignatureError as exc:
            return unread(request, self._forbidden(outcome, exc.problem))
        if not signature.decode_signature(heap_hash.signature):
            # no secret can make this: the answer a wrong signature gets, without reading the body
            return unread(request, self._forbidden(outcome, signature.SignatureProblem.MISMATCH))
        content_encoding = request.headers.get("Content-Encoding")
        if content_encoding is not None:
            try:
                body_decoder(content_encoding)
            except UnsupportedEncoding as exc:
                outcome.reason = "unsupported content encoding"
                return unread(request, json_error(415, "Content-Encoding must be gzip, deflate or identity",
                                                  content_encoding=printable(str(exc))[:50]))

        slots = self._body_slots
        if slots.locked():
            try:
                async with asyncio.timeout(self.settings.produce_timeout_seconds):
                    await slots.acquire()
            except TimeoutError:
                outcome.reason = "too many bodies being read"
                metrics.UNAVAILABLE.labels("busy").inc()
                return unread(request, json_error(503, "Service unavailable", {"Retry-After": str(RETRY_AFTER_SECONDS)},
                                                  reason=outcome.reason, request_id=request_id))
        else:
            await slots.acquire()  # free: returns at once
        try:  # one slot per body being read, decoded and signature-checked: bounded memory and CPU
            try:
                body = await self._read(request)
            except UnreadableBody as exc:
                outcome.reason = "unreadable body"
                resp = json_error(400, "Unreadable body", reason=str(exc))
                resp.force_close()
                return resp
            except BodyTooLarge as exc:
                outcome.reason = "body too large"
                extra: dict[str, Any] = {"limit_bytes": exc.limit}
                if exc.counted == "compressed":
                    extra["counted"] = "compressed"
                resp = json_error(413, "Body too large", **extra)
                resp.force_close()  # the rest of the body is not worth reading on this connection
                return resp
            except TimeoutError:
                outcome.reason = "body not received in time"
                resp = json_error(408, "Body not received in time",
                                  timeout_seconds=self.settings.ingest_body_read_timeout_seconds)
                resp.force_close()
                return resp
            metrics.BODY_BYTES.observe(len(body))

            received_at = datetime.now(timezone.utc)
            args = (heap_hash, body, self._secrets[account_id], int(time.time() * 1000), self.window)
            if len(body) > OFFLOAD_BYTES:
                # hashing releases the GIL and the loop gets its turns meanwhile: a huge page
                # does not stall every other request (and /healthz) for the length of its parse
                examined = await asyncio.get_running_loop().run_in_executor(None, examine_signed, *args)
            else:
                examined = examine_signed(*args)
        finally:
            slots.release()
        if examined.problem is not None:
            return self._forbidden(outcome, examined.problem)
        if examined.errors is not None:
            return await self._invalid(request, outcome, account_id, request_id, received_at, body, examined.errors)
        action = examined.action
        assert action is not None
        payload = examined.payload
        if payload is None:
            # never dropped: kept where someone can look, and acknowledged so Heap does not retry forever
            reason = f"unsupported action_type {action[:100]!r}"
            await self._keep(request, outcome, account_id, request_id, received_at, body, reason, [], "unsupported_action")
            return json_response(200, {"status": "kept", "reason": "unsupported action_type", "request_id": request_id})

        # a drain is named by what is signed, so the same signed drain posted again is a repeat (issue 16 #3)
        digest = signed_digest(heap_hash.ts, body) if isinstance(payload, HeapDrain) else None
        value = page_record_bytes(account_id, request_id, received_at, body, digest)
        await self._produce("pages", self.topics.pages, value, record_key(account_id, payload.data.segment.id))
        if isinstance(payload, HeapSync):
            if payload.data.add:
                self._ids_add.inc(len(payload.data.add))
            if payload.data.remove:
                self._ids_remove.inc(len(payload.data.remove))
        outcome.reason = action
        return json_response(200, {"status": "accepted", "request_id": request_id})

    async def _read(self, request: web.Request) -> bytes:
        """The decoded body, within the size limits and (unless it is all here already) the read timeout."""
        limit, wire_limit = self.settings.max_body_bytes, self.settings.max_compressed_body_bytes
        if request.content.is_eof():  # the whole body came with the headers: no timer to set
            return await read_body(request, limit, wire_limit)
        async with asyncio.timeout(self.settings.ingest_body_read_timeout_seconds):
            return await read_body(request, limit, wire_limit)

    def _forbidden(self, outcome: Outcome, problem: signature.SignatureProblem) -> web.Response:
        outcome.reason = problem.value
        metrics.SIGNATURE_FAILURES.labels(problem.name.lower()).inc()
        if problem is signature.SignatureProblem.MISMATCH:
            return json_error(403, "Invalid signature")
        extra: dict[str, Any] = {"reason": problem.value}
        if problem in (signature.SignatureProblem.STALE, signature.SignatureProblem.FUTURE):
            extra["max_age_seconds"] = self.settings.signature_max_age_seconds
            extra["max_future_seconds"] = self.settings.signature_max_future_seconds
        return json_error(403, "Invalid signature", **extra)

    async def _invalid(self, request: web.Request, outcome: Outcome, account_id: str, request_id: str,
                       received_at: datetime, body: bytes, errors: list[dict[str, Any]]) -> web.Response:
        await self._keep(request, outcome, account_id, request_id, received_at, body, "invalid payload", errors,
                         "invalid_payload")
        return json_error(400, "Invalid payload", errors=errors, request_id=request_id)

    async def _keep(self, request: web.Request, outcome: Outcome, account_id: str, request_id: str,
                    received_at: datetime, body: bytes, reason: str, errors: list[dict[str, Any]],
                    kind: str) -> None:
        """Keep the raw request in the rejected topic, so it can be inspected and re-driven after a fix.

        If even this fails, ``Unavailable`` makes the answer 503 so that Heap retries: nothing is lost.
        """
        outcome.reason = reason
        value = rejected_record_bytes(account_id, request_id, received_at, reason, errors,
                                      safe_headers(request.headers), body)
        await self._produce("rejected", self.topics.rejected, value, account_id.encode())
        metrics.REJECTED.labels(kind).inc()

    async def _produce(self, kind: str, topic: str, value: bytes, key: bytes) -> None:
        """Return once Kafka acked the record; raise ``Unavailable`` within the produce timeout otherwise."""
        started = time.perf_counter()
        try:
            await self.producers.send(topic, value, key=key, timeout=self.settings.produce_timeout_seconds)
        except QueueFull as exc:
            metrics.PRODUCE_LATENCY.labels(kind, "queue_full").observe(time.perf_counter() - started)
            raise Unavailable("queue_full", exc.reason) from exc
        except ProduceError as exc:
            metrics.PRODUCE_LATENCY.labels(kind, "failed").observe(time.perf_counter() - started)
            raise Unavailable("broker_error", exc.reason) from exc
        except asyncio.TimeoutError as exc:
            metrics.PRODUCE_LATENCY.labels(kind, "timeout").observe(time.perf_counter() - started)
            raise Unavailable("timeout", "broker did not acknowledge in time") from exc
        self._produce_ok[kind].observe(time.perf_counter() - started)

    # ---- operations

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response(200, {"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.draining:
            return json_error(503, "Shutting down")
        wanted = [self.topics.pages, self.topics.rejected]
        try:
            present = await asyncio.get_running_loop().run_in_executor(
                None, self.producers.list_topics, 2.0)
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            return json_error(503, "Broker unreachable", reason=str(exc)[:200])
        missing = [t for t in wanted if t not in present]
        if missing:
            return json_error(503, "Topics missing", missing=missing)
        return json_response(200, {"status": "ready", "topics": wanted})

    async def metrics(self, request: web.Request) -> web.Response:
        for hook in request.app.get(SCRAPE_HOOKS, ()):  # e.g. the status page's reader starts on a first scrape
            hook()
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type="application/json")


# --------------------------------------------------------------------------
# Middleware: request id, JSON errors, metrics, one log line per request
# --------------------------------------------------------------------------


def _route_of(request: web.Request) -> str:
    info = request.match_info
    resource = info.route.resource if info.http_exception is None else None
    return resource.canonical if resource is not None else "other"


@web.middleware
async def observe(request: web.Request,
                  handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every answer is JSON with a request id; nothing a client sends becomes a 500 page."""
    started = time.perf_counter()
    request_id = request_id_from(request.headers.get("X-Request-Id"))
    outcome = Outcome()
    request[REQUEST_ID_KEY] = request_id
    request[OUTCOME_KEY] = outcome
    route = _route_of(request)
    webhook = route == WEBHOOK_PATH
    if webhook:
        metrics.IN_FLIGHT.inc()
    try:
        resp = await handler(request)
    except Unavailable as exc:
        outcome.reason = exc.reason
        metrics.UNAVAILABLE.labels(exc.cause).inc()
        resp = json_error(503, "Service unavailable", {"Retry-After": str(RETRY_AFTER_SECONDS)},
                          reason=exc.reason, request_id=request_id)
    except web.HTTPException as exc:
        if isinstance(exc, web.HTTPMethodNotAllowed):
            allowed = sorted(exc.allowed_methods)
            resp = json_error(405, "Method not allowed", {"Allow": ", ".join(allowed)}, allowed=allowed)
        elif exc.status < 400:
            raise
        else:
            resp = json_error(exc.status, exc.reason)
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001
        log.exception("unhandled error", extra={"request_id": request_id, "route": route})
        resp = json_error(500, "Internal error", request_id=request_id)
    finally:
        if webhook:
            metrics.IN_FLIGHT.dec()
    elapsed = time.perf_counter() - started
    status = resp.status
    resp.headers["X-Request-Id"] = request_id
    _request_counter(route, status).inc()
    _latency_histogram(route).observe(elapsed)
    # Accepted pages are logged at DEBUG: each is already recorded durably (the pages topic holds
    # request_id and received_at) and counted in /metrics; a line per page cost a tenth of the CPU
    # per request in the benchmark. Everything else, the requests someone has to look at, is INFO+.
    level = logging.DEBUG if status == 200 else (logging.WARNING if status >= 500 else logging.INFO)
    if (webhook or status >= 400) and log.isEnabledFor(level):
        log.log(level, "request", extra={
            "request_id": request_id, "method": request.method, "route": route, "status": status,
            "ms": round(elapsed * 1000, 2), "account": outcome.account, "reason": outcome.reason,
        })
    return resp


@functools.lru_cache(maxsize=256)
def _request_counter(route: str, status: int) -> Any:
    """Label lookups cached: route and status are small closed sets."""
    return metrics.REQUESTS.labels(route, str(status))


@functools.lru_cache(maxsize=64)
def _latency_histogram(route: str) -> Any:
    return metrics.LATENCY.labels(route)


# --------------------------------------------------------------------------
# Wiring
# --------------------------------------------------------------------------

INGRESS_KEY = web.AppKey("ingress", Ingress)


PUBLIC_ROUTES = (WEBHOOK_PATH, "/healthz", "/readyz")
"""All the public port serves: Heap's webhook and the probes a load balancer needs."""
ADMIN_ROUTES = ("/metrics", "/openapi.json", "/status", "/status.json")
"""Served on the admin listener only (HEAPSYNC_ADMIN_HOST, default loopback): never on the webhook's port."""


def create_app(settings: Settings, accounts: dict[str, Account], producers: ResilientProducer) -> web.Application:
    """The public app: the webhook, /healthz and /readyz; nothing else answers there but a JSON 404."""
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[observe])
    ingress = Ingress(settings, accounts, producers)
    app[INGRESS_KEY] = ingress
    app.router.add_post(WEBHOOK_PATH, ingress.receive)
    app.router.add_get("/healthz", ingress.healthz)
    app.router.add_get("/readyz", ingress.readyz)
    return app


AdminExtension = Callable[[web.Application, Settings], None]
"""Adds routes to the admin app. The command that runs the ingress installs the operator status page
this way (``heapsync_ops.status_page.add_status_routes``), so the stage imports no operator tool."""

SCRAPE_HOOKS = web.AppKey("scrape_hooks", list[Callable[[], object]])
"""Called on every ``/metrics`` scrape of the admin app, before the registry is read."""


def create_admin_app(settings: Settings, ingress: Ingress,
                     extensions: Sequence[AdminExtension] = ()) -> web.Application:
    """The admin app of the same process: metrics, the OpenAPI document, the probes, and what ``extensions`` add."""
    app = web.Application(middlewares=[observe])
    app[SCRAPE_HOOKS] = []
    app.router.add_get("/metrics", ingress.metrics)
    app.router.add_get("/openapi.json", ingress.openapi)
    app.router.add_get("/healthz", ingress.healthz)
    app.router.add_get("/readyz", ingress.readyz)
    for extend in extensions:
        extend(app, settings)
    return app
