"""``heapsync trace <contact id>``: why is this contact (not) in the list?

Reads three topics (no consumer group, :mod:`heapsync.topic_reader`) and answers for one contact:

- the deltas topic (within its retention): every chunk whose ``add`` or ``remove`` holds the contact,
  and the drains of the lists it appears in (a drain empties the list);
- the sink progress topic (``AppliedChunk`` per sink and ``chunk_key``): when each chunk was applied;
- the sink dead-letter topic and the re-drive marks: the contact's operations that failed for good,
  why, and whether (under which replay id) they were re-driven.

Per list, in the order a sink meets them (:func:`apply_order`: a list's deltas share a key, so normally
one partition and its offset order), each change gets one outcome for the chosen sink:

- ``applied``: the first copy of a chunk with a progress record, at its ``applied_at``;
- ``repeat``: a later copy of a chunk already applied (the sink skips it: at-least-once delivery);
- ``dead-lettered``: the contact's operation failed for good (with the reason, Cordial's status
  and, once re-driven, the replay id; the re-driven change is a row of its own, later);
- ``held`` (the removal rail stopped its delta, issue 14 §1: every chunk of it), ``waiting`` (a chunk
  of a later delta of the list kept behind that hold), ``discarded`` (an operator discarded the hold:
  nothing sent); a released hold is ``applied`` with "held ..., released" in its detail
  (:func:`held_states`, from the rail's compacted ``<prefix>.sink.lists`` topic, and the
  ``discarded`` flag of the progress record);
- ``pending``: on the topic but not applied yet (the sink is behind).

Emails are personal data: only the asked contact's own entries are kept; nothing else from a chunk
or a dead letter (other ids, other contacts' Cordial answers) reaches the output, and nothing is logged.
Email ids match the way Cordial compares them (trimmed, lower-cased); other identities exactly. Ids
are emails when they go to Cordial's email key: a Heap field named ``email``, or one the accounts file
maps onto it (``cordial_identity_key = "email"``; without the accounts file, the record's field decides).

Everything but :func:`gather` is pure.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Literal, TypeVar

import orjson

from heapsync.contracts import (
    HeldChunk,
    HoldDecision,
    RedriveMark,
    SinkDeadLetter,
    decode_json,
    mark_key,
    read_dead_letter,
    read_tolerant,
)
from heapsync.held import hold_id_of
from heapsync.identities import compared_as, normalise_email, same_contact
from heapsync.topic_reader import Record, latest_by_key

Change = Literal["add", "remove", "drain"]
Outcome = Literal["applied", "repeat", "dead-lettered", "held", "waiting", "discarded", "pending"]
DETAIL_MAX_CHARS = 200
_M = TypeVar("_M", HeldChunk, HoldDecision)


IdentityKeys = Mapping[str, Any]
"""Account id -> its ``Account`` (anything with ``identity_key(field)``), from the accounts file."""


def _compared(identity_field: Any, account: Any, accounts: IdentityKeys) -> str | None:
    """The identity a record's ids compare under (``None``: no field recorded, email)."""
    if not isinstance(identity_field, str):
        return None
    found = accounts.get(account) if isinstance(account, str) else None
    return compared_as(identity_field, found.identity_key(identity_field) if found is not None else None)


def _when(value: Any, fallback_ms: int | None = None) -> datetime | None:
    if isinstance(value, str):
        try:
            at = datetime.fromisoformat(value)
            return at if at.tzinfo else at.replace(tzinfo=timezone.utc)
        except ValueError:
            pass
    if fallback_ms is not None and fallback_ms >= 0:
        return datetime.fromtimestamp(fallback_ms / 1000, timezone.utc)
    return None


def _iso(at: datetime | None) -> str | None:
    return at.isoformat(timespec="seconds") if at is not None else None


@dataclass(frozen=True)
class Filter:
    """What the operator narrowed the trace to (``--account``, ``--list``: a list name or segment id)."""

    account: str | None = None
    list_name: str | None = None

    def wants(self, account: str, list_name: str, segment_id: str) -> bool:
        if self.account is not None and account != self.account:
            return False
        return self.list_name is None or self.list_name in (list_name, segment_id)


