"""A local stand-in for Cordial's REST API v2, for tests, benchmarks and the demo.

It implements what the sink calls, with Cordial's documented behaviour: Basic
auth (API key as user name), unique list names, contact upsert, 404 on a
missing contact, 422 on an invalid email, and per-key rate limits answering 429
with ``Retry-After`` and ``X-Rate-Limit-*`` headers. Latency, an error rate and
outage windows are configurable so failure handling can be exercised.

Its state is readable at ``GET /_sim/state`` and ``GET /_sim/lists``
(members per list), and steerable at ``POST /_sim/config`` and ``POST /_sim/outage``.
"""

from __future__ import annotations

import asyncio
import base64
import random
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from aiohttp import web

SIM_PREFIX = "/_sim"


@dataclass
class SimConfig:
    latency_seconds: float = 0.0
    error_rate: float = 0.0
    rate_limit_per_second: float | None = None  # per API key; None = unlimited
    seed: int | None = None


@dataclass
class Tenant:
    """One Cordial account, reached with one API key."""

    lists: dict[int, dict[str, Any]] = field(default_factory=dict)
    contacts: dict[str, dict[str, Any]] = field(default_factory=dict)  # "email:a@b" or "key:value" -> attrs
    next_list_id: int = 1
    requests: int = 0

    def list_by_name(self, name: str) -> dict[str, Any] | None:
        return next((lst for lst in self.lists.values() if lst["name"] == name), None)

    def members(self, name: str) -> list[str]:
        return sorted(k.split(":", 1)[1] for k, c in self.contacts.items() if c.get(name) is True)


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


