"""``heapsync dlq``: list, show and re-drive dead-letter entries.

Three dead-letter topics, each re-driven back to where it failed:

- ``rejected`` (``<prefix>.pages.rejected``, :class:`RejectedRecord`): the stored body is
  validated again with today's rules; if it is now valid it goes to the pages topic as
  the page it would have been (no replay id: it was never assembled, so it joins its
  sync like any late page). Still invalid: kept, and the attempt is logged as failed.
- ``assembler`` (``<prefix>.deltas.dlq``): a sync that timed out with pages missing holds
  the pages that did arrive; re-driving emits their net change as a delta
  (``complete: false``, with a replay id). An unreadable pages record is validated again
  and, if readable now, goes back to the pages topic. An entry that holds no content
  (a late page the assembler only counted) cannot be re-driven: replay the pages topic.
  A sync's content is stale once a newer sync (or a drain) of its segment was emitted:
  such an entry is refused unless ``--force`` (see :func:`newer_syncs`).
  A dead letter too large for one record was written in parts (``heapsync/dlq_parts.py``);
  :func:`load` joins them, so it is one entry here.
- ``sink`` (``<prefix>.sink.dlq``): failed Cordial operations are gathered per original
  chunk into a delta with just those ids (and a replay id, so sinks do not take it for a
  repeat); a delta dead-lettered whole (unknown account) goes back as it was.

Marking: after an entry's re-drive was produced, a record keyed
``<dlq topic>|<partition>|<offset>`` goes to the compacted topic ``<prefix>.dlq.redrive``
with the outcome (``redriven`` or ``failed``) and the replay id. ``redrive`` skips
entries whose last outcome is ``redriven`` (``--force`` overrides); failed ones are
tried again next time. The re-drive is produced before its mark, so a crash between the
two re-drives that entry once more, which is harmless: every step downstream is idempotent.

Everything but :func:`load`, :func:`load_marks`, :func:`stale_entries` and :func:`redrive` is pure.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import orjson
from pydantic import ValidationError

from heapsync import dlq_parts, naming
from heapsync.contracts import (
    KNOWN_ACTIONS,
    AnyDeadLetter,
    AssemblerDeadLetter,
    DeadLetterHead,
    Delta,
    PageRecord,
    RedriveMark,
    RejectedRecord,
    SinkDeadLetter,
    decode_json,
    delta_id_for,
    delta_key,
    list_key,
    mark_key,
    pages_key,
    parse_heap_payload,
    read_dead_letter,
    read_mark,
    read_tolerant,
)
from heapsync.settings import Settings
from heapsync.topic_reader import Record, latest_by_key, read_topic

Source = Literal["rejected", "assembler", "sink"]
SOURCES: tuple[Source, ...] = ("rejected", "assembler", "sink")


@dataclass(frozen=True)
class Entry:
    """One dead-letter record, whatever topic it is on."""

    source: Source
    record: Record
    doc: dict[str, Any]
    account: str | None
    reason: str
    summary: str
    letter: AnyDeadLetter = field(default_factory=DeadLetterHead)
    """The record as its topic's contract model (``heapsync/contracts.py``)."""

    @property
    def id(self) -> str:
        """``<source>:<partition>:<offset>``: what ``dlq show`` takes."""
        return f"{self.source}:{self.record.partition}:{self.record.offset}"

    @property
    def mark_key(self) -> str:
        return mark_key(self.record.topic, self.record.partition, self.record.offset)

    @property
    def at(self) -> datetime:
        return datetime.fromtimestamp(self.record.timestamp_ms / 1000, timezone.utc)


@dataclass(frozen=True)
class Output:
    """A record to produce: to ``pages`` or ``deltas``, with its key."""

    target: Literal["pages", "deltas"]
    key: bytes
    value: bytes


@dataclass
class Plan:
    outputs: list[Output] = field(default_factory=list)
    outcomes: dict[str, tuple[str, str]] = field(default_factory=dict)  # entry id -> (outcome, detail)
    warnings: list[str] = field(default_factory=list)


