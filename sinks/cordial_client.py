"""An asyncio client for the part of Cordial's REST API v2 the sink uses.

One client per account: its own connection pool, Basic auth with the API key as
user name (empty password), JSON bodies, timeouts, a request-rate limit
(aiolimiter) and bounded concurrency. How it answers Cordial:

- 429: wait what ``Retry-After`` (or ``X-Rate-Limit-Reset``) says, for every request
  of the account, then go on; not counted as a failure.
- ``X-Rate-Limit-Remaining`` at or below the low-water mark: hold new requests until
  the window resets, so the account rarely sees a 429 at all.
- 5xx, 408, timeouts, connection errors: retried (tenacity) with exponential back-off
  and equal jitter up to a cap; after ``max_retries`` the ``CordialError`` is raised.
- 401/403: the account *pauses* (:class:`AccountGate`): its requests wait while one
  probe per ``auth_probe_seconds`` checks the key; when it passes, they go on.
  Nothing is skipped; other accounts have their own client and keep flowing.
- Any other 4xx: raised at once (the caller dead-letters the operation).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any, Mapping

import aiohttp
from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from heapsync.settings import Account
from sinks import metrics
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
        """Worth retrying with back-off: server errors, request timeout, transport failures (status 0)."""
        return self.status in (0, 408) or self.status >= 500

    @property
    def rate_limited(self) -> bool:
        return self.status == 429

    @property
    def auth(self) -> bool:
        """Key revoked or IP not allowed: the account must pause, not drop work."""
        return self.status in (401, 403)


# -- pure rules -------------------------------------------------------------------


def reset_seconds(value: str | None, now: float) -> float | None:
    """``X-Rate-Limit-Reset`` as seconds from now.

    Cordial does not say whether it is seconds-until-reset or an epoch time: small
    values are read as seconds, large ones as epoch seconds (or milliseconds)."""
    if not value:
        return None
    try:
        v = float(value)
    except ValueError:
        return None
    if v > 1e12:
        v = v / 1000.0 - now
    elif v > 1e9:
        v = v - now
    return max(0.0, v)


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """How long a 429 asks us to wait: ``Retry-After`` (seconds or HTTP date), else ``X-Rate-Limit-Reset``."""
    now = time.time() if now is None else now
    value = headers.get("Retry-After")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            from email.utils import parsedate_to_datetime

            try:
                return max(0.0, parsedate_to_datetime(value).timestamp() - now)
            except (TypeError, ValueError):
                pass
    return reset_seconds(headers.get("X-Rate-Limit-Reset"), now)


def low_remaining_hold(headers: Mapping[str, str], low_water: int, now: float | None = None) -> float | None:
    """Seconds to hold new requests when the window is nearly used up, else None."""
    remaining = headers.get("X-Rate-Limit-Remaining")
    if remaining is None:
        return None
    try:
        left = int(float(remaining))
    except ValueError:
        return None
    if left > low_water:
        return None
    return reset_seconds(headers.get("X-Rate-Limit-Reset"), time.time() if now is None else now) or 0.0


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential back-off with equal jitter: half the step fixed, half random, capped.

    attempt 1 waits base/2..base, attempt 2 base..2*base, ... never more than ``cap``.
    The fixed half gives a known minimum total wait before an operation is dead-lettered."""
    step = min(cap, base * 2 ** (attempt - 1))
    return step / 2 + (rng or random).uniform(0, step / 2)


# -- per-account gate -------------------------------------------------------------


class AccountGate:
    """Holds an account's requests while it is paused (auth) or told to wait (rate limit)."""

    def __init__(self, account_id: str) -> None:
        self.account_id = account_id
        self._open = asyncio.Event()
        self._open.set()
        self.hold_until = 0.0
        self.paused_reason: str | None = None

    @property
    def paused(self) -> bool:
        return not self._open.is_set()

    def hold(self, seconds: float) -> None:
        self.hold_until = max(self.hold_until, time.monotonic() + seconds)

    def pause(self, reason: str) -> bool:
        """Returns True when this call paused it (the caller starts the probe)."""
        if self.paused:
            return False
        self._open.clear()
        self.paused_reason = reason
        metrics.PAUSED.labels(self.account_id).set(1)
        return True

    def resume(self) -> None:
        self.paused_reason = None
        self._open.set()
        metrics.PAUSED.labels(self.account_id).set(0)

    async def wait(self) -> None:
        while True:
            if not self._open.is_set():
                await self._open.wait()
                continue
            delay = self.hold_until - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            return


