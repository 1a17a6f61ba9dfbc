"""A small read-only status page for the ingress: ``GET /status`` (HTML) and ``GET /status.json``.

Shows recent syncs per account and list (chunks applied per sink, adds, removes,
whether complete; a delta an operator discarded with ``heapsync held discard`` says
discarded, never applied) and recent failures, from the sink progress topic and the
three dead-letter topics. A background task tails those topics (no consumer
group, nothing committed); it starts with the first request to the page, so an
ingress nobody looks at pays nothing. No user ids are shown: counts, names and
reasons only.

:class:`StatusBoard` (the aggregation) and :func:`render_html` are pure.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

import orjson
from aiohttp import web

from heapsync.contracts import (
    AnyDeadLetter,
    AppliedChunk,
    DeadLetterSource,
    SinkDeadLetter,
    decode_json,
    read_dead_letter,
    read_mark,
)
from heapsync.held import ListsState
from heapsync.settings import Account, Settings, disabled_segments
from heapsync.topic_reader import Record, TopicFollower
from heapsync_ops.metrics import OpsView, attach
from ingest.app import SCRAPE_HOOKS

log = logging.getLogger("heapsync.status_page")

BOARD_KEY = web.AppKey("status_board", object)


@dataclass
class SyncView:
    account: str
    list_name: str
    delta_id: str
    sync_task_id: str | None
    replay_id: str | None
    kind: str = "sync"
    chunks: int = 1
    complete: bool = True
    applied: dict[str, set[int]] = field(default_factory=dict)  # sink -> chunk numbers
    discarded: dict[str, set[int]] = field(default_factory=dict)  # sink -> chunk numbers discarded, never sent
    chunk_counts: dict[int, tuple[int, int]] = field(default_factory=dict)  # chunk -> (adds, removes)
    dead_lettered: int = 0
    failures: int = 0
    last_at: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "account": self.account, "list_name": self.list_name, "delta_id": self.delta_id,
            "sync_task_id": self.sync_task_id, "replay_id": self.replay_id, "kind": self.kind,
            "chunks": self.chunks, "complete": self.complete,
            "applied": {s: len(c) for s, c in sorted(self.applied.items())},
            "discarded": {s: len(c) for s, c in sorted(self.discarded.items())},
            "adds": sum(a for a, _ in self.chunk_counts.values()),
            "removes": sum(r for _, r in self.chunk_counts.values()),
            "dead_lettered": self.dead_lettered + self.failures, "last_at": self.last_at,
        }


class StatusBoard:
    """Recent syncs per list and recent failures, fed record by record."""

    def __init__(self, recent: int = 20, failures: int = 50) -> None:
        self.recent = recent
        self.lists: dict[tuple[str, str], OrderedDict[str, SyncView]] = {}
        self.failures: deque[dict[str, Any]] = deque(maxlen=failures)
        self.failure_counts: dict[str, int] = {}
        self.records = 0
        self.held: dict[str, ListsState] = {}  # per sink: deltas held by the removal rail (heapsync/held.py)

    def on_lists(self, key: bytes | None, value: bytes | None) -> None:
        """One record of the sinks' lists topic (counts, held chunks, decisions; a tombstone deletes)."""
        if key is None:
            return
        text = key.decode("utf-8", "replace")
        sink = text.split("|", 1)[0]
        # display only: sizes, never a held chunk's contact ids (a held 3M-id removal stays small here)
        state = self.held.setdefault(sink, ListsState(sink, keep_ids=False))
        state.feed(text, value)

    def _sync(self, account: str, list_name: str, delta_id: str, replay_id: str | None,
              sync_task_id: str | None) -> SyncView:
        syncs = self.lists.setdefault((account, list_name), OrderedDict())
        key = f"{delta_id}@{replay_id}" if replay_id else delta_id
        view = syncs.get(key)
        if view is None:
            view = syncs[key] = SyncView(account, list_name, delta_id, sync_task_id, replay_id)
            while len(syncs) > self.recent:
                syncs.popitem(last=False)
        return view

    def on_applied(self, chunk: AppliedChunk) -> None:
        """One record of the sink progress topic: a chunk applied, or discarded by an operator (a held delta
        ``heapsync held discard`` decided: recorded as done, nothing sent, so not counted as applied)."""
        self.records += 1
        replay_id = chunk.chunk_key.split("@", 1)[1] if "@" in chunk.chunk_key else None
        view = self._sync(chunk.account, chunk.list_name, chunk.delta_id, replay_id, chunk.sync_task_id)
        if chunk.discarded:
            view.discarded.setdefault(chunk.sink, set()).add(chunk.chunk)
        else:
            view.applied.setdefault(chunk.sink, set()).add(chunk.chunk)
            view.chunk_counts[chunk.chunk] = (chunk.adds, chunk.removes)
        view.kind = chunk.kind
        view.chunks = max(view.chunks, chunk.chunks or 1)
        view.complete = chunk.complete
        view.dead_lettered = max(view.dead_lettered, chunk.dead_lettered)
        if not chunk.discarded:  # "last applied": when the discard was recorded is not when anything was sent
            view.last_at = chunk.model_dump(mode="json")["applied_at"]

    def on_dead_letter(self, source: str, letter: AnyDeadLetter, timestamp_ms: int) -> None:
        """One record from a dead-letter topic (rejected, assembler or sink)."""
        self.records += 1
        if not letter.counted_once:
            return  # a dead letter written in parts (heapsync/dlq_parts.py) counts once, by its first part
        account, list_name = letter.account_name, letter.list_of  # an assembler's: named by its segment
        reason = letter.reason
        at = datetime.fromtimestamp(timestamp_ms / 1000, timezone.utc).isoformat(timespec="seconds")
        self.failures.append({"source": source, "account": account, "list_name": list_name,
                              "reason": reason, "at": at})
        self.failure_counts[f"{source}: {reason}"] = self.failure_counts.get(f"{source}: {reason}", 0) + 1
        if isinstance(letter, SinkDeadLetter) and account and list_name and letter.delta_id is not None:
            self._sync(account, list_name, letter.delta_id, letter.replay_id, letter.sync_task_id).failures += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "lists": [
                {"account": a, "list_name": lst, "syncs": [v.as_json() for v in reversed(syncs.values())]}
                for (a, lst), syncs in sorted(self.lists.items())
            ],
            "failures": list(reversed(self.failures)),
            "failure_counts": dict(sorted(self.failure_counts.items())),
            "records_read": self.records,
            "held": [{"sink": sink, **row} for sink, state in sorted(self.held.items()) for row in state.holds()],
        }