@dataclass(frozen=True)
class Seen:
    """One copy of a delta chunk on the deltas topic that touches the contact (or drains its list)."""

    account: str
    list_name: str
    segment_id: str
    change: Change
    contact: str | None  # as Heap sent it (a case variant of the asked email, say); None for a drain
    sync_task_id: str | None
    replay_id: str | None
    delta_id: str
    chunk: int
    chunks: int
    chunk_key: str
    complete: bool
    emitted_at: datetime | None
    partition: int
    offset: int
    written_ms: int = 0  # the record's timestamp: when it reached the deltas topic

    @property
    def list_key(self) -> tuple[str, str]:
        return self.account, self.list_name


def _chunk_key(doc: Mapping[str, Any]) -> str:
    base = f"{doc.get('delta_id')}:{doc.get('chunk') or 1}"
    replay = doc.get("replay_id")
    return f"{base}@{replay}" if isinstance(replay, str) and replay else base


def seen_in(rec: Record, asked: str, flt: Filter = Filter(), accounts: IdentityKeys | None = None) -> list[Seen]:
    """The contact's change in one deltas record (a drain counts for any contact); [] when none.

    Tolerant: an unreadable record, or one of another shape, touches no one."""
    doc = decode_json(rec.value)
    if doc is None or not isinstance(doc.get("delta_id"), str):
        return []
    account, list_name = str(doc.get("account") or ""), str(doc.get("list_name") or "")
    segment_id = str(doc.get("segment_id") or "")
    if not flt.wants(account, list_name, segment_id):
        return []
    common: dict[str, Any] = dict(
        account=account, list_name=list_name, segment_id=segment_id,
        sync_task_id=doc.get("sync_task_id") if isinstance(doc.get("sync_task_id"), str) else None,
        replay_id=doc.get("replay_id") if isinstance(doc.get("replay_id"), str) else None,
        delta_id=doc["delta_id"], chunk=int(doc.get("chunk") or 1), chunks=int(doc.get("chunks") or 1),
        chunk_key=_chunk_key(doc), complete=doc.get("complete") is not False,
        emitted_at=_when(doc.get("emitted_at"), rec.timestamp_ms), partition=rec.partition, offset=rec.offset,
        written_ms=rec.timestamp_ms,
    )
    if doc.get("kind") == "drain":
        return [Seen(change="drain", contact=None, **common)]
    identity = _compared(doc.get("identity_field"), account, accounts or {})
    out: list[Seen] = []
    changes: tuple[Change, ...] = ("remove", "add")  # the sink plans removes first; the Delta contract: never both
    for change in changes:
        ids = doc.get(change)
        for recorded in ids if isinstance(ids, list) else ():
            if isinstance(recorded, str) and same_contact(asked, recorded, identity):
                out.append(Seen(change=change, contact=recorded, **common))
                break
    return out


def might_touch(value: bytes | None, asked: str) -> bool:
    """A cheap test before parsing: can this deltas record name the contact (or be a drain)?

    Never a false "no": the needle is the lower-cased id as JSON writes it, searched in the
    lower-cased record."""
    if value is None:
        return False
    text = value.decode("utf-8", "replace").lower()
    needle = orjson.dumps(normalise_email(asked)).decode()[1:-1]
    return needle in text or '"drain"' in text


@dataclass(frozen=True)
class Applied:
    """A sink's progress record for one chunk."""

    sink: str
    chunk_key: str
    applied_at: datetime | None
    dead_lettered: int
    discarded: bool = False  # the removal rail's hold was discarded: recorded as done, nothing sent


