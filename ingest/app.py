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

The body is read by ``ingest/body.py`` and what is kept is encoded by ``ingest/records.py``;
this module decides, answers and produces.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from heapsync.contracts import DRAIN_ACTION, SYNC_ACTION, HeapDrain, HeapSync, signed_digest
from heapsync.producer import ProduceError, QueueFull, ResilientProducer
from heapsync.settings import Account, Settings
from ingest import metrics, openapi, signature
from ingest.body import BodyTooLarge, UnreadableBody, UnsupportedEncoding, body_decoder, read_body
from ingest.records import page_record_bytes, printable, record_key, rejected_record_bytes, safe_headers

log = logging.getLogger("heapsync.ingest")

WEBHOOK_PATH = "/heap/listMembership/{account_id}"
RETRY_AFTER_SECONDS = 5
"""Sent with every 503: long enough for a broker blip, short next to Heap's 4-hour cadence."""

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_MODELS: dict[str, type[HeapSync] | type[HeapDrain]] = {SYNC_ACTION: HeapSync, DRAIN_ACTION: HeapDrain}

# --------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------


def json_response(status: int, doc: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json", headers=headers)


def json_error(status: int, error: str, headers: dict[str, str] | None = None, **extra: Any) -> web.Response:
    return json_response(status, {"error": error, **extra}, headers)


_ID_PREFIX = uuid.uuid4().hex[:16]
_ID_COUNTER = itertools.count(1)


def request_id_from(header: str | None) -> str:
    """The caller's ``X-Request-Id`` when it is a sane token, else a fresh one (never echo junk into logs).

    Fresh ids are a random per-process prefix and a counter: unique, and cheaper than a uuid4 per request.
    """
    if header and _REQUEST_ID.match(header):
        return header
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def describe_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Field paths and messages, without echoing input values (they may be emails)."""
    return [
        {"path": ".".join(str(p) for p in e["loc"]) or "(body)", "message": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_input=False, include_context=False)
    ]


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


@dataclass
class Received:
    """One webhook request whose body was read: everything a record of it is made from."""

    request: web.Request
    outcome: Outcome
    account_id: str
    request_id: str
    heap_hash: signature.HeapHash
    received_at: datetime
    body: bytes


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
        """The webhook: refuse what can be refused unread, read and examine the body, then keep or hand it on."""
        outcome: Outcome = request[OUTCOME_KEY]
        checked = self._check_headers(request, outcome)
        if isinstance(checked, web.Response):
            return unread(request, checked)
        account_id, heap_hash = checked
        read = await self._read_and_examine(request, outcome, account_id, heap_hash)
        if isinstance(read, web.Response):
            return read
        received, examined = read
        if examined.problem is not None:
            return self._forbidden(outcome, examined.problem)
        if examined.errors is not None:
            return await self._invalid(received, examined.errors)
        return await self._accept(received, examined)

    def _check_headers(self, request: web.Request,
                       outcome: Outcome) -> web.Response | tuple[str, signature.HeapHash]:
        """The account and parsed ``Heap-Hash``, or the answer refusing the request before a byte of its body is read.

        Without a well-formed Heap-Hash nothing can be accepted, so an unsigned body is never read, decoded or hashed.
        """
        account_id = request.match_info["account_id"]
        if self.accounts.get(account_id) is None:
            outcome.reason = "unknown account"
            return json_error(404, "Unknown account")
        outcome.account = account_id
        if not is_json_content_type(request):
            outcome.reason = "unsupported content type"
            return json_error(415, "Content-Type must be application/json",
                              content_type=printable(request.headers.get("Content-Type", ""))[:100])
        try:
            heap_hash = signature.parse_heap_hash(request.headers.get("Heap-Hash"))
        except signature.SignatureError as exc:
            return self._forbidden(outcome, exc.problem)
        if not signature.decode_signature(heap_hash.signature):
            # no secret can make this: the answer a wrong signature gets, without reading the body
            return self._forbidden(outcome, signature.SignatureProblem.MISMATCH)
        content_encoding = request.headers.get("Content-Encoding")
        if content_encoding is not None:
            try:
                body_decoder(content_encoding)
            except UnsupportedEncoding as exc:
                outcome.reason = "unsupported content encoding"
                return json_error(415, "Content-Encoding must be gzip, deflate or identity",
                                  content_encoding=printable(str(exc))[:50])
        return account_id, heap_hash

    async def _read_and_examine(self, request: web.Request, outcome: Outcome, account_id: str,
                                heap_hash: signature.HeapHash) -> web.Response | tuple[Received, Examined]:
        """Read the body in one of the body slots and check it, or the answer when that cannot be done."""
        request_id: str = request[REQUEST_ID_KEY]
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
            except (UnreadableBody, BodyTooLarge, TimeoutError) as exc:
                resp = self._unreadable(outcome, exc)
                resp.force_close()  # the rest of the body is not worth reading on this connection
                return resp
            metrics.BODY_BYTES.observe(len(body))
            received = Received(request, outcome, account_id, request_id, heap_hash,
                                datetime.now(timezone.utc), body)
            args = (heap_hash, body, self._secrets[account_id], int(time.time() * 1000), self.window)
            if len(body) > OFFLOAD_BYTES:
                # hashing releases the GIL and the loop gets its turns meanwhile: a huge page
                # does not stall every other request (and /healthz) for the length of its parse
                examined = await asyncio.get_running_loop().run_in_executor(None, examine_signed, *args)
            else:
                examined = examine_signed(*args)
        finally:
            slots.release()
        return received, examined

    def _unreadable(self, outcome: Outcome, exc: UnreadableBody | BodyTooLarge | TimeoutError) -> web.Response:
        """The answer to a body that could not be read: 400, 413 or 408."""
        if isinstance(exc, UnreadableBody):
            outcome.reason = "unreadable body"
            return json_error(400, "Unreadable body", reason=str(exc))
        if isinstance(exc, BodyTooLarge):
            outcome.reason = "body too large"
            extra: dict[str, Any] = {"limit_bytes": exc.limit}
            if exc.counted == "compressed":
                extra["counted"] = "compressed"
            return json_error(413, "Body too large", **extra)
        outcome.reason = "body not received in time"
        return json_error(408, "Body not received in time",
                          timeout_seconds=self.settings.ingest_body_read_timeout_seconds)

    async def _accept(self, received: Received, examined: Examined) -> web.Response:
        """A signed, valid request: its page to the pages topic; an unknown action type kept, acknowledged."""
        action = examined.action
        assert action is not None
        payload = examined.payload
        if payload is None:
            # never dropped: kept where someone can look, and acknowledged so Heap does not retry forever
            reason = f"unsupported action_type {action[:100]!r}"
            await self._keep(received, reason, [], "unsupported_action")
            return json_response(200, {"status": "kept", "reason": "unsupported action_type",
                                       "request_id": received.request_id})

        # a drain is named by what is signed, so the same signed drain posted again is a repeat (issue 16 #3)
        body = received.body
        digest = signed_digest(received.heap_hash.ts, body) if isinstance(payload, HeapDrain) else None
        value = page_record_bytes(received.account_id, received.request_id, received.received_at, body, digest)
        await self._produce("pages", self.topics.pages, value, record_key(received.account_id, payload.data.segment.id))
        if isinstance(payload, HeapSync):
            if payload.data.add:
                self._ids_add.inc(len(payload.data.add))
            if payload.data.remove:
                self._ids_remove.inc(len(payload.data.remove))
        received.outcome.reason = action
        return json_response(200, {"status": "accepted", "request_id": received.request_id})

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
        if problem.is_timestamp:
            extra["max_age_seconds"] = self.settings.signature_max_age_seconds
            extra["max_future_seconds"] = self.settings.signature_max_future_seconds
        return json_error(403, "Invalid signature", **extra)

    async def _invalid(self, received: Received, errors: list[dict[str, Any]]) -> web.Response:
        await self._keep(received, "invalid payload", errors, "invalid_payload")
        return json_error(400, "Invalid payload", errors=errors, request_id=received.request_id)

    async def _keep(self, received: Received, reason: str, errors: list[dict[str, Any]], kind: str) -> None:
        """Keep the raw request in the rejected topic, so it can be inspected and re-driven after a fix.

        If even this fails, ``Unavailable`` makes the answer 503 so that Heap retries: nothing is lost.
        """
        received.outcome.reason = reason
        value = rejected_record_bytes(received.account_id, received.request_id, received.received_at, reason, errors,
                                      safe_headers(received.request.headers), received.body)
        await self._produce("rejected", self.topics.rejected, value, received.account_id.encode())
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