def render_html(snap: dict[str, Any], *, started: bool = True, reader_failures: int = 0) -> str:
    """The page: plain HTML, no script, refreshes itself."""
    e = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta http-equiv='refresh' content='10'><title>heapsync status</title>",
        "<style>body{font:14px system-ui,sans-serif;margin:2em;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:left}th{background:#f0f0f0}.ok{color:#176317}.warn{color:#a15c00}.bad{color:#b00020}"
        "h2{margin-top:1.5em}</style></head><body>",
        "<h1>heapsync status</h1>",
        f"<p>Records read: {snap['records_read']}. This page is read-only and refreshes every 10 s.</p>",
    ]
    if not started:
        parts.append("<p class='warn'>Starting to read the topics; refresh in a few seconds.</p>")
    if reader_failures:
        parts.append(f"<p class='bad'>Cannot read the topics ({reader_failures} broker errors in a row); retrying. "
                     "What is shown may be out of date.</p>")
    held = snap.get("held", [])
    parts.append("<h2>Held by the removal rail</h2>")
    if not held:
        parts.append("<p class='ok'>Nothing held.</p>")
    else:
        parts.append("<p class='bad'>These deltas are not applied, and later syncs of their lists wait behind them: "
                     "decide with <code>heapsync held release|discard &lt;delta id&gt;</code>.</p>")
        parts.append("<table><tr><th>account</th><th>list</th><th>delta</th><th>kind</th><th>reason</th>"
                     "<th>waiting behind</th><th>held at</th><th>decision</th></tr>")
        for h in held:
            parts.append(
                f"<tr class='bad'><td>{e(h['account'])}</td><td>{e(h['list_name'])}</td><td>{e(h['hold'])}</td>"
                f"<td>{e(h['kind'])}</td><td>{e(h['reason'])}</td><td>{h['waiting']}</td><td>{e(h['held_at'])}</td>"
                f"<td>{e(str(h['decision'] or '-'))}</td></tr>")
    if snap.get("disabled_segments"):
        parts.append("<h2>Disabled segments</h2><p class='warn'>enabled = false in the accounts file: their pages "
                     "are acknowledged and kept in the pages topic; nothing is sent to Cordial.</p>"
                     "<table><tr><th>account</th><th>segment id</th><th>list</th></tr>")
        for seg in snap["disabled_segments"]:
            parts.append(f"<tr class='warn'><td>{e(str(seg['account']))}</td><td>{e(str(seg['segment_id']))}</td>"
                         f"<td>{e(str(seg.get('list_name') or '(named after the segment)'))}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Recent syncs per list</h2>")
    if not snap["lists"]:
        parts.append("<p>No applied syncs yet.</p>")
    for group in snap["lists"]:
        parts.append(f"<h3>{e(group['account'])} / {e(group['list_name'])}</h3>")
        parts.append("<table><tr><th>sync</th><th>kind</th><th>progress</th><th>adds</th><th>removes</th>"
                     "<th>failures</th><th>last applied</th></tr>")
        for s in group["syncs"]:
            discarded = s.get("discarded") or {}
            progress = ", ".join([f"{e(sink)} {n}/{s['chunks']}" for sink, n in s["applied"].items()]
                                 + [f"{e(sink)} discarded" for sink in discarded]) or "-"
            done = all(n >= s["chunks"] for n in s["applied"].values()) and bool(s["applied"])
            state = "ok" if done and s["complete"] and not s["dead_lettered"] and not discarded else (
                "bad" if s["dead_lettered"] else "warn")
            label = s["sync_task_id"] or s["delta_id"][:12]
            if s["replay_id"]:
                label += f" (replay {s['replay_id']})"
            if not s["complete"]:
                label += " (partial)"
            for sink in discarded:  # per sink: another sink (e.g. the archive) may have applied it
                label += f" ({sink}: held and discarded by an operator, nothing sent)"
            parts.append(
                f"<tr class='{state}'><td>{e(str(label))}</td><td>{e(s['kind'])}</td><td>{progress}</td>"
                f"<td>{s['adds']}</td><td>{s['removes']}</td><td>{s['dead_lettered']}</td>"
                f"<td>{e(s['last_at'] or '-')}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Failures</h2>")
    if not snap["failures"]:
        parts.append("<p class='ok'>No dead letters.</p>")
    else:
        parts.append("<table><tr><th>reason</th><th>count</th></tr>")
        for reason, n in snap["failure_counts"].items():
            parts.append(f"<tr class='bad'><td>{e(reason)}</td><td>{n}</td></tr>")
        parts.append("</table><table><tr><th>at</th><th>topic</th><th>account</th><th>list</th><th>reason</th></tr>")
        for f in snap["failures"]:
            parts.append(f"<tr><td>{e(f['at'])}</td><td>{e(f['source'])}</td><td>{e(str(f['account'] or ''))}</td>"
                         f"<td>{e(str(f['list_name'] or ''))}</td><td>{e(f['reason'])}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "".join(parts)


RETRY_BASE_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0


def retry_delay(failures: int, base: float = RETRY_BASE_SECONDS, cap: float = RETRY_MAX_SECONDS) -> float:
    """Wait after the ``failures``-th broker error in a row: 1, 2, 4 ... seconds, never more than ``cap``."""
    return min(cap, base * 2 ** min(max(failures, 1) - 1, 30))


class Follower(Protocol):
    def poll(self) -> list[Record]: ...
    def close(self) -> None: ...


class Tailer:
    """Background reader of the progress and dead-letter topics into a :class:`StatusBoard`.

    A broker error (down at start, a failing ``list_topics``) is retried with a bounded back-off,
    one warning per attempt, for as long as the ingress runs: the page must keep updating once the
    broker is back. The same follower is kept across errors, so nothing is counted twice.
    """

    def __init__(self, settings: Settings, board: StatusBoard, *,
                 follower_factory: Callable[[str, Iterable[str]], Follower] = TopicFollower,
                 retry_base_seconds: float = RETRY_BASE_SECONDS, retry_max_seconds: float = RETRY_MAX_SECONDS,
                 ops: OpsView | None = None) -> None:
        self.settings = settings
        self.board = board
        self.ops = ops
        self.task: asyncio.Task[None] | None = None
        t = settings.topics
        self.sources = {t.sink_progress: "progress", t.rejected: "rejected", t.assembler_dlq: "assembler",
                        t.sink_dlq: "sink"}
        self.sources[t.sink_lists] = "lists"  # the removal rail's held deltas
        if ops is not None:
            self.sources[t.dlq_redrive] = "marks"  # dead letters re-driven: not pending any more
        self.follower_factory = follower_factory
        self.retry_base_seconds, self.retry_max_seconds = retry_base_seconds, retry_max_seconds
        self.failures = 0
        """Broker errors in a row; the page says so while it is not 0."""

    def ensure_started(self) -> bool:
        if self.task is None:
            self.task = asyncio.create_task(self._run())
            return False
        return True

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        follower: Follower | None = None
        try:
            while True:
                try:
                    if follower is None:
                        follower = self.follower_factory(self.settings.kafka_bootstrap, self.sources)
                    records = await loop.run_in_executor(None, follower.poll)
                except Exception as exc:  # noqa: BLE001 - the page must never take the ingress down
                    self.failures += 1
                    delay = retry_delay(self.failures, self.retry_base_seconds, self.retry_max_seconds)
                    log.warning("status page reader: cannot read the topics; retrying",
                                extra={"error": f"{type(exc).__name__}: {str(exc)[:200]}",
                                       "failures": self.failures, "retry_in_seconds": delay})
                    await asyncio.sleep(delay)
                    continue
                if self.failures:
                    log.info("status page reader: reading again", extra={"failures": self.failures})
                    self.failures = 0
                for record in records:
                    if self.sources.get(record.topic) == "lists":
                        self.board.on_lists(record.key, record.value)
                    elif self.ops is not None and self.sources.get(record.topic) == "marks":
                        self._feed_mark(record)
                    elif record.value is not None:
                        self._feed(record.topic, record.value, record.timestamp_ms, record.partition, record.offset)
        finally:
            if follower is not None:
                await loop.run_in_executor(None, follower.close)

    def _feed_mark(self, record: Record) -> None:
        assert self.ops is not None
        self.ops.on_mark(record.key, read_mark(record.value))

    def _feed(self, topic: str, value: bytes, timestamp_ms: int, partition: int = 0, offset: int = -1) -> None:
        """One record, read through its contract model; one that does not read is skipped."""
        doc = decode_json(value)
        if doc is None:
            return
        source = self.sources[topic]
        try:
            if source == "progress":
                chunk = AppliedChunk.model_validate(doc)
                self.board.on_applied(chunk)
                if self.ops is not None:
                    self.ops.on_applied(chunk)
            else:
                dead_letter_source: DeadLetterSource = source  # type: ignore[assignment]
                letter = read_dead_letter(dead_letter_source, doc)
                self.board.on_dead_letter(source, letter, timestamp_ms)
                if self.ops is not None:
                    self.ops.on_dead_letter(source, topic, partition, offset, letter)
        except Exception:  # noqa: BLE001 - one odd record is skipped, it must not stop the reader
            log.exception("status page reader: record skipped", extra={"topic": topic})

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


TAILER_KEY = web.AppKey("status_tailer", Tailer)


def add_status_routes(app: web.Application, settings: Settings, accounts: Mapping[str, Account] | None = None) -> None:
    """Add ``GET /status`` and ``GET /status.json`` (read-only) to the ingress's admin app (an ``AdminExtension``;
    bind ``accounts`` to name the segments the accounts file turns off)."""
    if not settings.status_page_enabled:
        return
    disabled = disabled_segments(accounts or {})
    board = StatusBoard(recent=settings.status_page_recent)
    ops = OpsView()
    tailer = Tailer(settings, board, ops=ops)
    app[BOARD_KEY] = board
    app[TAILER_KEY] = tailer
    app.setdefault(SCRAPE_HOOKS, []).append(tailer.ensure_started)  # the alert gauges come from this reader
    attach(ops, lambda: tailer.failures)  # /metrics reports it (heapsync_ops/metrics.py)

    async def page(request: web.Request) -> web.Response:
        started = tailer.ensure_started()
        return web.Response(text=render_html({**board.snapshot(), "disabled_segments": disabled}, started=started,
                                             reader_failures=tailer.failures), content_type="text/html")

    async def as_json(request: web.Request) -> web.Response:
        started = tailer.ensure_started()
        return web.json_response({**board.snapshot(), "disabled_segments": disabled, "reading": started,
                                  "reader_failures": tailer.failures},
                                 dumps=lambda o: orjson.dumps(o).decode())

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        yield
        await tailer.stop()

    app.router.add_get("/status", page)
    app.router.add_get("/status.json", as_json)
    app.cleanup_ctx.append(lifecycle)
