"""Serves import files to Cordial at expiring, HMAC-signed URLs.

Cordial's contact import fetches its CSV from a URL we give it. The sink keeps the
file in memory and serves it at ``/imports/<token>.csv?expires=<epoch>&sig=<hmac>``;
the signature covers path and expiry, so a URL cannot be guessed, altered or used
after it expires. Files are withdrawn when their import finishes. Another host
(e.g. an object store with presigned URLs) can replace this behind the same
``publish``/``withdraw`` pair.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import time
from urllib.parse import urlencode

from aiohttp import web

log = logging.getLogger("heapsync.sink.files")


def sign(secret: bytes, path: str, expires: int) -> str:
    # surrogatepass: a request path decoded from odd bytes may hold lone surrogates; signing must not raise
    return hmac.new(secret, f"{path}\n{expires}".encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


SIG_FORMAT = re.compile(r"[0-9a-fA-F]{64}")
"""An HMAC-SHA256 in hex, nothing else (no spaces, no non-ASCII: ``hmac.compare_digest`` raises on those)."""
EXPIRES_FORMAT = re.compile(r"[0-9]{1,12}")
"""An epoch in ASCII digits only: ``int()`` would also take " 123 ", "+123", "1_796" and non-ASCII digits."""


def well_formed(expires: str, sig: str) -> bool:
    """Whether ``expires`` and ``sig`` have the only shape ``publish`` ever writes (checked before verifying)."""
    return EXPIRES_FORMAT.fullmatch(expires) is not None and SIG_FORMAT.fullmatch(sig) is not None


def verify(secret: bytes, path: str, expires: str, sig: str, now: float) -> bool:
    """Constant-time check of the signature, then of the expiry; False for any malformed value (never raises)."""
    if not well_formed(expires, sig):
        return False
    exp = int(expires)
    return hmac.compare_digest(sign(secret, path, exp), sig.lower()) and now <= exp


class SignedFileHost:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, public_url: str | None = None,
                 secret: bytes | None = None, ttl_seconds: float = 3600.0) -> None:
        self.host, self.port = host, port
        self.public_url = public_url.rstrip("/") if public_url else None
        self.secret = secret or secrets.token_bytes(32)
        self.ttl = ttl_seconds
        self.files: dict[str, tuple[bytes, float]] = {}
        self.fetches = 0
        self._runner: web.AppRunner | None = None
        self._starting = asyncio.Lock()

    async def start(self) -> None:
        async with self._starting:  # concurrent first imports must share one server
            if self._runner is None:
                await self._start()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/imports/{name}", self._serve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("import file server listening", extra={"host": self.host, "port": self.port})

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def base_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"

    async def publish(self, data: bytes, suffix: str = ".csv") -> tuple[str, str]:
        """Returns (token, signed URL)."""
        await self.start()
        token = secrets.token_urlsafe(18) + suffix
        expires = int(time.time() + self.ttl)
        self.files[token] = (data, expires)
        path = f"/imports/{token}"
        return token, f"{self.base_url}{path}?{urlencode({'expires': expires, 'sig': sign(self.secret, path, expires)})}"

    def withdraw(self, token: str) -> None:
        self.files.pop(token, None)

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        now = time.time()
        for token, (_, until) in list(self.files.items()):
            if until < now:
                del self.files[token]
        expires, sig = request.query.get("expires", ""), request.query.get("sig", "")
        if not well_formed(expires, sig):
            return web.json_response(
                {"error": "malformed URL: expires must be ASCII digits and sig 64 hex characters"}, status=400)
        if not verify(self.secret, request.path, expires, sig, now):
            return web.json_response({"error": "invalid or expired signature"}, status=403)
        found = self.files.get(request.match_info["name"])
        if found is None:
            return web.json_response({"error": "not found"}, status=404)
        self.fetches += 1
        return web.Response(body=found[0], content_type="text/csv")