class CordialClient:
    def __init__(self, account: Account, *, timeout_seconds: float = 30.0, max_retries: int = 8,
                 backoff_base_seconds: float = 0.5, backoff_max_seconds: float = 60.0,
                 auth_probe_seconds: float = 30.0, low_water: int = -1) -> None:
        self.account = account
        self.base_url = account.cordial_base_url
        self._auth = aiohttp.BasicAuth(account.api_key(), "")
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None
        # a short period keeps bursts small (a tenth of a second's worth), so a fixed window on
        # Cordial's side is not overrun at its edges
        period = max(0.1, 1.0 / account.rate_limit_per_second)
        self._limiter = AsyncLimiter(account.rate_limit_per_second * period, period)
        self._concurrency = asyncio.Semaphore(account.max_concurrency)
        self._list_ids: dict[str, int] = {}
        self._list_locks: dict[str, asyncio.Lock] = {}
        self.gate = AccountGate(account.id)
        self.max_retries = max_retries
        self.backoff_base = backoff_base_seconds
        self.backoff_max = backoff_max_seconds
        self.auth_probe_seconds = auth_probe_seconds
        self.low_water = account.max_concurrency if low_water < 0 else low_water
        self._probe: asyncio.Task[None] | None = None
        self.lists_created = 0
        self._request_counters: dict[tuple[str, int], Any] = {}
        self._healthy = asyncio.Event()  # unset while the account's calls fail transiently
        self._healthy.set()

    async def __aenter__(self) -> CordialClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                auth=self._auth, timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=self.account.max_concurrency * 2, keepalive_timeout=30),
                headers={"Accept": "application/json"},
            )
        return self._session

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        if self._session is not None:
            await self._session.close()

    async def _send(self, method: str, path: str, json: Any = None) -> tuple[int, Any]:
        """One HTTP exchange; raises ``CordialError`` for any status >= 400 and transport failures."""
        status = 0
        try:
            async with self._http().request(method, f"{self.base_url}{path}", json=json) as resp:
                status = resp.status
                text = await resp.text()
                hold = low_remaining_hold(resp.headers, self.low_water)
                if hold is not None and status != 429:
                    metrics.RATE_HOLDS.labels(self.account.id).inc()
                    self.gate.hold(hold)
                if status >= 500 or status == 408:
                    self._failing()
                elif not self._healthy.is_set():
                    self._healthy.set()
                if status >= 400:
                    raise CordialError(status, text, retry_after=retry_after_seconds(resp.headers)
                                       if status == 429 else None)
                try:
                    return status, (await resp.json(content_type=None)) if text else None
                except ValueError:
                    return status, text
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self._failing()
            raise CordialError(0, f"{type(exc).__name__}: {exc}") from exc
        finally:
            counter = self._request_counters.get((method, status))
            if counter is None:
                counter = self._request_counters[(method, status)] = metrics.REQUESTS.labels(
                    self.account.id, method, str(status))
            counter.inc()

    def _failing(self) -> None:
        if self._healthy.is_set():  # a new failing spell: sleepers wait for its end
            self._healthy = asyncio.Event()

    async def _once(self, method: str, path: str, json: Any = None, *, pause_on_auth: bool = True) -> tuple[int, Any]:
        """One attempt as the caller sees it: waits out 429s and auth pauses, raises anything else."""
        while True:
            await self.gate.wait()
            async with self._concurrency:
                await self.gate.wait()
                await self._limiter.acquire()
                try:
                    return await self._send(method, path, json)
                except CordialError as exc:
                    if exc.rate_limited:
                        metrics.RATE_LIMITED.labels(self.account.id).inc()
                        self.gate.hold(exc.retry_after if exc.retry_after is not None else 1.0)
                        continue
                    if exc.auth and pause_on_auth:
                        self._pause(exc)
                        continue
                    raise

    def _pause(self, exc: CordialError) -> None:
        if self.gate.pause(f"HTTP {exc.status}"):
            log.error("Cordial refused the account's key; account paused, nothing skipped",
                      extra={"account": self.account.id, "status": exc.status})
            self._probe = asyncio.create_task(self._probe_until_accepted())

    async def _probe_until_accepted(self) -> None:
        while True:
            await asyncio.sleep(self.auth_probe_seconds)
            try:
                await self._send("GET", "/accountlists")
            except CordialError as exc:
                if exc.auth or exc.transient or exc.rate_limited:
                    continue
            log.warning("Cordial accepts the account's key again; account resumed",
                        extra={"account": self.account.id})
            self.gate.resume()
            return

    def _wait(self, state: RetryCallState) -> float:
        return backoff_delay(state.attempt_number + 1, self.backoff_base, self.backoff_max)

    async def _sleep(self, delay: float) -> None:
        """Back off; but once Cordial answers this account again (after an outage), stop waiting:
        retries then go out spread over a moment, still through the rate limiter, instead of
        stragglers holding their chunk for up to ``backoff_max``."""
        healthy = self._healthy
        if healthy.is_set():  # others succeed meanwhile: a passing error, not an outage
            await asyncio.sleep(min(delay, random.uniform(0, self.backoff_base)))
            return
        try:
            await asyncio.wait_for(healthy.wait(), delay)
        except asyncio.TimeoutError:
            return
        await asyncio.sleep(random.uniform(0, self.backoff_base))

    def _before_sleep(self, state: RetryCallState) -> None:
        metrics.RETRIES.labels(self.account.id).inc()

    async def request(self, method: str, path: str, json: Any = None, *, pause_on_auth: bool = True) -> tuple[int, Any]:
        """One call, retried while it fails transiently; raises ``CordialError`` after that."""
        try:  # fast path: most calls succeed first time, so the retry machinery is built only when needed
            return await self._once(method, path, json, pause_on_auth=pause_on_auth)
        except CordialError as exc:
            if not exc.transient or self.max_retries == 0:
                raise
            metrics.RETRIES.labels(self.account.id).inc()
            await self._sleep(backoff_delay(1, self.backoff_base, self.backoff_max))
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(lambda e: isinstance(e, CordialError) and e.transient),
            stop=stop_after_attempt(self.max_retries),  # the first attempt was the fast path
            wait=self._wait,
            before_sleep=self._before_sleep,
            sleep=self._sleep,
            reraise=True,
        ):
            with attempt:
                return await self._once(method, path, json, pause_on_auth=pause_on_auth)
        raise AssertionError("unreachable")

    # -- lists and contacts ---------------------------------------------------------

    async def _refresh_lists(self) -> None:
        _, lists = await self.request("GET", "/accountlists")
        for lst in lists or []:
            if isinstance(lst, dict) and "name" in lst and "id" in lst:
                self._list_ids[lst["name"]] = int(lst["id"])

    async def ensure_list(self, name: str) -> int:
        """The list's id, creating it the first time; exactly once even under concurrency."""
        if name in self._list_ids:
            return self._list_ids[name]
        lock = self._list_locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name in self._list_ids:
                return self._list_ids[name]
            await self._refresh_lists()
            if name not in self._list_ids:
                try:
                    _, created = await self.request("POST", "/accountlists", {"name": name, "enhanced": True})
                    self._list_ids[name] = int(created["id"])
                    self.lists_created += 1
                    log.info("Cordial list created", extra={"account": self.account.id, "list_name": name})
                except CordialError as exc:
                    if exc.status not in (400, 409, 422):
                        raise
                    # created meanwhile by another process: look it up again
                    await self._refresh_lists()
                    if name not in self._list_ids:
                        raise
            return self._list_ids[name]

    async def apply(self, op: Operation) -> str:
        """Apply one operation; returns ``applied`` or ``missing`` (remove of an unknown contact)."""
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
                return "missing"
        return "applied"