def parse_entry(source: Source, record: Record) -> Entry:
    """Tolerant: an entry we cannot read is still listed (reason ``unreadable``)."""
    doc = decode_json(record.value or b"null")
    if doc is None:
        return Entry(source, record, {"value": (record.value or b"").decode("utf-8", "replace")}, None,
                     "unreadable dead-letter record", "")
    letter = read_dead_letter(source, doc)
    return Entry(source, record, doc, letter.account_name, letter.reason, letter.summary() + letter.split_note(),
                 letter)


def state_of(entry: Entry, marks: Mapping[str, RedriveMark]) -> str:
    mark = marks.get(entry.mark_key)
    return "pending" if mark is None else mark.outcome


def matches(entry: Entry, *, account: str | None = None, reason: str | None = None) -> bool:
    if account is not None and entry.account != account:
        return False
    return reason is None or reason.lower() in entry.reason.lower()


def counts_by_reason(entries: Iterable[Entry], marks: Mapping[str, RedriveMark] | None = None) -> dict[str, dict[str, int]]:
    """``{source: {reason: count}}`` of entries not yet re-driven."""
    out: dict[str, Counter[str]] = defaultdict(Counter)
    for e in entries:
        if marks is not None and state_of(e, marks) == "redriven":
            continue
        out[e.source][e.reason] += 1
    return {s: dict(c) for s, c in out.items()}


# -- planning re-drives (pure) ------------------------------------------------


def _page_output(record: PageRecord, payload: Any) -> Output:
    return Output("pages", pages_key(record.account, payload.data.segment.id),
                  record.model_dump_json(exclude_none=False).encode())


def _plan_rejected(entry: Entry) -> Output | str:
    letter = entry.letter
    if not isinstance(letter, RejectedRecord):
        return "the entry is not a readable rejected request"
    body = letter.exact_body()
    if isinstance(body, str):
        return body
    if not entry.account:
        return "entry has no account"
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return (f"still invalid: the body is not UTF-8 (byte {body[exc.start]:#04x} at offset {exc.start}); "
                "re-driving it as text would change the ids in it")
    try:
        payload = parse_heap_payload(body)
    except ValidationError as exc:
        paths = sorted({".".join(str(p) for p in e["loc"]) or "(body)" for e in exc.errors(include_input=False)})
        return f"still invalid: {', '.join(paths)}"
    if payload.action_type not in KNOWN_ACTIONS:
        return f"action_type {payload.action_type!r} is still not supported"
    record = PageRecord(account=entry.account, request_id=letter.request_id or entry.id,
                        received_at=letter.received_at, payload=orjson.loads(body))
    return _page_output(record, payload)


def _revalidate_page(value: str) -> Output | str:
    try:
        record = PageRecord.model_validate_json(value)
        payload = parse_heap_payload(orjson.dumps(record.payload))
    except ValidationError as exc:
        return f"still unreadable: {exc.error_count()} errors"
    if payload.action_type not in KNOWN_ACTIONS:
        return f"action_type {payload.action_type!r} is still not supported"
    return _page_output(record, payload)


def _held_pages_delta(letter: AssemblerDeadLetter, held: dict[int, Any], replay_id: str,
                      chunk_size: int) -> list[Output] | str:
    from processors import rules

    if letter.account is None or letter.segment_id is None or letter.segment_name is None:
        return "entry lacks account or segment"
    pages = {n: rules.PageChanges(tuple(p.add), tuple(p.remove)) for n, p in held.items()}
    chunks = rules.chunk_changes(rules.net_changes(pages), chunk_size)
    sync_ref = letter.sync_task_id or letter.sync.split("|", 1)[-1]
    list_name = letter.list_of or naming.list_name(letter.segment_name)  # a pinned name, when recorded
    common: dict[str, Any] = dict(
        delta_id=delta_id_for(letter.account, sync_ref), account=letter.account, segment_id=letter.segment_id,
        segment_name=letter.segment_name, list_name=list_name, identity_field=letter.identity_field or "email",
        kind="sync", sync_task_id=letter.sync_task_id, complete=False, total_pages=letter.total_pages or 0,
        missing_pages=list(letter.missing_pages or []), chunks=len(chunks), replay_id=replay_id,
    )
    return [Output("deltas", list_key(letter.account, list_name).encode(),
                   Delta(**common, chunk=n, add=list(add), remove=list(remove)).model_dump_json().encode())
            for n, (add, remove) in enumerate(chunks, start=1)]


