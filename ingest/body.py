"""Reading a request body within limits: size as sent and as decoded, encoding, and no trailing data.

``BodyDecoder`` is pure (chunks in, bytes or a clear error out); ``read_body`` feeds it from an aiohttp
request. The handler (``ingest/app.py``) turns the errors into 400, 413 and 415 answers.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError


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