def applied_chunks(records: Iterable[Record], sink: str) -> dict[str, Applied]:
    """``chunk_key`` -> what ``sink`` recorded (the compacted topic's latest record per key)."""
    out: dict[str, Applied] = {}
    prefix = f"{sink}|".encode()
    for key, rec in latest_by_key(records).items():
        if not key.startswith(prefix):
            continue
        doc = decode_json(rec.value)
        if doc is None:
            continue
        chunk_key = key[len(prefix):].decode("utf-8", "replace")
        dead = doc.get("dead_lettered")
        out[chunk_key] = Applied(sink, chunk_key, _when(doc.get("applied_at"), rec.timestamp_ms),
                                 dead if isinstance(dead, int) and not isinstance(dead, bool) else 0,
                                 doc.get("discarded") is True)
    return out


@dataclass(frozen=True)
class DeadLetter:
    """A sink dead letter of the contact's change (or of a whole chunk holding it, or an unnamed bulk rejection)."""

    entry: str  # ``sink:<partition>:<offset>``, as ``heapsync dlq show`` takes it
    chunk_key: str
    at: datetime | None
    reason: str
    operation: str | None
    status: int | None
    response: str | None
    named: bool  # False: a bulk rejection that does not say which rows; the contact may be among them
    redrive: str | None = None  # ``redriven`` / ``failed`` once ``heapsync dlq redrive`` took it
    replay_id: str | None = None


