"""``heapsync replay``: re-drive a range of the pages or deltas topic.

Replaying is safe because of the replay contract (docs/operations.md, "Replay"): each re-produced
record carries a fresh ``replay_id``. A replayed page is assembled as a fresh
sync (its sync key includes the replay id), a replayed delta chunk has its own
``chunk_key``, so nothing is swallowed as "already done", and applying the same
syncs again in their original order gives the same final lists as one clean run.

Records keep their key and their partition, so per-segment and per-list order
is the original order. Timer ticks on the pages topic are skipped, and so, by
default, are records that are themselves replays (a second replay of the same
range would only repeat work).

The selection and rewriting rules are pure functions; :func:`run_replay` is the shell.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import orjson

from heapsync.contracts import TICK, decode_json
from heapsync.settings import Settings
from heapsync.topic_reader import Record, read_topic

Kind = Literal["pages", "deltas"]


@dataclass(frozen=True)
class Filter:
    account: str | None = None
    segment: str | None = None  # a segment id, a segment name or a list name
    include_replays: bool = False


@dataclass(frozen=True)
class Selected:
    """A record chosen for replay: where it came from and what it is about."""

    record: Record
    doc: dict[str, Any]
    account: str
    segment: str
    sync: str


@dataclass
class Report:
    kind: Kind
    replay_id: str
    dry_run: bool
    read: int = 0
    selected: int = 0
    produced: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    groups: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    pages_seen: dict[tuple[str, str, str], set[int]] = field(default_factory=dict)
    total_pages: dict[tuple[str, str, str], int] = field(default_factory=dict)

    def incomplete(self) -> list[dict[str, Any]]:
        """Syncs of which the range holds fewer pages than they have: a replay of them cannot complete
        (the assembler times them out), so ``--since`` should move earlier."""
        return [{"account": a, "segment": s, "sync": y, "pages": len(seen), "total_pages": self.total_pages[(a, s, y)]}
                for (a, s, y), seen in sorted(self.pages_seen.items())
                if len(seen) < self.total_pages.get((a, s, y), 0)]

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "replay_id": self.replay_id, "dry_run": self.dry_run, "read": self.read,
            "selected": self.selected, "produced": self.produced, "skipped": dict(self.skipped),
            "groups": [{"account": a, "segment": s, "sync": y, "records": n}
                       for (a, s, y), n in sorted(self.groups.items())],
            "incomplete_syncs": self.incomplete(),
        }


def new_replay_id(now: datetime | None = None) -> str:
    """Sortable and unique: when it was started, and a random tail."""
    now = now or datetime.now(timezone.utc)
    return f"r{now.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}"


_AGO = re.compile(r"(\d+)([dhms])")
_AGO_UNIT_SECONDS = {"d": 86_400, "h": 3_600, "m": 60, "s": 1}


def parse_since(text: str, now: datetime | None = None) -> int:
    """An ISO 8601 time (naive means UTC), or a span back from now (``90m``, ``2h``, ``1d12h``), to epoch ms.

    Spans because "replay since the outage began, two hours ago" is how operators think of it.
    """
    compact = text.strip().lower().replace(" ", "")
    if compact and not _AGO.sub("", compact):  # nothing but <number><unit> pairs
        seconds = sum(int(n) * _AGO_UNIT_SECONDS[unit] for n, unit in _AGO.findall(compact))
        now = now or datetime.now(timezone.utc)
        return int(now.timestamp() * 1000) - seconds * 1000
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return int(when.timestamp() * 1000)


def _object(value: Any) -> dict[str, Any]:
    """A JSON object as read, or an empty one: replay reads records it did not write."""
    return value if isinstance(value, dict) else {}


def _segment_matches(wanted: str | None, *candidates: Any) -> bool:
    return wanted is None or any(wanted == str(c) for c in candidates if c is not None)


def select(kind: Kind, record: Record, flt: Filter, replay_id: str) -> Selected | str:
    """The record as a replay candidate, or the reason it is skipped."""
    raw = record.value
    if raw is None:
        return "tombstone"
    if kind == "pages" and raw.strip() == TICK:
        return "tick"
    doc = decode_json(raw)
    if doc is None:
        return "unreadable"
    if doc.get("control") is not None:
        return "tick"
    previous = doc.get("replay_id")
    if previous == replay_id:
        return "this replay"
    if previous and not flt.include_replays:
        return "earlier replay"
    account = doc.get("account")
    if not isinstance(account, str):
        return "unreadable"
    if flt.account is not None and account != flt.account:
        return "other account"
    if kind == "pages":
        payload = _object(doc.get("payload"))
        data = _object(payload.get("data"))
        seg = _object(data.get("segment"))
        info = _object(data.get("sync_info"))
        seg_id, seg_name = seg.get("id"), seg.get("name")
        if not _segment_matches(flt.segment, seg_id, seg_name):
            return "other segment"
        sync = str(info.get("sync_task_id") or f"{payload.get('action_type', '?')}:{doc.get('request_id', '?')}")
        return Selected(record, doc, account, str(seg_id), sync)
    if not _segment_matches(flt.segment, doc.get("segment_id"), doc.get("segment_name"), doc.get("list_name")):
        return "other segment"
    sync = str(doc.get("sync_task_id") or doc.get("delta_id") or "?")
    return Selected(record, doc, account, str(doc.get("list_name") or doc.get("segment_id")), sync)


def replayed_value(doc: dict[str, Any], replay_id: str) -> bytes:
    """The record again, with the replay id set; every other field kept as it was (also unknown ones)."""
    return orjson.dumps({**doc, "replay_id": replay_id})


def plan(kind: Kind, records: Iterable[Record], flt: Filter, report: Report) -> Iterable[Selected]:
    """Yield what to replay, counting what is skipped and why."""
    for record in records:
        chosen = select(kind, record, flt, report.replay_id)
        if chosen == "this replay":
            # The pass reads to the partition ends while it produces, so it can meet its own
            # copies: they are not part of the range, and not part of the report.
            continue
        report.read += 1
        if isinstance(chosen, str):
            report.skipped[chosen] += 1
            continue
        report.selected += 1
        group = (chosen.account, chosen.segment, chosen.sync)
        report.groups[group] += 1
        if kind == "pages":
            info = (((chosen.doc.get("payload") or {}).get("data") or {}).get("sync_info") or {})
            if isinstance(info.get("page_number"), int) and isinstance(info.get("total_pages"), int):
                report.pages_seen.setdefault(group, set()).add(info["page_number"])
                report.total_pages[group] = info["total_pages"]
        yield chosen


def run_replay(settings: Settings, kind: Kind, *, since_ms: int | None, from_offset: int | None, flt: Filter,
               dry_run: bool, progress: bool = False, replay_id: str | None = None) -> Report:
    """Read the range, and (unless a dry run) re-produce each chosen record with a fresh replay id.

    A plain idempotent producer (acks=all) with delivery callbacks: the replay is one
    sequential pass, so it needs no event loop; any undelivered record fails the command.
    """
    from confluent_kafka import Producer

    from heapsync.producer import producer_config

    topic = settings.topics.pages if kind == "pages" else settings.topics.deltas
    report = Report(kind, replay_id or new_replay_id(), dry_run)
    bar = _Bar(progress, f"{'scanning' if dry_run else 'replaying'} {topic}")
    records = read_topic(settings.kafka_bootstrap, topic, since_ms=since_ms, from_offset=from_offset,
                         on_start=bar.start)
    producer = None if dry_run else Producer(
        producer_config(settings.kafka_bootstrap, delivery_timeout_s=60.0, extra={"linger.ms": 5}))
    failures: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is None:
            report.produced += 1
        else:
            failures.append(err.str())

    try:
        for chosen in plan(kind, _counted(records, bar), flt, report):
            if producer is None:
                continue
            while True:
                try:
                    # same key and same partition as the original: the original order holds
                    producer.produce(topic, replayed_value(chosen.doc, report.replay_id), key=chosen.record.key,
                                     partition=chosen.record.partition, on_delivery=delivered)
                    break
                except BufferError:
                    producer.poll(0.1)
            producer.poll(0)
        if producer is not None and producer.flush(60) > 0:
            failures.append("records still undelivered after 60 s")
    finally:
        bar.close()
    if failures:
        raise ReplayError(f"{len(failures)} replayed records were not delivered: {failures[0]}", report)
    return report


class ReplayError(Exception):
    def __init__(self, message: str, report: Report) -> None:
        super().__init__(message)
        self.report = report


def _counted(records: Iterable[Record], bar: _Bar) -> Iterable[Record]:
    for r in records:
        bar.advance()
        yield r


class _Bar:
    """A rich progress bar on a terminal; nothing at all when output is not a terminal."""

    def __init__(self, enabled: bool, description: str) -> None:
        self.enabled = enabled
        self.description = description
        self._progress: Any = None
        self._task: Any = None

    def start(self, total: int | None) -> None:
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=Console(stderr=True), transient=False)
        self._progress.start()
        self._task = self._progress.add_task(self.description, total=total)

    def advance(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._task)

    def close(self) -> None:
        if self._progress is not None:
            task = self._progress.tasks[0]
            self._progress.update(self._task, total=task.completed)
            self._progress.stop()
