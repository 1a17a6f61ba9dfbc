"""An asyncio client for the part of Cordial's REST API v2 the sink uses.

One client per account: its own connection pool, Basic auth with the API key
as user name, a request-rate limit (aiolimiter) and bounded concurrency.
Retries of transient failures use tenacity; 429 waits what Cordial says.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import aiohttp
from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

from heapsync.settings import Account
from sinks.operations import Operation

log = logging.getLogger("heapsync.sink.cordial")


class CordialError(Exception):
    def __init__(self, status: int, body: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"Cordial answered {status}")
        self.status = status
        self.body = body[:2000]
        self.retry_after = retry_after

    @property
    def transient(self) -> bool:
        """Worth retrying: rate limit, server errors, and transport failures (status 0)."""
        return self.status in (0, 408, 429) or self.status >= 500

    @property
    def auth(self) -> bool:
        """Key revoked or IP not allowed: the account must pause, not drop work."""
        return self.status in (401, 403)


def retry_after_seconds(headers: Any) -> float | None:
    """Cordial sends ``Retry-After`` (seconds) and ``X-Rate-Limit-Reset`` on 429."""
    for name in ("Retry-After", "X-Rate-Limit-Reset"):
        value = headers.get(name)
        if value:
            try:
                return max(0.0, float(value))
            except ValueError:
                continue
    return None


class CordialClient:
    def __init__(self, account: Account, *, timeout_seconds: float = 30.0, max_retries: int = 8,
                 backoff_max_seconds: float = 60.0) -> None:
        self.account = account
        self.base_url = account.cordial_base_url
        self._auth = aiohttp.BasicAuth(account.api_key(), "")
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None
        self._limiter = AsyncLimiter(account.rate_limit_per_second, 1.0)
        self._concurrency = asyncio.Semaphore(account.max_concurrency)
        self._list_ids: dict[str, int] = {}
        self._list_locks: dict[str, asyncio.Lock] = {}
        self.max_retries = max_retries
        self.backoff_max = backoff_max_seconds

    async def __aenter__(self) -> CordialClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                auth=self._auth, timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=self.account.max_concurrency * 2),
                headers={"Accept": "application/json"},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _once(self, method: str, path: str, json: Any = None) -> tuple[int, Any]:
        async with self._concurrency:
            await self._limiter.acquire()
            try:
                async with self._http().request(method, f"{self.base_url}{path}", json=json) as resp:
                    text = await resp.text()
                    if resp.status == 429 or resp.status >= 400:
                        raise CordialError(resp.status, text, retry_after=retry_after_seconds(resp.headers))
                    try:
                        return resp.status, await resp.json(content_type=None) if text else None
                    except ValueError:
                        return resp.status, text
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise CordialError(0, f"{type(exc).__name__}: {exc}") from exc

    def _wait(self, state: Any) -> float:
        exc = state.outcome.exception()
        if isinstance(exc, CordialError) and exc.retry_after is not None:
            return exc.retry_after
        # exponential back-off with full jitter
        return random.uniform(0, min(self.backoff_max, 0.2 * 2 ** state.attempt_number))

    async def request(self, method: str, path: str, json: Any = None) -> tuple[int, Any]:
        """One call, retried while it fails transiently; raises ``CordialError`` after that."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(lambda e: isinstance(e, CordialError) and e.transient),
            stop=stop_after_attempt(self.max_retries + 1),
            wait=self._wait,
            reraise=True,
        ):
            with attempt:
                return await self._once(method, path, json)
        raise AssertionError("unreachable")

    async def ensure_list(self, name: str) -> int:
        """The list's id, creating it the first time; exactly once even under concurrency."""
        if name in self._list_ids:
            return self._list_ids[name]
        lock = self._list_locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name in self._list_ids:
                return self._list_ids[name]
            _, lists = await self.request("GET", "/accountlists")
            for lst in lists or []:
                self._list_ids[lst["name"]] = int(lst["id"])
            if name not in self._list_ids:
                try:
                    _, created = await self.request("POST", "/accountlists", {"name": name, "enhanced": True})
                    self._list_ids[name] = int(created["id"])
                except CordialError as exc:
                    if exc.status != 422:
                        raise
                    # created meanwhile by someone else: look it up again
                    _, lists = await self.request("GET", "/accountlists")
                    for lst in lists or []:
                        self._list_ids[lst["name"]] = int(lst["id"])
                    if name not in self._list_ids:
                        raise
            return self._list_ids[name]

    async def apply(self, op: Operation) -> None:
        list_id = await self.ensure_list(op.list_name)
        if op.kind == "clear":
            await self.request("PUT", f"/accountlists/{list_id}/clear")
        elif op.kind == "add":
            await self.request("POST", "/contacts", op.body(self.account))
        else:
            try:
                await self.request("PUT", f"/contacts/{op.contact_path()}", op.body(self.account))
            except CordialError as exc:
                if exc.status != 404:  # no such contact: it is not in the list either
                    raise
