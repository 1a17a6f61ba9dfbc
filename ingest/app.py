"""The webhook receiver: verify, validate, hand to Kafka, and only then answer 200.

Order of checks: account (404) -> content type (415) -> body size (413) ->
signature (403, before any JSON parsing) -> payload (400, kept in the rejected
topic) -> produce (503 when Kafka does not ack in time) -> 200.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

import orjson
from aiohttp import web
from pydantic import ValidationError

from heapsync.contracts import KNOWN_ACTIONS, HeapDrain, HeapSync, PageRecord, RejectedRecord, parse_heap_payload
from heapsync.kafka import AsyncProducer, ProduceError
from heapsync.settings import Account, Settings
from ingest import signature

log = logging.getLogger("heapsync.ingest")

WEBHOOK_PATH = "/heap/listMembership/{account_id}"
_SECRET_HEADERS = frozenset({"heap-hash", "authorization", "cookie", "x-api-key"})

ACCOUNTS_KEY = web.AppKey("accounts", dict)
SETTINGS_KEY = web.AppKey("settings", Settings)
PRODUCER_KEY = web.AppKey("producer", AsyncProducer)


def json_error(status: int, error: str, **extra: Any) -> web.Response:
    return web.json_response({"error": error, **extra}, status=status, dumps=lambda o: orjson.dumps(o).decode())


def record_key(account: str, segment_id: str) -> bytes:
    """All pages and syncs of one segment go to one partition, in order."""
    return f"{account}:{segment_id}".encode()


def safe_headers(request: web.Request) -> dict[str, str]:
    return {k: v for k, v in request.headers.items() if k.lower() not in _SECRET_HEADERS}


def describe_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Field paths and messages, without echoing input values (they may be emails)."""
    return [
        {"path": ".".join(str(p) for p in e["loc"]) or "(body)", "message": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_input=False)
    ]


class Ingress:
    """Handlers bound to one producer and one set of accounts."""

    def __init__(self, settings: Settings, accounts: dict[str, Account], producer: AsyncProducer) -> None:
        self.settings = settings
        self.accounts = accounts
        self.producer = producer
        self.topics = settings.topics

    async def receive(self, request: web.Request) -> web.Response:
        request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        account_id = request.match_info["account_id"]
        account = self.accounts.get(account_id)
        if account is None:
            return json_error(404, "Unknown account", account=account_id)
        ctype = request.content_type
        if ctype not in ("application/json", "application/octet-stream") and not ctype.endswith("+json"):
            return json_error(415, "Content-Type must be application/json", content_type=ctype)
        if request.content_length is not None and request.content_length > self.settings.max_body_bytes:
            return json_error(413, "Body too large", limit_bytes=self.settings.max_body_bytes)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return json_error(413, "Body too large", limit_bytes=self.settings.max_body_bytes)

        try:
            heap_hash = signature.parse_heap_hash(request.headers.get("Heap-Hash"))
            signature.verify(
                heap_hash, body, account.secrets(),
                now_ms=int(time.time() * 1000),
                max_age_ms=int(self.settings.signature_max_age_seconds * 1000),
                max_future_ms=int(self.settings.signature_max_future_seconds * 1000),
            )
        except signature.SignatureError as exc:
            log.info("signature rejected", extra={"request_id": request_id, "account": account_id, "reason": exc.problem.name})
            if exc.problem is signature.SignatureProblem.STALE:
                return json_error(403, "Invalid signature", reason="stale timestamp")
            return json_error(403, "Invalid signature")

        received_at = datetime.now(timezone.utc)
        try:
            payload = parse_heap_payload(body)
        except ValidationError as exc:
            errors = describe_errors(exc)
            await self._reject(request, account_id, request_id, received_at, body, "invalid payload", errors)
            return json_error(400, "Invalid payload", errors=errors, request_id=request_id)

        if payload.action_type not in KNOWN_ACTIONS:
            await self._reject(request, account_id, request_id, received_at, body,
                               f"unsupported action_type {payload.action_type!r}", [])
            return web.json_response({"status": "kept", "reason": "unsupported action_type", "request_id": request_id})

        assert isinstance(payload, (HeapSync, HeapDrain))
        record = PageRecord(account=account_id, request_id=request_id, received_at=received_at,
                            payload=orjson.loads(body))
        try:
            msg = await asyncio.wait_for(
                self.producer.send(self.topics.pages, record.model_dump_json().encode(),
                                   key=record_key(account_id, payload.data.segment.id)),
                timeout=self.settings.produce_timeout_seconds,
            )
        except (ProduceError, asyncio.TimeoutError) as exc:
            reason = exc.reason if isinstance(exc, ProduceError) else "broker did not acknowledge in time"
            log.warning("produce failed", extra={"request_id": request_id, "account": account_id, "reason": reason})
            return self._unavailable(reason)
        log.info("page accepted", extra={
            "request_id": request_id, "account": account_id, "action": payload.action_type,
            "partition": msg.partition(), "offset": msg.offset(),
        })
        return web.json_response({"status": "accepted", "request_id": request_id})

    def _unavailable(self, reason: str) -> web.Response:
        resp = json_error(503, "Service unavailable", reason=reason)
        resp.headers["Retry-After"] = "5"
        return resp

    async def _reject(self, request: web.Request, account_id: str, request_id: str, received_at: datetime,
                      body: bytes, reason: str, errors: list[dict[str, Any]]) -> None:
        """Keep the raw request where someone can look at it and re-drive it.

        If even this fails, the caller answers 503 so that Heap retries: nothing is lost.
        """
        record = RejectedRecord(account=account_id, request_id=request_id, received_at=received_at,
                                reason=reason, errors=errors, headers=safe_headers(request),
                                body=body.decode("utf-8", errors="replace"))
        try:
            await asyncio.wait_for(
                self.producer.send(self.topics.rejected, record.model_dump_json().encode(), key=account_id.encode()),
                timeout=self.settings.produce_timeout_seconds,
            )
        except (ProduceError, asyncio.TimeoutError) as exc:
            raise web.HTTPServiceUnavailable(
                text=orjson.dumps({"error": "Service unavailable", "reason": "could not keep rejected request"}).decode(),
                content_type="application/json", headers={"Retry-After": "5"},
            ) from exc
        log.info("request rejected", extra={"request_id": request_id, "account": account_id, "reason": reason})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        try:
            present = await asyncio.get_running_loop().run_in_executor(None, self.producer.list_topics, 2.0)
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            return json_error(503, "Broker unreachable", reason=str(exc))
        missing = [t for t in (self.topics.pages, self.topics.rejected) if t not in present]
        if missing:
            return json_error(503, "Topics missing", missing=missing)
        return web.json_response({"status": "ready"})


@web.middleware
async def json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every error is a JSON body; nothing a client sends becomes a 500 page."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json":
            raise
        if isinstance(exc, web.HTTPMethodNotAllowed):
            return json_error(405, "Method not allowed", allowed=sorted(exc.allowed_methods))
        return json_error(exc.status, exc.reason)
    except Exception:  # noqa: BLE001
        log.exception("unhandled error", extra={"path": request.path})
        return json_error(500, "Internal error")


def create_app(settings: Settings, accounts: dict[str, Account], producer: AsyncProducer) -> web.Application:
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[json_errors])
    ingress = Ingress(settings, accounts, producer)
    app.router.add_post(WEBHOOK_PATH, ingress.receive)
    app.router.add_get("/healthz", ingress.healthz)
    app.router.add_get("/readyz", ingress.readyz)
    __import__("ingest.status_page").status_page.add_status_routes(app, settings)  # ops: read-only /status
    return app