def _plan_assembler(entry: Entry, replay_id: str, chunk_size: int) -> list[Output] | str:
    letter = entry.letter
    if not isinstance(letter, AssemblerDeadLetter):
        return "the entry is not a readable assembler dead letter"
    held = letter.held_pages()
    if held is not None:
        return _held_pages_delta(letter, held, replay_id, chunk_size)
    if letter.page_record is not None:  # a dead letter that carries the whole pages record
        out = _revalidate_page(orjson.dumps({**letter.page_record, "replay_id": replay_id}).decode())
        return [out] if isinstance(out, Output) else out
    if letter.value is not None:
        out = _revalidate_page(letter.value)
        return [out] if isinstance(out, Output) else out
    return "the entry holds no page content: replay the pages topic for this segment instead"


def _delta_again(data: Any, replay_id: str) -> Output | str:
    try:
        delta = Delta.model_validate(data) if isinstance(data, dict) else Delta.model_validate_json(data)
    except ValidationError as exc:
        return f"still unreadable: {exc.error_count()} errors"
    again = delta.model_copy(update={"replay_id": replay_id})
    return Output("deltas", delta_key(again), again.model_dump_json().encode())


# -- is a sync's content still current? (pure) -----------------------------------

CLOCK_MARGIN_SECONDS = 300.0
"""The deltas topic is read from this long before the earliest sync checked (clocks differ)."""


@dataclass(frozen=True)
class SyncRef:
    """The sync an assembler entry would re-drive, and when it went out without this content."""

    account: str
    segment_id: str
    sync_task_id: str
    emitted_at: float | None  # epoch seconds; None when not recorded (an entry older than the field)


@dataclass
class Staleness:
    """What the deltas topic says about one entry's sync."""

    since: float | None = None  # when the sync went out without this content, if known
    newer: list[str] = field(default_factory=list)  # syncs and drains of the segment emitted after that

    def problem(self, ref: SyncRef) -> str | None:
        """Why re-driving the entry may apply stale data; None when nothing newer was emitted."""
        if self.since is None:
            return (f"cannot tell when sync {ref.sync_task_id} went out without this content (the entry predates "
                    "heapsync recording it and the sync's delta is gone from the deltas topic), so not whether a "
                    f"newer sync of segment {ref.segment_id} was applied since")
        if not self.newer:
            return None
        at = datetime.fromtimestamp(self.since, timezone.utc).isoformat(timespec="seconds")
        shown = ", ".join(self.newer[:3]) + (f" and {len(self.newer) - 3} more" if len(self.newer) > 3 else "")
        return (f"segment {ref.segment_id} had {len(self.newer)} newer sync(s) emitted after sync "
                f"{ref.sync_task_id} went out without this content at {at}: {shown}")


def sync_ref(entry: Entry) -> SyncRef | None:
    """The sync of an assembler entry that holds sync content (a timed-out sync's pages, a late page)."""
    letter = entry.letter
    if entry.source != "assembler" or not isinstance(letter, AssemblerDeadLetter):
        return None
    timed_out = letter.pages is not None
    record = letter.page_record
    if not timed_out and record is None:
        return None
    segment, task = letter.segment_id, letter.sync_task_id
    if record is not None and (segment is None or task is None):  # early late-page letters: from the page itself
        page = read_tolerant(PageRecord, record)
        data = page.payload.get("data") if page is not None else None
        if isinstance(data, dict):
            seg_doc, info = data.get("segment"), data.get("sync_info")
            segment = segment or (str(seg_doc["id"]) if isinstance(seg_doc, dict) and "id" in seg_doc else None)
            task = task or (info.get("sync_task_id") if isinstance(info, dict) else None)
    account = letter.account or entry.account
    if not account or segment is None or not isinstance(task, str):
        return None
    if letter.sync_emitted_at is not None:
        emitted: float | None = letter.sync_emitted_at
    elif timed_out:
        emitted = entry.record.timestamp_ms / 1000  # the dead letter went out when the sync was given up
    else:
        emitted = None
    return SyncRef(account, str(segment), task, emitted)


