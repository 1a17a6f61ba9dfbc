"""The archive sink: every delta chunk as one JSON line, in files rotated by time and size.

For audits and warehouse loads. Files live under ``<dir>/dt=YYYY-MM-DD/`` (the
date a file was opened, UTC) and are named
``deltas-<opened at>-<host>-<pid>-<seq>.jsonl``, so replicas sharing a directory
never write the same file.

Durability, "atomic enough for audits":
- a file being written is ``*.jsonl.part``; each chunk's line is written, flushed and
  fsynced before ``apply`` returns, and only then is the Kafka offset committed;
- rotation fsyncs and closes the file, renames it to ``*.jsonl`` and fsyncs the
  directory: a reader that only takes ``*.jsonl`` never sees a half-written file;
- after a crash, a left-over ``.part`` is cut back to its last complete line and
  renamed at start.

Delivery is at-least-once: a chunk may appear twice (a crash between fsync and
commit, or a replay). Every line is a Delta (schema ``heapsync/schemas/delta.v1.json``):
readers de-duplicate on ``(delta_id, chunk, replay_id)``, the chunk key.
Each archived chunk is recorded on the sink progress topic as sink ``archive`` by the runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from prometheus_client import Counter

from heapsync.contracts import Delta
from heapsync.settings import Settings
from sinks.protocol import DeadLetters
from sinks.runner import SinkRunner, make_runner

log = logging.getLogger("heapsync.sink.archive")

LINES = Counter("heapsync_sink_archive_lines_total", "Delta chunks written to archive files.")
BYTES = Counter("heapsync_sink_archive_bytes_total", "Bytes written to archive files.")
FILES = Counter("heapsync_sink_archive_files_total", "Archive files completed (renamed to .jsonl).")

PART = ".part"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover_partial(path: Path) -> Path | None:
    """Finish a ``.part`` file left by a crash: keep complete lines only, then rename it."""
    data = path.read_bytes()
    keep = data[: data.rfind(b"\n") + 1]
    final = path.with_name(path.name[: -len(PART)])
    if not keep:
        path.unlink()
        return None
    if len(keep) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(keep))
            f.flush()
            os.fsync(f.fileno())
    os.replace(path, final)
    _fsync_dir(path.parent)
    return final


class ArchiveWriter:
    """Appends lines to the current file and rotates it; synchronous, so it is tested directly."""

    def __init__(self, directory: Path, *, max_bytes: int, max_seconds: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds
        self.clock = clock
        self._file: IO[bytes] | None = None
        self._path: Path | None = None
        self._opened_at = 0.0
        self._size = 0
        self._seq = 0
        self._tag = f"{socket.gethostname()}-{os.getpid()}"
        self.completed: list[Path] = []

    def recover(self) -> list[Path]:
        """Complete every ``.part`` file under the directory (from an earlier, crashed run)."""
        done = []
        for part in sorted(self.directory.glob(f"dt=*/*.jsonl{PART}")):
            final = recover_partial(part)
            if final is not None:
                done.append(final)
                log.warning("completed an archive file left by a crash", extra={"file": final.name})
        return done

    def _open(self) -> None:
        now = self.clock()
        opened = datetime.fromtimestamp(now, timezone.utc)
        folder = self.directory / f"dt={opened:%Y-%m-%d}"
        folder.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        self._path = folder / f"deltas-{opened:%Y%m%dT%H%M%S}-{self._tag}-{self._seq:05d}.jsonl{PART}"
        self._file = open(self._path, "xb")
        self._opened_at = now
        self._size = 0

    def due(self) -> bool:
        return self._file is not None and (
            self._size >= self.max_bytes or self.clock() - self._opened_at >= self.max_seconds)

    def write(self, line: bytes) -> None:
        """Append one line durably (fsync) before returning."""
        if self.due():
            self.rotate()
        if self._file is None:
            self._open()
        assert self._file is not None
        data = line.rstrip(b"\n") + b"\n"
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._size += len(data)
        LINES.inc()
        BYTES.inc(len(data))

    def rotate(self) -> Path | None:
        """Close the current file and publish it under its final name."""
        if self._file is None or self._path is None:
            return None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self._path.with_name(self._path.name[: -len(PART)])
        os.replace(self._path, final)
        _fsync_dir(final.parent)
        self._file, self._path = None, None
        self.completed.append(final)
        FILES.inc()
        log.info("archive file completed", extra={"file": final.name, "bytes": self._size})
        return final

    def close(self) -> None:
        self.rotate()


class ArchiveSink:
    """A :class:`sinks.protocol.DeltaSink` writing every chunk to JSON Lines files."""

    name = "archive"

    def __init__(self, settings: Settings, dead_letters: DeadLetters, directory: Path | None = None) -> None:
        self.settings = settings
        self.dead_letters = dead_letters
        self.writer = ArchiveWriter(directory or settings.archive_dir, max_bytes=settings.archive_max_bytes,
                                    max_seconds=settings.archive_max_seconds)
        self._rotator: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.writer.directory.mkdir(parents=True, exist_ok=True)
        self.writer.recover()
        self._rotator = asyncio.create_task(self._rotate_when_due())

    async def _rotate_when_due(self) -> None:
        """Time-based rotation must also happen when no delta arrives."""
        every = max(0.2, min(self.settings.archive_max_seconds / 4, 30.0))
        while True:
            await asyncio.sleep(every)
            if self.writer.due():
                self.writer.rotate()

    async def apply(self, delta: Delta) -> None:
        # The runner records the chunk on the progress topic once this returns.
        self.writer.write(delta.model_dump_json().encode())

    async def close(self) -> None:
        if self._rotator is not None:
            self._rotator.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rotator
        self.writer.close()


def build_runner(settings: Settings, directory: Path | None = None) -> SinkRunner:
    return make_runner(lambda dl: ArchiveSink(settings, dl, directory), settings, group=settings.archive_group)
