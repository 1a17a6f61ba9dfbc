"""A local stand-in for Cordial's REST API v2, for tests, benchmarks and the demo.

It implements what the sink calls, with Cordial's documented behaviour: Basic
auth (API key as user name), unique list names, contact upsert, 404 on a
missing contact, 422 on an invalid email, per-key rate limits answering 429
with ``Retry-After`` and ``X-Rate-Limit-*`` headers, and contact imports that
fetch a CSV from the given URL and run as jobs (Scheduled, Pending, Processing,
Done/Failed, with inserted/updated/rejected counts). Latency, an error rate,
outage windows and import duration are configurable so failure handling can be
exercised.

Its state is readable at ``GET /_sim/state`` (counts) and ``GET /_sim/lists``
(members per list), and steerable at ``POST /_sim/config`` (latency, error rate,
rate limit, ``revoke``/``restore`` keys) and ``POST /_sim/outage`` (``{"seconds": n}``).
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import random
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import aiohttp
from aiohttp import web

SIM_PREFIX = "/_sim"


@dataclass
class SimConfig:
    latency_seconds: float = 0.0
    error_rate: float = 0.0
    rate_limit_per_second: float | None = None  # per API key; None = unlimited
    seed: int | None = None
    outages: list[tuple[float, float]] = field(default_factory=list)  # (start, seconds) after the simulator starts
    import_step_seconds: float = 0.2  # time spent in each of Scheduled, Pending, Processing


def valid_email(value: Any) -> bool:
    if not isinstance(value, str) or value.count("@") != 1:
        return False
    local, domain = value.split("@")
    return bool(local) and "." in domain and not domain.startswith(".") and not domain.endswith(".") \
        and not any(c.isspace() for c in value)


@dataclass
class Tenant:
    """One Cordial account, reached with one API key."""

    lists: dict[int, dict[str, Any]] = field(default_factory=dict)
    contacts: dict[str, dict[str, Any]] = field(default_factory=dict)  # "email:a@b" or "key:value" -> attrs
    member_sets: dict[str, set[str]] = field(default_factory=dict)  # list name -> contact refs with True
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    next_list_id: int = 1
    requests: int = 0
    lists_created: int = 0

    def list_by_name(self, name: str) -> dict[str, Any] | None:
        return next((lst for lst in self.lists.values() if lst["name"] == name), None)

    def set_attr(self, ref: str, contact: dict[str, Any], name: str, value: Any) -> None:
        contact[name] = value
        if isinstance(value, bool):
            members = self.member_sets.setdefault(name, set())
            if value:
                members.add(ref)
            else:
                members.discard(ref)

    def members(self, name: str) -> list[str]:
        return sorted(ref.split(":", 1)[1] for ref in self.member_sets.get(name, ()))


TENANT: Any = web.RequestKey("tenant", Tenant) if hasattr(web, "RequestKey") else "tenant"


LABEL: Any = web.RequestKey("label", str) if hasattr(web, "RequestKey") else "label"


class _Bucket:
    """Fixed one-second windows, like Cordial's per-period limit."""

    def __init__(self) -> None:
        self.window = 0
        self.count = 0

    def take(self, limit: float) -> tuple[bool, int, float]:
        now = time.monotonic()
        window = int(now)
        if window != self.window:
            self.window, self.count = window, 0
        self.count += 1
        remaining = max(0, int(limit) - self.count)
        reset = window + 1 - now
        return self.count <= limit, remaining, reset


def _error(status: int, message: str, key: str) -> web.Response:
    return web.json_response({"error": True, "message": message, "messages": message, "key": key}, status=status)


def _ref(key: str, value: str) -> str:
    return f"{key}:{value.lower() if key == 'email' else value}"