def _emitted_at(doc: dict[str, Any], rec: Record) -> float:
    text = doc.get("emitted_at")
    if isinstance(text, str):
        try:
            at = datetime.fromisoformat(text)
            return (at if at.tzinfo else at.replace(tzinfo=timezone.utc)).timestamp()
        except ValueError:
            pass
    return rec.timestamp_ms / 1000


def _describe(kind: str, task: str | None, replay: str | None, at: float) -> str:
    when = datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="seconds")
    what = f"sync {task}" if kind == "sync" else "a drain"
    return f"{what} at {when}" + (f" (replay {replay})" if replay else "")


def newer_syncs(refs: Mapping[str, SyncRef], deltas: Iterable[Record]) -> dict[str, Staleness]:
    """Per entry: the syncs and drains of its segment that reached the deltas topic after its sync
    went out without the entry's content.

    A re-drive lands after everything already on the deltas topic, applied or still waiting for a
    sink; so once a newer sync (or a drain) of the segment is there, re-driving the older sync's
    content puts older data over newer (a late page adding x, re-driven after a newer sync removed x,
    leaves x in the list). The deltas topic rather than the sinks' progress topic: a newer delta a
    lagging sink has not applied yet counts too. Times are the deltas' ``emitted_at`` (the worker's
    clock, the same that dated the entry). Deltas of the entry's own sync (a partial delta, replays
    of it) are not newer; for an entry that does not say when its sync went out, its sync's first
    delta stands in.
    """
    by_segment: dict[tuple[str, str], list[str]] = defaultdict(list)
    for entry_id, ref in refs.items():
        by_segment[(ref.account, ref.segment_id)].append(entry_id)
    prefixes = tuple({f"{ref.account}:".encode() for ref in refs.values()})
    own_first: dict[str, float] = {}
    others: dict[str, dict[tuple[str, str | None, str | None], float]] = defaultdict(dict)
    for rec in deltas:
        if rec.value is None or (rec.key is not None and not rec.key.startswith(prefixes)):
            continue  # keyed "<account>:<list>": other accounts' deltas are not even parsed
        doc = decode_json(rec.value)
        if doc is None:
            continue
        ids = by_segment.get((str(doc.get("account")), str(doc.get("segment_id"))))
        if not ids:
            continue
        at = _emitted_at(doc, rec)
        kind = str(doc.get("kind") or "sync")
        task = doc.get("sync_task_id") if isinstance(doc.get("sync_task_id"), str) else None
        replay = doc.get("replay_id") if isinstance(doc.get("replay_id"), str) else None
        for entry_id in ids:
            if kind == "sync" and task == refs[entry_id].sync_task_id:
                if replay is None:
                    own_first[entry_id] = min(at, own_first.get(entry_id, at))
                continue
            seen = others[entry_id]
            seen[(kind, task, replay)] = min(at, seen.get((kind, task, replay), at))
    out: dict[str, Staleness] = {}
    for entry_id, ref in refs.items():
        since = ref.emitted_at if ref.emitted_at is not None else own_first.get(entry_id)
        newer = [] if since is None else sorted(
            (at, _describe(kind, task, replay, at)) for (kind, task, replay), at in others[entry_id].items()
            if at > since)
        out[entry_id] = Staleness(since, [text for _, text in newer])
    return out