class CordialSimulator:
    def __init__(self, api_keys: dict[str, str], config: SimConfig | None = None) -> None:
        """``api_keys`` maps a label (shown in the state views) to an API key."""
        self.labels = {key: label for label, key in api_keys.items()}
        self.tenants: dict[str, Tenant] = {key: Tenant() for key in api_keys.values()}
        self.revoked: set[str] = set()
        self.config = config or SimConfig()
        self.outage_until = 0.0
        self.buckets: dict[str, _Bucket] = {}
        self.rng = random.Random(self.config.seed)
        self.total_requests = 0
        self.rate_limited = 0

    # -- plumbing ----------------------------------------------------------

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
        self.total_requests += 1
        if self.config.latency_seconds:
            await asyncio.sleep(self.config.latency_seconds)
        if time.monotonic() < self.outage_until:
            return _error(503, "Service unavailable", "STORAGE_CONNECTION_ERROR")
        found = self._tenant(request)
        if isinstance(found, web.Response):
            return found
        key, tenant = found
        limit = self.config.rate_limit_per_second
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
        request["tenant"] = tenant
        resp = await handler(request)
        if limit:
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
        tenant: Tenant = request["tenant"]
        return web.json_response(list(tenant.lists.values()))

    async def create_list(self, request: web.Request) -> web.Response:
        tenant: Tenant = request["tenant"]
        body = await self._json(request)
        if isinstance(body, web.Response):
            return body
        name = body.get("name")
        if not isinstance(name, str) or not name:
            return _error(422, "name is required", "VALIDATION_ERROR")
        if tenant.list_by_name(name) is not None:
            return _error(422, f"list name {name} already exists", "VALIDATION_ERROR")
        lst = {"id": tenant.next_list_id, "name": name, "enhanced": bool(body.get("enhanced", False))}
        tenant.lists[lst["id"]] = lst
        tenant.next_list_id += 1
        return web.json_response({"success": True, "id": lst["id"]}, status=201)

    def _list(self, request: web.Request) -> dict[str, Any] | web.Response:
        tenant: Tenant = request["tenant"]
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
        tenant: Tenant = request["tenant"]
        del tenant.lists[lst["id"]]
        for c in tenant.contacts.values():
            c.pop(lst["name"], None)
        return web.json_response({"success": True})

    async def clear_list(self, request: web.Request) -> web.Response:
        lst = self._list(request)
        if isinstance(lst, web.Response):
            return lst
        tenant: Tenant = request["tenant"]
        for c in tenant.contacts.values():
            if c.get(lst["name"]) is True:
                c[lst["name"]] = False
        return web.json_response({"success": True})

    # -- contacts ----------------------------------------------------------

    def _apply_attributes(self, tenant: Tenant, contact: dict[str, Any], body: dict[str, Any],
                          skip: set[str]) -> web.Response | None:
        for name, value in body.items():
            if name in skip or name == "channels":
                continue
            if isinstance(value, bool) and tenant.list_by_name(name) is None:
                return _error(422, f"list {name} does not exist", "VALIDATION_ERROR")
        for name, value in body.items():
            if name != "channels" and name not in skip:
                contact[name] = value
        return None

    async def upsert_contact(self, request: web.Request) -> web.Response:
        tenant: Tenant = request["tenant"]
        body = await self._json(request)
        if isinstance(body, web.Response):
            return body
        email = ((body.get("channels") or {}).get("email") or {}).get("address")
        if email is not None:
            if not isinstance(email, str) or "@" not in email or email.startswith("@") or email.endswith("@"):
                return _error(422, "channels.email.address is not a valid email", "VALIDATION_ERROR")
            ref, skip = f"email:{email.lower()}", set()
        else:
            keys = [k for k, v in body.items() if isinstance(v, str) and k != "subscribeStatus"]
            if not keys:
                return _error(422, "a contact identifier is required", "VALIDATION_ERROR")
            ref, skip = f"{keys[0]}:{body[keys[0]]}", {keys[0]}
        created = ref not in tenant.contacts
        contact = tenant.contacts.get(ref, {})
        problem = self._apply_attributes(tenant, contact, body, skip)
        if problem is not None:
            return problem
        tenant.contacts[ref] = contact
        return web.json_response({"success": True, "created": created}, status=200)

    async def update_contact(self, request: web.Request) -> web.Response:
        tenant: Tenant = request["tenant"]
        key, _, value = unquote(request.match_info["ref"]).partition(":")
        ref = f"{key}:{value.lower() if key == 'email' else value}"
        contact = tenant.contacts.get(ref)
        if contact is None:
            return _error(404, "record not found", "RECORD_NOT_FOUND")
        body = await self._json(request)
        if isinstance(body, web.Response):
            return body
        problem = self._apply_attributes(tenant, contact, body, set())
        return problem or web.json_response({"success": True})

    async def get_contact(self, request: web.Request) -> web.Response:
        tenant: Tenant = request["tenant"]
        key, _, value = unquote(request.match_info["ref"]).partition(":")
        contact = tenant.contacts.get(f"{key}:{value.lower() if key == 'email' else value}")
        if contact is None:
            return _error(404, "record not found", "RECORD_NOT_FOUND")
        return web.json_response(contact)

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
            "outage_remaining_seconds": max(0.0, self.outage_until - time.monotonic()),
            "config": self.config.__dict__,
            "accounts": {
                self.labels[key]: {"requests": t.requests, "contacts": len(t.contacts),
                                "lists": {lst["name"]: len(t.members(lst["name"])) for lst in t.lists.values()}}
                for key, t in self.tenants.items()
            },
        })

    async def sim_config(self, request: web.Request) -> web.Response:
        body = await request.json()
        for k in ("latency_seconds", "error_rate", "rate_limit_per_second"):
            if k in body:
                setattr(self.config, k, body[k])
        for key in body.get("revoke", []):
            self.revoked.add(key)
        for key in body.get("restore", []):
            self.revoked.discard(key)
        return web.json_response(self.config.__dict__)

    async def sim_outage(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.outage_until = time.monotonic() + float(body.get("seconds", 30))
        return web.json_response({"outage_seconds": body.get("seconds", 30)})

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.middleware])
        r = app.router
        r.add_get("/v2/accountlists", self.list_lists)
        r.add_post("/v2/accountlists", self.create_list)
        r.add_get("/v2/accountlists/{list_id}", self.get_list)
        r.add_delete("/v2/accountlists/{list_id}", self.delete_list)
        r.add_put("/v2/accountlists/{list_id}/clear", self.clear_list)
        r.add_post("/v2/contacts", self.upsert_contact)
        r.add_put("/v2/contacts/{ref}", self.update_contact)
        r.add_get("/v2/contacts/{ref}", self.get_contact)
        r.add_get(f"{SIM_PREFIX}/lists", self.sim_lists)
        r.add_get(f"{SIM_PREFIX}/state", self.sim_state)
        r.add_post(f"{SIM_PREFIX}/config", self.sim_config)
        r.add_post(f"{SIM_PREFIX}/outage", self.sim_outage)
        return app