class CordialSimulator:
    def __init__(self, api_keys: dict[str, str], config: SimConfig | None = None) -> None:
        """``api_keys`` maps a label (shown in the state views) to an API key."""
        self.labels = {key: label for label, key in api_keys.items()}
        self.tenants: dict[str, Tenant] = {key: Tenant() for key in api_keys.values()}
        self.revoked: set[str] = set()
        self.config = config or SimConfig()
        self.started = time.monotonic()
        self.outage_until = 0.0
        self.buckets: dict[str, _Bucket] = {}
        self.rng = random.Random(self.config.seed)
        self.total_requests = 0
        self.rate_limited = 0
        self.outage_answers = 0
        self.status_counts: dict[str, int] = {}
        self.request_log: deque[tuple[float, str, int]] = deque(maxlen=200_000)  # (monotonic, label, status)
        self._tasks: set[asyncio.Task[None]] = set()
        self._fetcher: aiohttp.ClientSession | None = None

    # -- plumbing ----------------------------------------------------------

    def in_outage(self) -> bool:
        now = time.monotonic()
        if now < self.outage_until:
            return True
        since = now - self.started
        return any(start <= since < start + seconds for start, seconds in self.config.outages)

    def _tenant(self, request: web.Request) -> tuple[str, Tenant] | web.Response:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Basic "):
            return _error(401, "Authentication required", "UNAUTHORIZED")
        try:
            user = base64.b64decode(auth[6:]).decode().split(":", 1)[0]
        except (ValueError, UnicodeDecodeError):
            return _error(401, "Malformed authorization", "UNAUTHORIZED")
        if user in self.revoked:
            return _error(403, "API key not permitted", "FORBIDDEN")
        tenant = self.tenants.get(user)
        if tenant is None:
            return _error(401, "Invalid API key", "UNAUTHORIZED")
        return user, tenant

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith(SIM_PREFIX):
            return await handler(request)
        resp = await self._api(request, handler)
        self.status_counts[str(resp.status)] = self.status_counts.get(str(resp.status), 0) + 1
        self.request_log.append((time.monotonic(), request.get(LABEL, "?"), resp.status))
        return resp

    async def _api(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.total_requests += 1
        if self.config.latency_seconds:
            await asyncio.sleep(self.config.latency_seconds)
        if self.in_outage():
            self.outage_answers += 1
            return _error(503, "Service unavailable", "STORAGE_CONNECTION_ERROR")
        found = self._tenant(request)
        if isinstance(found, web.Response):
            return found
        key, tenant = found
        request[LABEL] = self.labels[key]
        limit = self.config.rate_limit_per_second
        headers: dict[str, str] = {}
        if limit:
            ok, remaining, reset = self.buckets.setdefault(key, _Bucket()).take(limit)
            headers = {"X-Rate-Limit-Limit": str(int(limit)), "X-Rate-Limit-Remaining": str(remaining),
                       "X-Rate-Limit-Reset": f"{reset:.3f}"}
            if not ok:
                self.rate_limited += 1
                resp = _error(429, "Too many requests", "RATE_LIMIT_EXCEEDED")
                resp.headers.update(headers)
                resp.headers["Retry-After"] = str(max(1, int(reset + 0.999)))
                return resp
        if self.config.error_rate and self.rng.random() < self.config.error_rate:
            return _error(503, "Temporary failure", "STORAGE_CONNECTION_ERROR")
        tenant.requests += 1
        request[TENANT] = tenant
        resp = await handler(request)
        resp.headers.update(headers)
        return resp

    @staticmethod
    async def _json(request: web.Request) -> dict[str, Any] | web.Response:
        if request.content_type != "application/json":
            return _error(415, "Content-Type must be application/json", "UNSUPPORTED_MEDIA_TYPE")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "Invalid JSON provided", "INVALID_JSON_PROVIDED")
        if not isinstance(body, dict):
            return _error(400, "Invalid JSON provided", "INVALID_JSON_PROVIDED")
        return body

    # -- lists -------------------------------------------------------------

    async def list_lists(self, request: web.Request) -> web.Response:
        tenant: Tenant = request[TENANT]
        return web.json_response(list(tenant.lists.values()))

    async def create_list(self, request: web.Request) -> web.Response:
        tenant: Tenant = request[TENANT]
        body = await self._json(request)
        if isinstance(body, web.Response):
            return body
        name = body.get("name")
        if not isinstance(name, str) or not name:
            return _error(422, "name is required", "VALIDATION_ERROR")
        if tenant.list_by_name(name) is not None:
            return _error(422, f"list name {name} already exists", "VALIDATION_ERROR")
        lst: dict[str, Any] = {"id": tenant.next_list_id, "name": name, "enhanced": bool(body.get("enhanced", False))}
        tenant.lists[tenant.next_list_id] = lst
        tenant.next_list_id += 1
        tenant.lists_created += 1
        return web.json_response({"success": True, "id": lst["id"]}, status=201)

    def _list(self, request: web.Request) -> dict[str, Any] | web.Response:
        tenant: Tenant = request[TENANT]
        try:
            lst = tenant.lists.get(int(request.match_info["list_id"]))
        except ValueError:
            lst = None
        return lst if lst is not None else _error(404, "record not found", "RECORD_NOT_FOUND")

    async def get_list(self, request: web.Request) -> web.Response:
        lst = self._list(request)
        return lst if isinstance(lst, web.Response) else web.json_response(lst)

    async def delete_list(self, request: web.Request) -> web.Response:
        lst = self._list(request)
        if isinstance(lst, web.Response):
            return lst
        tenant: Tenant = request[TENANT]
        del tenant.lists[lst["id"]]
        for c in tenant.contacts.values():
            c.pop(lst["name"], None)
        tenant.member_sets.pop(lst["name"], None)
        return web.json_response({"success": True})

    async def clear_list(self, request: web.Request) -> web.Response:
        lst = self._list(request)
        if isinstance(lst, web.Response):
            return lst
        tenant: Tenant = request[TENANT]
        for ref in list(tenant.member_sets.get(lst["name"], ())):
            tenant.set_attr(ref, tenant.contacts[ref], lst["name"], False)
        return web.json_response({"success": True})

    # -- contacts ----------------------------------------------------------

    @staticmethod
    def _check_attributes(tenant: Tenant, body: dict[str, Any], skip: set[str]) -> web.Response | None:
        for name, value in body.items():
            if name in skip or name in ("channels", "forceSubscribe"):
                continue
            if isinstance(value, bool) and tenant.list_by_name(name) is None:
                return _error(422, f"list {name} does not exist", "VALIDATION_ERROR")
        return None

    async def upsert_contact(self, request: web.Request) -> web.Response:
        tenant: Tenant = request[TENANT]
        body = await self._json(request)
        if isinstance(body, web.Response):
            return body
        email_channel = ((body.get("channels") or {}).get("email") or {})
        email = email_channel.get("address")
        if email is not None:
            if not valid_email(email):
                return _error(422, "channels.email.address is not a valid email", "VALIDATION_ERROR")
            ref, skip = _ref("email", email), set()
        else:
            keys = [k for k, v in body.items() if isinstance(v, str) and k != "subscribeStatus"]
            if not keys:
                return _error(422, "a contact identifier is required", "VALIDATION_ERROR")
            ref, skip = _ref(keys[0], body[keys[0]]), {keys[0]}
        problem = self._check_attributes(tenant, body, skip)
        if problem is not None:
            return problem
        created = ref not in tenant.contacts
        contact = tenant.contacts.setdefault(ref, {})
        if "subscribeStatus" in email_channel:
            contact["subscribeStatus"] = email_channel["subscribeStatus"]
        for name, value in body.items():
            if name not in skip and name != "channels":
                tenant.set_attr(ref, contact, name, value)
        return web.json_response({"success": True, "created": created}, status=200)

    async def update_contact(self, request: web.Request) -> web.Response:
        tenant: Tenant = request[TENANT]
        key, _, value = unquote(request.match_info["ref"]).partition(":")
        ref = _ref(key, value)
        contact = tenant.contacts.get(ref)
        if contact is None:
            return _error(404, "record not found", "RECORD_NOT_FOUND")
        body = await self._json(request)
        if isinstance(body, web.Response):
            return body
        problem = self._check_attributes(tenant, body, set())
        if problem is not None:
            return problem
        for name, v in body.items():
            if name != "channels":
                tenant.set_attr(ref, contact, name, v)
        return web.json_response({"success": True})

    async def get_contact(self, request: web.Request) -> web.Response:
        tenant: Tenant = request[TENANT]
        key, _, value = unquote(request.match_info["ref"]).partition(":")
        contact = tenant.contacts.get(_ref(key, value))
        if contact is None:
            return _error(404, "record not found", "RECORD_NOT_FOUND")
        return web.json_response(contact)

    # -- contact imports and jobs -------------------------------------------------

    async def create_import(self, request: web.Request) -> web.Response:
        tenant: Tenant = request[TENANT]
        body = await self._json(request)
        if isinstance(body, web.Response):
            return body
        source = body.get("source")
        url = source.get("url") if isinstance(source, dict) else None
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            return _error(422, "source.url is required (http or https)", "VALIDATION_ERROR")
        job_id = uuid.uuid4().hex[:24]
        job = {"_id": job_id, "name": "contactImport", "status": "Scheduled", "inserted": 0, "updated": 0,
               "rejected": 0, "errors": [], "subscribe": body.get("subscribe", True)}
        tenant.jobs[job_id] = job
        task = asyncio.create_task(self._run_import(tenant, job, url))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return web.json_response({"success": True, "jobID": job_id}, status=201)

    async def _run_import(self, tenant: Tenant, job: dict[str, Any], url: str) -> None:
        step = self.config.import_step_seconds
        try:
            await asyncio.sleep(step)
            job["status"] = "Pending"
            await asyncio.sleep(step)
            job["status"] = "Processing"
            if self._fetcher is None or self._fetcher.closed:
                self._fetcher = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
            async with self._fetcher.get(url) as resp:
                if resp.status != 200:
                    job.update(status="Failed", message=f"could not fetch the file: HTTP {resp.status}")
                    return
                text = await resp.text()
            await asyncio.sleep(step)
            self._import_rows(tenant, job, text)
        except (aiohttp.ClientError, asyncio.TimeoutError, UnicodeDecodeError) as exc:
            job.update(status="Failed", message=f"could not fetch the file: {type(exc).__name__}")

    def _import_rows(self, tenant: Tenant, job: dict[str, Any], text: str) -> None:
        rows = csv.reader(io.StringIO(text))
        header = next(rows, None)
        if not header:
            job.update(status="Failed", message="empty file")
            return
        ident, *columns = header
        missing = [c for c in columns if tenant.list_by_name(c) is None]
        if missing:
            job.update(status="Failed", message=f"unknown column(s): {', '.join(missing)}")
            return
        key = "email" if ident == "channels.email.address" else ident
        for n, row in enumerate(rows, start=2):
            if not row:
                continue
            value = row[0]
            if (key == "email" and not valid_email(value)) or not value or len(row) != len(header) \
                    or any(v not in ("0", "1") for v in row[1:]):
                job["rejected"] += 1
                if len(job["errors"]) < 1000:
                    job["errors"].append({"row": n, "value": value, "message": "invalid row"})
                continue
            ref = _ref(key, value)
            created = ref not in tenant.contacts
            contact = tenant.contacts.setdefault(ref, {})
            if created and job["subscribe"] is not False:
                contact["subscribeStatus"] = "subscribed"
            for name, v in zip(columns, row[1:]):
                tenant.set_attr(ref, contact, name, v == "1")
            job["inserted" if created else "updated"] += 1
        job["status"] = "Done"

    async def get_job(self, request: web.Request) -> web.Response:
        tenant: Tenant = request[TENANT]
        job = tenant.jobs.get(request.match_info["job_id"])
        if job is None:
            return _error(404, "record not found", "RECORD_NOT_FOUND")
        return web.json_response({k: v for k, v in job.items() if k != "subscribe"})

    # -- inspection and control (not part of Cordial's API) -----------------

    def snapshot(self) -> dict[str, dict[str, list[str]]]:
        """Members of every list, per account label (never the key itself)."""
        return {
            self.labels[key]: {lst["name"]: tenant.members(lst["name"]) for lst in tenant.lists.values()}
            for key, tenant in self.tenants.items()
        }

    def members(self, api_key: str, list_name: str) -> list[str]:
        return self.tenants[api_key].members(list_name)

    async def sim_lists(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot())

    async def sim_state(self, request: web.Request) -> web.Response:
        return web.json_response({
            "total_requests": self.total_requests,
            "rate_limited": self.rate_limited,
            "outage_answers": self.outage_answers,
            "status_counts": self.status_counts,
            "outage_remaining_seconds": max(0.0, self.outage_until - time.monotonic()),
            "in_outage": self.in_outage(),
            "config": {k: v for k, v in self.config.__dict__.items()},
            "accounts": {
                self.labels[key]: {
                    "requests": t.requests, "contacts": len(t.contacts), "lists_created": t.lists_created,
                    "revoked": key in self.revoked,
                    "lists": {lst["name"]: len(t.member_sets.get(lst["name"], ())) for lst in t.lists.values()},
                    "jobs": {s: sum(1 for j in t.jobs.values() if j["status"] == s)
                             for s in {j["status"] for j in t.jobs.values()}},
                }
                for key, t in self.tenants.items()
            },
        })

    async def sim_config(self, request: web.Request) -> web.Response:
        body = await request.json()
        for k in ("latency_seconds", "error_rate", "rate_limit_per_second", "import_step_seconds"):
            if k in body:
                setattr(self.config, k, body[k])
        by_label = {label: key for key, label in self.labels.items()}
        for name in body.get("revoke", []):
            self.revoked.add(by_label.get(name, name))
        for name in body.get("restore", []):
            self.revoked.discard(by_label.get(name, name))
        return web.json_response({k: v for k, v in self.config.__dict__.items()})

    async def sim_outage(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.outage_until = time.monotonic() + float(body.get("seconds", 30))
        return web.json_response({"outage_seconds": body.get("seconds", 30)})

    async def _on_cleanup(self, app: web.Application) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._fetcher is not None:
            await self._fetcher.close()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.middleware], client_max_size=64 * 1024 * 1024)
        app.on_cleanup.append(self._on_cleanup)
        r = app.router
        r.add_get("/v2/accountlists", self.list_lists)
        r.add_post("/v2/accountlists", self.create_list)
        r.add_get("/v2/accountlists/{list_id}", self.get_list)
        r.add_delete("/v2/accountlists/{list_id}", self.delete_list)
        r.add_put("/v2/accountlists/{list_id}/clear", self.clear_list)
        r.add_post("/v2/contacts", self.upsert_contact)
        r.add_put("/v2/contacts/{ref}", self.update_contact)
        r.add_get("/v2/contacts/{ref}", self.get_contact)
        r.add_post("/v2/contactimports", self.create_import)
        r.add_get("/v2/jobs/{job_id}", self.get_job)
        r.add_get(f"{SIM_PREFIX}/lists", self.sim_lists)
        r.add_get(f"{SIM_PREFIX}/state", self.sim_state)
        r.add_post(f"{SIM_PREFIX}/config", self.sim_config)
        r.add_post(f"{SIM_PREFIX}/outage", self.sim_outage)
        return app