def plan_redrive(entries: list[Entry], replay_id: str, *, chunk_size: int = 5000,
                 stale: Mapping[str, str] | None = None, force: bool = False) -> Plan:
    """What to produce for these entries, and each entry's outcome.

    ``stale``: entry id -> why re-driving it may apply older data over newer (:func:`newer_syncs`).
    Such an entry is refused, unless ``force``, which re-drives it with a warning. Sync content is
    re-driven oldest sync first: dead letters are keyed by sync, so two syncs of one segment may
    sit on different partitions and be read in either order.
    """
    plan = Plan()

    def age(entry: Entry) -> float:
        ref = sync_ref(entry)
        return float("-inf") if ref is None else (ref.emitted_at or entry.record.timestamp_ms / 1000)

    entries = sorted(entries, key=age)  # stable: everything but sync content keeps its order

    def settle(entry: Entry, result: Output | list[Output] | str) -> None:
        if isinstance(result, str):
            plan.outcomes[entry.id] = ("failed", result)
            return
        plan.outputs.extend(result if isinstance(result, list) else [result])
        plan.outcomes[entry.id] = ("redriven", "")

    ops: dict[tuple[str, str, str, int, str], list[tuple[Entry, SinkDeadLetter]]] = defaultdict(list)
    for entry in entries:
        letter = entry.letter
        problem = (stale or {}).get(entry.id)
        if isinstance(letter, DeadLetterHead) and letter.incomplete is not None:
            settle(entry, f"{letter.incomplete}: cannot re-drive it")
        elif problem is not None and not force:
            settle(entry, f"refused: {problem}. Re-driving it would put this older sync's data over the newer "
                          "one's; --force re-drives it anyway")
        elif entry.source == "rejected":
            settle(entry, _plan_rejected(entry))
        elif entry.source == "assembler":
            if problem is not None:
                plan.warnings.append(f"{entry.id} re-driven with --force although {problem}: its older data may "
                                     "undo newer changes; check the list afterwards")
            settle(entry, _plan_assembler(entry, replay_id, chunk_size))
        elif not isinstance(letter, SinkDeadLetter):
            settle(entry, "the entry is not a readable sink dead letter")
        elif letter.delta is not None:
            settle(entry, _delta_again(letter.delta, replay_id))
        elif letter.operation in ("add", "remove", "clear") and entry.account and letter.list_name:
            ops[(entry.account, letter.list_name, letter.delta_id or "", letter.chunk or 1,
                 letter.identity_key or "email")].append((entry, letter))
        elif letter.value is not None:
            settle(entry, _delta_again(letter.value, replay_id))
        else:
            settle(entry, "the entry holds no operation or delta")
    for (account, list_name, delta_id, chunk, identity_key), group in ops.items():
        state: dict[str, str] = {}
        clear = False
        for _, failed in sorted(group, key=lambda g: (g[0].record.partition, g[0].record.offset)):
            if failed.operation == "clear":
                clear = True
            elif isinstance(failed.contact_id, str) and failed.operation is not None:
                state[failed.contact_id] = failed.operation  # the last failure of an id wins
        first = group[0][1]
        common: dict[str, Any] = dict(
            delta_id=delta_id or delta_id_for(account, f"redrive:{list_name}"), account=account,
            segment_id=first.segment_id or "", segment_name=first.segment_name or list_name,
            list_name=list_name, identity_field=first.identity_field or identity_key,
            sync_task_id=first.sync_task_id, chunk=chunk, chunks=max(chunk, first.chunks or 1),
            replay_id=replay_id,
        )
        key = list_key(account, list_name).encode()
        if clear:
            plan.outputs.append(Output("deltas", key, Delta(**common, kind="drain").model_dump_json().encode()))
        if state:
            delta = Delta(**common, kind="sync", add=sorted(i for i, o in state.items() if o == "add"),
                          remove=sorted(i for i, o in state.items() if o == "remove"))
            plan.outputs.append(Output("deltas", key, delta.model_dump_json().encode()))
        for e, _ in group:
            plan.outcomes[e.id] = ("redriven", "")
    return plan


def mark_value(entry: Entry, outcome: str, detail: str, replay_id: str, now: datetime | None = None) -> bytes:
    return RedriveMark(entry=entry.id, outcome=outcome, detail=detail, replay_id=replay_id,
                       at=now or datetime.now(timezone.utc)).encode()


# -- shells ---------------------------------------------------------------------


def load_marks(settings: Settings) -> dict[str, RedriveMark]:
    latest = latest_by_key(read_topic(settings.kafka_bootstrap, settings.topics.dlq_redrive, idle_timeout=10.0))
    return {key.decode(): mark for key, rec in latest.items() if (mark := read_mark(rec.value)) is not None}