def _short(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return text[:DETAIL_MAX_CHARS]


def dead_letters_of(entries: Iterable[tuple[str, Record, dict[str, Any]]], asked: str,
                    marks: Mapping[str, RedriveMark],
                    accounts: IdentityKeys | None = None) -> dict[str, list[DeadLetter]]:
    """``chunk_key`` -> the sink dead letters that concern the contact.

    ``entries``: (entry id, record, parsed doc) of the sink dead-letter topic, each read as a
    :class:`SinkDeadLetter` (one whose fields do not read is listed by ``heapsync dlq list``, by its
    reason, and names no contact here); ``marks``: the re-drive marks by ``<topic>|<partition>|<offset>``.
    A Cordial response is kept (cut short) only for the contact's own operation; a whole-chunk dead
    letter gives only its reason."""
    out: dict[str, list[DeadLetter]] = {}
    for entry_id, rec, doc in entries:
        letter = read_dead_letter("sink", doc)
        if not isinstance(letter, SinkDeadLetter):
            continue
        whole = letter.delta
        named = True
        if whole is not None:
            ids = [*(whole.get("add") or []), *(whole.get("remove") or [])]
            whole_identity = _compared(whole.get("identity_field"), whole.get("account"), accounts or {})
            if not any(isinstance(i, str) and same_contact(asked, i, whole_identity) for i in ids):
                continue
            chunk_key = _chunk_key(whole)
        elif isinstance(letter.contact_id, str):
            if not same_contact(asked, letter.contact_id, letter.identity_key):
                continue
            chunk_key = letter.chunk_key or _letter_chunk_key(letter)
        elif letter.operation == "import" and letter.rejected is not None:
            chunk_key, named = letter.chunk_key or _letter_chunk_key(letter), False
        else:
            continue
        mark = marks.get(mark_key(rec.topic, rec.partition, rec.offset))
        out.setdefault(chunk_key, []).append(DeadLetter(
            entry=entry_id, chunk_key=chunk_key, at=_when(None, rec.timestamp_ms), reason=letter.reason,
            operation=letter.operation, status=letter.status,
            response=_short(letter.response) if whole is None and named else None, named=named,
            redrive=mark.outcome if mark is not None else None,
            replay_id=mark.replay_id if mark is not None and mark.replay_id else None,
        ))
    return out


def _letter_chunk_key(letter: SinkDeadLetter) -> str:
    """The chunk a dead letter that does not carry its ``chunk_key`` came from (early sinks wrote none)."""
    return _chunk_key({"delta_id": letter.delta_id, "chunk": letter.chunk, "replay_id": letter.replay_id})


@dataclass(frozen=True)
class HeldState:
    """What the removal rail did with a chunk (issue 14 §1), from its compacted lists topic.

    ``state`` ``held`` (the rail stopped its delta: ``heapsync held release|discard`` decides; every
    chunk of a held delta is held with it, the first one checked by the rail, the others kept as its
    own) or ``waiting`` (kept behind a hold of another delta of its list) while the hold record is
    there; ``decided`` once it was deleted (the progress record then says applied, i.e. released, or
    discarded). ``decision``: an operator's release or discard the sink has not carried out yet. A
    decided hold is known only until the topic is compacted."""

    chunk_key: str
    state: Literal["held", "waiting", "decided"]
    at: datetime | None = None
    reason: str = ""
    hold: str = ""  # the held delta it belongs to (``heapsync held`` names it so)
    decision: Literal["release", "discard"] | None = None


def _rail_record(value: bytes | None, model: type[_M]) -> _M | None:
    """A lists-topic record as its contract model; None for one that does not read (it is skipped)."""
    doc = decode_json(value)
    return None if doc is None else read_tolerant(model, doc)


def held_states(records: Iterable[Record], sink: str) -> dict[str, HeldState]:
    """``chunk_key`` -> the rail's state, from the lists topic's records in order (keys
    ``<sink>|held|<chunk_key>``: a ``HeldChunk`` while held, a tombstone once decided;
    ``<sink>|decision|<hold>``: a ``HoldDecision`` until the sink carried it out).

    The sink writes chunks 2..N of a held delta as "waiting" (behind chunk 1, the one the rail
    checked); they are held with it, so they take its state and reason."""
    held_prefix, decision_prefix = f"{sink}|held|".encode(), f"{sink}|decision|".encode()
    out: dict[str, HeldState] = {}
    roles: dict[str, str] = {}  # chunk_key -> the role the sink wrote
    decisions: dict[str, HoldDecision] = {}
    for rec in records:
        if rec.key is None:
            continue
        if rec.key.startswith(decision_prefix):
            hold = rec.key[len(decision_prefix):].decode("utf-8", "replace")
            decision = _rail_record(rec.value, HoldDecision)
            if decision is None:
                decisions.pop(hold, None)  # carried out (a tombstone), or does not read
            else:
                decisions[hold] = decision
            continue
        if not rec.key.startswith(held_prefix):
            continue
        chunk_key = rec.key[len(held_prefix):].decode("utf-8", "replace")
        if rec.value is None:
            if chunk_key in out:
                out[chunk_key] = replace(out[chunk_key], state="decided")
            continue
        chunk = _rail_record(rec.value, HeldChunk)
        if chunk is None:
            continue
        roles[chunk_key] = chunk.role
        reason = chunk.reason if chunk.role == "held" else "behind a held delta of this list"
        at = chunk.held_at if chunk.held_at.tzinfo else chunk.held_at.replace(tzinfo=timezone.utc)
        out[chunk_key] = HeldState(chunk_key, chunk.role, at, reason, hold_id_of(chunk.delta))
    heads = {h.hold: h for key, h in out.items() if roles.get(key) == "held"}  # the chunk the rail checked
    for chunk_key, h in out.items():
        head = heads.get(h.hold)
        if roles.get(chunk_key) == "waiting" and head is not None:  # a later chunk of the held delta itself
            h = out[chunk_key] = replace(h, state="held" if h.state == "waiting" else h.state, at=head.at,
                                         reason=head.reason)
        decision = decisions.get(h.hold)
        if decision is not None and h.state == "held":
            out[chunk_key] = replace(h, decision=decision.action)
    return out


@dataclass(frozen=True)
class Step:
    """One row of the trace: a change of the contact in a list and what became of it."""

    seen: Seen
    outcome: Outcome
    at: datetime | None  # applied, dead-lettered, held, ... (None while pending)
    detail: str = ""
    dead_letter: str | None = None  # entry id for ``heapsync dlq show``
    redriven_as: str | None = None  # replay id of the re-drive

    def row(self) -> dict[str, Any]:
        s = self.seen
        return {
            "account": s.account, "list_name": s.list_name, "segment_id": s.segment_id, "change": s.change,
            "contact": s.contact, "sync_task_id": s.sync_task_id, "replay_id": s.replay_id, "delta_id": s.delta_id,
            "chunk": f"{s.chunk}/{s.chunks}", "complete": s.complete, "emitted_at": _iso(s.emitted_at),
            "partition": s.partition, "offset": s.offset, "outcome": self.outcome, "at": _iso(self.at),
            "detail": self.detail, "dead_letter": self.dead_letter, "redriven_as": self.redriven_as,
        }


def _dead_letter_step(seen: Seen, dls: list[DeadLetter], applied: Applied | None) -> Step | None:
    """A step for the contact's own dead letter; an unnamed bulk rejection only qualifies the applied step."""
    mine = [d for d in dls if d.named]
    if not mine:
        return None
    d = mine[-1]  # the chunk redone after a crash may dead-letter again: the last one counts
    why = d.reason + (f" (HTTP {d.status})" if d.status is not None else "") + (f": {d.response}" if d.response else "")
    if d.redrive == "redriven":
        why += f"; re-driven as replay {d.replay_id}" if d.replay_id else "; re-driven"
    elif d.redrive == "failed":
        why += "; a re-drive failed"
    return Step(seen, "dead-lettered", d.at or (applied.applied_at if applied else None), why, d.entry,
                d.replay_id if d.redrive == "redriven" else None)


def apply_order(seen: Iterable[Seen]) -> list[Seen]:
    """Per list, the order a sink meets the changes: offset order within a partition; changes of one
    list on different partitions (a producer that hashes the key differently, say) are merged by the
    time they reached the topic, keeping each partition's own order."""
    by_part: dict[tuple[str, str], dict[int, list[Seen]]] = {}
    for s in seen:
        by_part.setdefault(s.list_key, {}).setdefault(s.partition, []).append(s)
    out: list[Seen] = []
    for list_key in sorted(by_part):
        runs = []
        for _, run in sorted(by_part[list_key].items()):
            latest = 0  # a record never goes before its predecessor on the partition, whatever its clock said
            timed = []
            for s in sorted(run, key=lambda s: s.offset):
                latest = max(latest, s.written_ms)
                timed.append((latest, s))
            runs.append(timed)
        out.extend(s for _, s in heapq.merge(*runs, key=lambda t: t[0]))
    return out


def trace_steps(seen: Iterable[Seen], applied: Mapping[str, Applied],
                dead: Mapping[str, list[DeadLetter]] | None = None,
                held: Mapping[str, HeldState] | None = None) -> list[Step]:
    """Each change's outcome, per list (account, list name) in the order the sink applies them.

    The first copy of a chunk on the topic is the one applied; later copies are repeats the sink
    skipped (a replay or re-drive has its own ``chunk_key``, so it is a change of its own)."""
    dead, held = dead or {}, held or {}
    ordered = apply_order(seen)
    firsts: set[str] = set()
    steps: list[Step] = []
    for s in ordered:
        done = applied.get(s.chunk_key)
        first = s.chunk_key not in firsts
        firsts.add(s.chunk_key)
        if not first:
            steps.append(Step(s, "repeat", s.emitted_at, "a copy of a chunk already on the topic; the sink skips it"
                              if done else "a copy of a chunk already on the topic"))
            continue
        h = held.get(s.chunk_key)
        if done is None and not any(d.named for d in dead.get(s.chunk_key, [])):
            if h is not None and h.state != "decided":
                note = (f"; {h.decision} decided by an operator, not carried out yet (the sink does it in the "
                        "list's turn)" if h.decision else "")
                steps.append(Step(s, h.state, h.at, h.reason + note))
            else:
                steps.append(Step(s, "pending", None, "not applied yet: the sink has not reached it"))
            continue
        if done is not None and done.discarded:
            why = f"held ({h.reason}) and " if h is not None and h.reason else "held and "
            steps.append(Step(s, "discarded", done.applied_at, why + "discarded by an operator: nothing sent"))
            continue
        dl_step = _dead_letter_step(s, dead.get(s.chunk_key, []), done)
        if dl_step is not None:
            steps.append(dl_step)
            continue
        detail = "the list was emptied" if s.change == "drain" else ""
        unnamed = [d for d in dead.get(s.chunk_key, []) if not d.named]
        if unnamed:
            detail = (f"{unnamed[-1].reason}: Cordial's import rejected rows of this chunk without naming them; "
                      f"this contact may be among them ({unnamed[-1].entry})")
        if h is not None:
            held_since = f"held {_iso(h.at)}" if h.at else "held"
            detail = "; ".join(x for x in (f"{held_since} ({h.reason}), released" if h.reason else
                                           f"{held_since}, released", detail) if x)
        steps.append(Step(s, "applied", done.applied_at if done else None, detail))
    return steps


def membership(steps: Iterable[Step]) -> dict[tuple[str, str], bool | None]:
    """Per list: is the contact a member after the last change the sink applied (None: nothing applied)?

    Only what the trace saw: a change older than the deltas topic's retention is not known."""
    out: dict[tuple[str, str], bool | None] = {}
    for step in steps:
        out.setdefault(step.seen.list_key, None)
        if step.outcome == "applied":
            out[step.seen.list_key] = step.seen.change == "add"
    return out


def drains_of_traced_lists(seen: Iterable[Seen], flt: Filter = Filter()) -> list[Seen]:
    """Drains only of lists the contact appears in (or the list asked for): others say nothing about it."""
    seen = list(seen)
    touched = {s.list_key for s in seen if s.change != "drain"}
    return [s for s in seen if s.change != "drain" or s.list_key in touched or flt.list_name is not None]


@dataclass
class Trace:
    contact: str
    sink: str
    steps: list[Step] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        members = membership(self.steps)
        lists = []
        for (account, list_name), member in members.items():
            rows = [s.row() for s in self.steps if s.seen.list_key == (account, list_name)]
            lists.append({"account": account, "list_name": list_name, "member": member,
                          "partitions": sorted({r["partition"] for r in rows}), "steps": rows})
        return {"contact": self.contact, "sink": self.sink, "lists": lists}


def build(contact: str, sink: str, deltas: Iterable[Record], progress: Iterable[Record],
          dead: Iterable[tuple[str, Record, dict[str, Any]]], marks: Mapping[str, RedriveMark],
          flt: Filter = Filter(), held: Mapping[str, HeldState] | None = None,
          accounts: IdentityKeys | None = None) -> Trace:
    """The whole trace from records as read (pure: :func:`gather` reads them)."""
    seen = [s for rec in deltas if might_touch(rec.value, contact) for s in seen_in(rec, contact, flt, accounts)]
    seen = drains_of_traced_lists(seen, flt)
    steps = trace_steps(seen, applied_chunks(progress, sink), dead_letters_of(dead, contact, marks, accounts), held)
    return Trace(contact, sink, steps)


def gather(settings: Any, contact: str, *, sink: str = "cordial", flt: Filter = Filter()) -> Trace:
    """Read the topics and build the trace. Nothing about the contact is logged."""
    from heapsync.topic_reader import read_topic
    from heapsync_ops import dlq

    topics, bootstrap = settings.topics, settings.kafka_bootstrap
    entries = [(e.id, e.record, e.doc) for e in dlq.load(settings, ("sink",))]
    return build(contact, sink, read_topic(bootstrap, topics.deltas, idle_timeout=10.0),
                 read_topic(bootstrap, topics.sink_progress, idle_timeout=10.0), entries, dlq.load_marks(settings),
                 flt, load_held(settings, sink), identity_keys(settings))


def identity_keys(settings: Any) -> dict[str, Any]:
    """The accounts file's accounts, for their identity mapping; none when it cannot be read (the
    records' own fields then decide how ids compare)."""
    from heapsync.settings import AccountError

    try:
        return dict(settings.accounts())
    except AccountError:
        return {}


def load_held(settings: Any, sink: str) -> dict[str, HeldState]:
    """The removal rail's holds by ``chunk_key``, from ``<prefix>.sink.lists`` (none where there is no rail)."""
    from heapsync.topic_reader import read_topic

    topic = getattr(settings.topics, "sink_lists", None)
    if not isinstance(topic, str):
        return {}
    return held_states(read_topic(settings.kafka_bootstrap, topic, idle_timeout=10.0), sink)