def load(settings: Settings, sources: Iterable[Source] = SOURCES) -> list[Entry]:
    topics = settings.topics.dead_letter_topics()
    entries: list[Entry] = []
    for source in sources:
        for rec in dlq_parts.join(read_topic(settings.kafka_bootstrap, topics[source], idle_timeout=10.0)):
            if rec.value is not None:
                entries.append(parse_entry(source, rec))
    return entries


@dataclass
class RedriveReport:
    replay_id: str
    dry_run: bool
    considered: int = 0
    skipped_done: int = 0
    produced: dict[str, int] = field(default_factory=lambda: {"pages": 0, "deltas": 0})
    outcomes: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"replay_id": self.replay_id, "dry_run": self.dry_run, "considered": self.considered,
                "skipped_already_redriven": self.skipped_done, "produced": self.produced,
                "outcomes": self.outcomes, "warnings": self.warnings}


def stale_entries(settings: Settings, entries: list[Entry]) -> dict[str, str]:
    """Entry id -> why re-driving it may apply stale data, from the deltas topic (:func:`newer_syncs`).

    Reads the deltas topic from a little before the earliest sync checked (from its beginning
    when an entry does not say when its sync went out).
    """
    refs = {e.id: ref for e in entries if (ref := sync_ref(e)) is not None}
    if not refs:
        return {}
    known = [r.emitted_at for r in refs.values() if r.emitted_at is not None]
    since_ms = int((min(known) - CLOCK_MARGIN_SECONDS) * 1000) if len(known) == len(refs) else None
    verdicts = newer_syncs(refs, read_topic(settings.kafka_bootstrap, settings.topics.deltas, since_ms=since_ms,
                                            idle_timeout=10.0))
    return {i: p for i, v in verdicts.items() if (p := v.problem(refs[i])) is not None}


def redrive(settings: Settings, entries: list[Entry], marks: Mapping[str, RedriveMark], *, replay_id: str,
            force: bool = False, dry_run: bool = False) -> RedriveReport:
    report = RedriveReport(replay_id, dry_run)
    todo = []
    for e in entries:
        if not force and state_of(e, marks) == "redriven":
            report.skipped_done += 1
            continue
        todo.append(e)
    report.considered = len(todo)
    plan = plan_redrive(todo, replay_id, chunk_size=settings.delta_chunk_size, stale=stale_entries(settings, todo),
                        force=force)
    report.warnings = plan.warnings
    by_id = {e.id: e for e in todo}
    for entry_id, (outcome, detail) in plan.outcomes.items():
        report.outcomes.append({"entry": entry_id, "reason": by_id[entry_id].reason, "outcome": outcome,
                                "detail": detail})
    for out in plan.outputs:
        report.produced[out.target] += 1
    if dry_run or not todo:
        return report
    from heapsync.kafka import java_partition
    from heapsync.producer import ResilientProducer

    producer = ResilientProducer.connect(settings.kafka_bootstrap, delivery_timeout_s=30.0)
    targets = {"pages": settings.topics.pages, "deltas": settings.topics.deltas}

    # deltas go where the worker puts the list's others (murmur2, not librdkafka's CRC32): in order with them
    deltas_partitions = producer.partition_count(settings.topics.deltas) if any(
        o.target == "deltas" for o in plan.outputs) else 0

    def partition_of(out: Output) -> int | None:
        return java_partition(out.key, deltas_partitions) if out.target == "deltas" else None

    async def produce() -> None:
        await asyncio.gather(*(producer.send(targets[o.target], o.value, key=o.key, partition=partition_of(o))
                               for o in plan.outputs))
        # only after the re-drives are acknowledged: mark them (see module docstring)
        await asyncio.gather(*(
            producer.send(settings.topics.dlq_redrive, mark_value(by_id[i], outcome, detail, replay_id),
                          key=by_id[i].mark_key.encode())
            for i, (outcome, detail) in plan.outcomes.items()))

    try:
        asyncio.run(produce())
    finally:
        producer.close()
    return report
