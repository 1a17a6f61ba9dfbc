"""The data contracts, defined once: Heap's webhook payload, the records on
our topics, and the versioned delta that other consumers read.

Every record on every topic is one of these models, with the builder of its key
next to it: pages and ticks, rejected requests, deltas, sink progress, the
assembler's and the sink's dead letters, re-drive marks, and the assembler's sync
metadata. Writers and readers go through them; where a model would cost on a hot
path (the ingress's page record, the worker's page decode, the per-page update of
sync metadata) the hand-tuned code says so and a test holds it to the model.
Records written by earlier versions still read (``tests/core/test_contracts_wire.py``).

Only the delta is published as JSON Schema (``heapsync/schemas/delta.v1.json``); a
test fails if the file and the model disagree.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from heapsync import dlq_parts, naming

SYNC_ACTION = "segment.users.sync"
DRAIN_ACTION = "segment.users.drain"
KNOWN_ACTIONS = frozenset({SYNC_ACTION, DRAIN_ACTION})

NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]
_T = TypeVar("_T", bound=BaseModel)


class _Lenient(BaseModel):
    """Heap may add fields at any time; unknown fields are kept, not rejected."""

    model_config = ConfigDict(extra="allow", frozen=True)


# --------------------------------------------------------------------------
# Heap's webhook payload (docs/design.md, "Heap's request")
# --------------------------------------------------------------------------


class FieldValue(_Lenient):
    id: NonEmptyStr
    display_name: str | None = None


class CustomerField(_Lenient):
    field_id: NonEmptyStr
    value: FieldValue
    field_display_name: str | None = None
    field_type: str | None = None


class CustomerConfig(_Lenient):
    fields: list[CustomerField]

    def identity_field(self) -> str:
        """The user property whose values are the ids in add/remove (e.g. ``email``).

        Heap sends it as the field of type ``identity_mapping``; when no field says
        so, the first field is the best guess, since Heap sends only one today.
        """
        for f in self.fields:
            if f.field_type == "identity_mapping":
                return f.value.id
        if not self.fields:
            return "email"
        return self.fields[0].value.id


class Segment(_Lenient):
    # An integer in Heap's OpenAPI spec, a string in the seed: accept both, keep a string.
    id: NonEmptyStr
    name: str

    @field_validator("id", mode="before")
    @classmethod
    def _id_as_string(cls, v: Any) -> Any:
        if isinstance(v, bool):
            return v  # let pydantic reject it
        if isinstance(v, int):
            return str(v)
        return v


MAX_TOTAL_PAGES = 100_000
"""Most pages one sync may announce (``total_pages``, hence ``page_number``); more is a 400.

The assembler keeps a digest per page and lists missing pages, both sized by ``total_pages``:
at 100,000 pages a done marker is ~2 MB and a partial delta's ``missing_pages`` ~0.7 MB, well
under a 16 MiB record. Even at 100 ids a page that is 10 million members.
"""


class SyncInfo(_Lenient):
    page_number: Annotated[int, Field(ge=1, le=MAX_TOTAL_PAGES, strict=True)]
    total_pages: Annotated[int, Field(ge=1, le=MAX_TOTAL_PAGES, strict=True)]
    sync_task_id: NonEmptyStr

    @model_validator(mode="after")
    def _page_in_range(self) -> SyncInfo:
        if self.page_number > self.total_pages:
            raise ValueError(
                f"page_number {self.page_number} is greater than total_pages {self.total_pages}"
            )
        return self


class Member(_Lenient):
    id: NonEmptyStr


class SyncData(_Lenient):
    segment: Segment
    sync_info: SyncInfo
    add: list[Member] | None = None
    remove: list[Member] | None = None

    @model_validator(mode="after")
    def _has_changes(self) -> SyncData:
        # Heap's reference rejects a sync only when both lists are missing.
        if self.add is None and self.remove is None:
            raise ValueError("a sync needs at least one of 'add' or 'remove'")
        return self


class DrainData(_Lenient):
    segment: Segment


class HeapEnvelope(_Lenient):
    """The fields every Heap request carries, whatever its action type."""

    action_type: NonEmptyStr
    customer_config: CustomerConfig
    id_token: str | None = None
    data: dict[str, Any] | None = None


class HeapSync(HeapEnvelope):
    action_type: Literal["segment.users.sync"]
    data: SyncData  # type: ignore[assignment]


class HeapDrain(HeapEnvelope):
    action_type: Literal["segment.users.drain"]
    data: DrainData  # type: ignore[assignment]


HeapPayload = HeapSync | HeapDrain


def parse_heap_payload(raw: bytes | str) -> HeapSync | HeapDrain | HeapEnvelope:
    """Validate a request body; an unknown action type comes back as a bare envelope.

    Raises ``pydantic.ValidationError`` (with field paths) on invalid JSON or schema.
    """
    envelope = HeapEnvelope.model_validate_json(raw)
    if envelope.action_type == SYNC_ACTION:
        return HeapSync.model_validate_json(raw)
    if envelope.action_type == DRAIN_ACTION:
        return HeapDrain.model_validate_json(raw)
    return envelope


# --------------------------------------------------------------------------
# Records on our topics: what they share
#
# One section per topic below: the record's model, the key it is written under
# (a key builder), and how it is written and read. Readers of operator-facing
# records (dead letters, marks, progress, sync metadata) are tolerant: a newer
# writer may add fields (kept, ``extra="allow"``) and a record of an older writer
# lacks some (defaults), so every record ever written still reads.
# --------------------------------------------------------------------------


class _Tolerant(BaseModel):
    """A record read by operator tools: unknown fields kept, missing ones defaulted."""

    model_config = ConfigDict(extra="allow")

    def encode(self) -> bytes:
        """The fields the writer set, as compact JSON: the bytes the earlier dict writers made."""
        return orjson.dumps(self.model_dump(mode="json", exclude_unset=True))


def decode_json(raw: bytes | str | None) -> dict[str, Any] | None:
    """A record's value as a JSON object, or None when it is not one (readers then skip or list it as
    unreadable)."""
    if raw is None:
        return None
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def read_tolerant(model: type[_T], doc: dict[str, Any]) -> _T | None:
    """``doc`` as ``model``, or None when a field has the wrong type (the caller skips the record)."""
    try:
        return model.model_validate(doc)
    except ValidationError:
        return None


# --------------------------------------------------------------------------
# Pages topic (``<prefix>.pages``): PageRecord, and the worker's timer ticks
# --------------------------------------------------------------------------


def pages_key(account: str, segment_id: str) -> bytes:
    """All pages and syncs of one segment go to one partition, in order."""
    return f"{account}:{segment_id}".encode()


class PageRecord(BaseModel):
    """One accepted Heap request on the pages topic: who sent it, when, and the body as received."""

    model_config = ConfigDict(frozen=True)

    schema_version: Literal[1] = 1
    account: str
    request_id: str
    received_at: datetime
    payload: dict[str, Any]
    replay_id: str | None = Field(
        None, description="Set by `heapsync replay`: the assembler treats the page as part of a fresh sync."
    )
    signed_digest: str | None = Field(
        None, description="Set for a drain: `signed_digest` of its Heap-Hash ts and body, the drain's identity "
        "(X-Request-Id is not signed). Records written before the field name a drain by request_id."
    )


def page_record_bytes(account: str, request_id: str, received_at: datetime, body: bytes,
                      signed_digest: str | None = None) -> bytes:
    """A ``PageRecord`` as JSON, with the already-validated raw body embedded as ``payload``.

    Equal to ``PageRecord(...).model_dump_json()`` when read back, without re-serialising a body of
    thousands of ids (hand-tuned: the ingress's hot path; ``tests/ingest/test_app.py`` checks it).
    ``signed_digest`` (drains) is written only when set, so a sync's record is as before.
    """
    head = orjson.dumps({"schema_version": 1, "account": account, "request_id": request_id,
                         "received_at": received_at, "replay_id": None,
                         **({"signed_digest": signed_digest} if signed_digest else {})})
    return head[:-1] + b',"payload":' + body + b"}"


class Tick(BaseModel):
    """A timer tick: the worker's leader sends one into every pages partition (no key), so that the
    partition's owner times out open syncs in order with the pages."""

    model_config = ConfigDict(frozen=True)

    control: Literal["tick"] = "tick"


TICK: bytes = b'{"control":"tick"}'
"""``Tick().model_dump_json()``, as bytes: compared as bytes on every pages record (no parse)."""


def is_tick(raw: bytes) -> bool:
    """Ticks share the pages topic so they are handled in order with the pages."""
    return raw == TICK


def signed_digest(ts: str, body: bytes) -> str:
    """SHA-256 (hex) of exactly what the HMAC covers: the ``ts`` as sent, then the raw body.

    Only the secret's holder can make a new one, so a captured request posted again, with any
    ``X-Request-Id`` or signature encoding, has the same digest. (``ts`` is all digits and a JSON
    object starts with ``{`` or whitespace, so the joint between them is never ambiguous.)
    """
    return hashlib.sha256(ts.encode() + body).hexdigest()


# --------------------------------------------------------------------------
# Rejected topic (``<prefix>.pages.rejected``): the first of the three dead-letter kinds
# --------------------------------------------------------------------------


def rejected_key(account: str) -> bytes:
    return account.encode()


class RejectedRecord(BaseModel):
    """A signed request we could not take, kept so someone can inspect and re-drive it."""

    schema_version: Literal[1] = 1
    account: str
    request_id: str
    received_at: datetime
    reason: str
    errors: list[dict[str, Any]] = Field(default_factory=list)
    headers: dict[str, str] = Field(default_factory=dict)
    body: str
    body_base64: str | None = Field(None, description="The exact body bytes, set only when they are not UTF-8.")
    body_truncated: bool = Field(False, description="True when the body was cut to fit a Kafka record.")

    def exact_body(self) -> bytes | str:
        """The exact bytes of the request, or why they cannot be had.

        ``body`` is text (bytes that are not UTF-8 are replaced in it); ``body_base64``, when set,
        holds the bytes as received and wins. A body cut to fit a record is not the request.
        """
        if self.body_truncated:
            return ("the body was cut to fit a record when it was kept (the request was larger): "
                    "it is not the request Heap sent and cannot be re-driven; Heap's next sync sends it again")
        if self.body_base64 is not None:
            try:
                return base64.b64decode(self.body_base64, validate=True)
            except (binascii.Error, ValueError):
                return "body_base64 is not valid base64: the exact body is lost"
        return self.body.encode()

    # what every dead-letter kind answers (read_dead_letter)
    @property
    def counted_once(self) -> bool:
        return True  # never written in parts

    @property
    def list_of(self) -> str | None:
        return None

    @property
    def account_name(self) -> str | None:
        return self.account

    def split_note(self) -> str:
        return ""

    def summary(self) -> str:
        return f"request {self.request_id}"


# --------------------------------------------------------------------------
# The delta: the public contract of the deltas topic
# --------------------------------------------------------------------------

DELTA_SCHEMA_VERSION = 1


class Delta(BaseModel):
    """The net change of one Heap sync for one Cordial list, possibly one chunk of it.

    Consumers may see a chunk more than once (at-least-once delivery): the pair
    (``delta_id``, ``chunk``) identifies it. Applying chunks of one list in order
    gives the list the sync describes. Every id appears once across all chunks of a
    delta, in ``add`` or in ``remove``, never both.
    """

    model_config = ConfigDict(
        frozen=True,
        json_schema_extra={"$id": "https://heapsync.invalid/schemas/delta.v1.json"},
    )

    schema_version: Literal[1] = Field(1, description="Bumped on any incompatible change.")
    delta_id: str = Field(description="Deterministic: hash of account and sync_task_id (or drain key).")
    account: str = Field(description="heapsync account id (the {accountId} of the webhook URL).")
    segment_id: str
    segment_name: str
    list_name: str = Field(description="Cordial list name: the segment name with all whitespace removed.")
    identity_field: str = Field(description="The Heap user property the ids are values of, e.g. 'email'.")
    kind: Literal["sync", "drain"] = Field(description="'drain' means: empty the list.")
    sync_task_id: str | None = None
    complete: bool = Field(True, description="False when the sync timed out with pages missing.")
    total_pages: int = 0
    missing_pages: list[int] = Field(default_factory=list)
    chunk: int = Field(1, ge=1, description="1-based index of this chunk.")
    chunks: int = Field(1, ge=1, description="How many chunks the delta has.")
    add: list[str] = Field(default_factory=list, description="Ids that must be members of the list.")
    remove: list[str] = Field(default_factory=list, description="Ids that must not be members.")
    replay_id: str | None = Field(None, description="Set when the chunk was re-driven by `heapsync replay`.")
    emitted_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def chunk_key(self) -> str:
        """Identifies a chunk across repeats; a replay is a new application, so it has its own key."""
        base = f"{self.delta_id}:{self.chunk}"
        return f"{base}@{self.replay_id}" if self.replay_id else base

    @property
    def list_key(self) -> str:
        """``<account>:<list_name>`` (:func:`list_key`)."""
        return list_key(self.account, self.list_name)


def list_key(account: str, list_name: str) -> str:
    """``<account>:<list_name>``: the deltas topic's record key (one list's chunks stay in order in one
    partition) and the sink's lane."""
    return f"{account}:{list_name}"


def delta_key(delta: Delta) -> bytes:
    """The deltas-topic key of a chunk."""
    return list_key(delta.account, delta.list_name).encode()


# --------------------------------------------------------------------------
# Sink progress topic (``<prefix>.sink.progress``, compacted)
# --------------------------------------------------------------------------


def progress_key(sink: str, chunk_key: str) -> str:
    """``<sink>|<chunk_key>``: one record per sink and chunk, the latest kept by compaction."""
    return f"{sink}|{chunk_key}"


class AppliedChunk(BaseModel):
    """Progress record of a sink (topic ``<prefix>.sink.progress``, compacted, key ``<sink>|<chunk_key>``).

    Written after a chunk is applied; sinks read it back to recognise repeats,
    ``heapsync status`` and the status page read it to show what was applied.
    """

    sink: str
    chunk_key: str
    delta_id: str
    chunk: int
    chunks: int
    account: str
    list_name: str
    segment_id: str
    sync_task_id: str | None
    kind: Literal["sync", "drain"]
    complete: bool
    adds: int
    removes: int
    dead_lettered: int = 0
    applied_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    discarded: bool = Field(False, description="True when an operator discarded the chunk held by the removal rail "
                            "(`heapsync held discard`): recorded so a redelivery is not applied, but nothing was sent.")


# --------------------------------------------------------------------------
# The removal rail: per-list state of a sink (topic ``<prefix>.sink.lists``, compacted)
# --------------------------------------------------------------------------


class ListCount(BaseModel):
    """Members of one list as counted from what the sink applied (key ``<sink>|count|<account>|<list>``).

    An estimate: adds of contacts already in the list and removes of absent ones are counted too.
    """

    schema_version: Literal[1] = 1
    sink: str
    account: str
    list_name: str
    members: int = Field(ge=0)
    writer: str = Field("", description="The sink process that wrote it (it ignores its own records when tailing).")
    updated_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))


class HeldChunk(BaseModel):
    """A delta chunk the sink did not apply (key ``<sink>|held|<chunk_key>``; a tombstone once decided).

    ``role`` "held": the first chunk of a delta the removal rail stopped (``reason`` says why);
    "waiting": a later chunk of that list, kept behind the hold so the list's changes stay in order.
    """

    schema_version: Literal[1] = 1
    sink: str
    role: Literal["held", "waiting"]
    seq: int = Field(description="Order of the list's held and waiting chunks (nanoseconds when first held).")
    reason: str = ""
    members: int | None = Field(None, description="The list's counted members when the rail held it.")
    removes: int = Field(0, description="Removes the rail counted for the whole delta (a drain: the members).")
    max_removal_fraction: float | None = None
    hold_drains: bool = False
    partition: int = Field(description="Partition of the deltas topic the chunk came from (its owner resolves it).")
    offset: int
    writer: str = ""
    held_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    delta: Delta


class HoldDecision(BaseModel):
    """An operator's decision on a held delta (key ``<sink>|decision|<delta_id>``, or
    ``<sink>|decision|<delta_id>@<replay_id>`` for a replayed copy), written by
    ``heapsync held release|discard``; the sink carries it out, then deletes it."""

    schema_version: Literal[1] = 1
    sink: str
    delta_id: str
    replay_id: str | None = Field(None, description="The replayed copy decided on; None: the original delta.")
    account: str
    list_name: str
    action: Literal["release", "discard"]
    decided_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))


def delta_id_for(account: str, sync_key: str) -> str:
    """Same account and sync give the same id, on every run and replay."""
    return hashlib.sha256(f"{account}\x00{sync_key}".encode()).hexdigest()[:32]


def delta_json_schema() -> dict[str, Any]:
    return Delta.model_json_schema(mode="serialization")


# --------------------------------------------------------------------------
# Dead letters: what the three dead-letter topics share
# --------------------------------------------------------------------------


class SplitInfo(_Tolerant):
    """Set on a part of a dead letter too large for one record (``heapsync/dlq_parts.py``)."""

    group: str = ""
    part: int
    parts: int
    bytes: int | None = None
    found: list[int] | None = Field(None, description="Set by the reader on a group it could not join.")


class DeadLetterHead(_Tolerant):
    """What every dead letter has (its ``reason``, and ``split`` for a part); also what a dead letter
    whose other fields do not read is listed as."""

    reason: str = "unknown"
    split: SplitInfo | None = None
    data: str | None = Field(None, description="A part's slice of the whole record, base64.")
    incomplete: str | None = Field(None, description="Set by the reader: why a split dead letter cannot be joined.")

    @field_validator("reason", mode="before")
    @classmethod
    def _reason_text(cls, v: Any) -> Any:
        return "unknown" if v is None or v == "" else str(v)

    @property
    def counted_once(self) -> bool:
        """False for the second and later parts of a split dead letter: it counts once, by its first part."""
        return self.split is None or self.split.part == 1

    @property
    def account_name(self) -> str | None:
        return None

    @property
    def list_of(self) -> str | None:
        return None

    def summary(self) -> str:
        return ""

    def split_note(self) -> str:
        """For a split dead letter that could not be joined: how many of its parts were found."""
        if self.incomplete is None or self.split is None:
            return ""
        return f" (in {self.split.parts} parts, {len(self.split.found or [])} found)"


# --------------------------------------------------------------------------
# Assembler dead letters (``<prefix>.deltas.dlq``), key: the sync key
# --------------------------------------------------------------------------


def sync_key(account: str, kind: str, ref: str, replay_id: str | None) -> str:
    """Key of one assembly in the assembler's state tables, and the ``sync`` of its dead letters.

    ``account|kind|replay_id|ref``: the account and kind hold no ``|``, replay ids are
    generated (no ``|``), and the sync id, any string per Heap, comes last, so no two
    syncs share a key, and the key ends with the sync id (``heapsync status`` shows it).
    A replay is assembled apart from the original.
    """
    return f"{account}|{kind}|{replay_id or ''}|{ref}"


def account_of_sync_key(key: str) -> str | None:
    """The account a sync key names; None for the ``partition-<n>`` key of an unreadable record."""
    return key.split("|", 1)[0] if "|" in key else None


LATE_PAGE = "late page for an emitted sync"
TIMED_OUT = "sync timed out with pages missing"
UNREADABLE_PAGE = "unreadable pages record"
UNKNOWN_ACTION = "unknown action type"


class HeldPage(_Tolerant):
    """A page of a timed-out sync, as the assembler stored it."""

    add: list[str] = Field(default_factory=list)
    remove: list[str] = Field(default_factory=list)
    conflicts: int = 0


class AssemblerDeadLetter(DeadLetterHead):
    """What the assembler gave up on. The reason says which fields are set:

    - ``TIMED_OUT`` (policy ``dead-letter``): the sync and the pages that did arrive (``pages``);
    - ``LATE_PAGE``: counts of a page for a sync already emitted, and the whole pages ``record``
      (added by the worker, so the page can be re-driven);
    - ``UNREADABLE_PAGE`` / ``UNKNOWN_ACTION``: the pages record as text (``value``), with the
      validation ``errors``; ``sync`` is ``partition-<n>``.
    """

    sync: str = Field("", description="The sync key, or partition-<n> for a record that names no sync.")
    account: str | None = None
    segment_id: str | None = None
    segment_name: str | None = None
    list_name: str | None = Field(None, description="The list the sync was for (a pinned name too); a timed-out "
                                  "sync's letters from before it name none: the segment name gives it.")
    identity_field: str | None = None
    replay_id: str | None = None
    sync_task_id: str | None = None
    total_pages: int | None = None
    missing_pages: list[int] | None = None
    pages: dict[str, HeldPage] | None = None
    page_number: int | None = None
    adds: int | None = None
    removes: int | None = None
    sync_emitted_at: float | None = Field(None, description="Epoch seconds the sync went out without this content.")
    record: dict[str, Any] | None = Field(None, description="The whole pages record of a late page.")
    page: dict[str, Any] | None = Field(None, description="What early writers called ``record``.")
    errors: list[dict[str, Any]] | None = None
    value: str | None = None

    @classmethod
    def timed_out(cls, sync: str, *, account: str, segment_id: str, segment_name: str, identity_field: str,
                  replay_id: str | None, sync_task_id: str, total_pages: int, missing_pages: list[int],
                  pages: dict[str, HeldPage], list_name: str, sync_emitted_at: float) -> AssemblerDeadLetter:
        return cls(reason=TIMED_OUT, sync=sync, account=account, segment_id=segment_id, segment_name=segment_name,
                   identity_field=identity_field, replay_id=replay_id, sync_task_id=sync_task_id,
                   total_pages=total_pages, missing_pages=missing_pages, pages=pages, list_name=list_name,
                   sync_emitted_at=sync_emitted_at)

    @classmethod
    def late_page(cls, sync: str, *, page_number: int, total_pages: int, sync_task_id: str, segment_id: str,
                  segment_name: str, adds: int, removes: int, sync_emitted_at: float | None) -> AssemblerDeadLetter:
        return cls(reason=LATE_PAGE, sync=sync, page_number=page_number, total_pages=total_pages,
                   sync_task_id=sync_task_id, segment_id=segment_id, segment_name=segment_name, adds=adds,
                   removes=removes, sync_emitted_at=sync_emitted_at)

    @classmethod
    def unreadable(cls, partition: int, value: str, errors: Sequence[Mapping[str, Any]] | None = None,
                   reason: str = UNREADABLE_PAGE) -> AssemblerDeadLetter:
        letter = cls(reason=reason, sync=f"partition-{partition}", value=value)
        if errors is not None:
            letter.errors = [dict(e) for e in errors]  # set only when given: an unknown action type's has none
        return letter

    @property
    def account_name(self) -> str | None:
        return self.account or account_of_sync_key(self.sync)

    @property
    def list_of(self) -> str | None:
        """The list the letter is for: the one it names, else its segment's (the name without whitespace)."""
        if self.list_name is not None:
            return self.list_name
        return naming.list_name(self.segment_name) if self.segment_name is not None else None

    @property
    def page_record(self) -> dict[str, Any] | None:
        """The whole pages record a dead letter carries (a late page), under either name."""
        return self.record if self.record is not None else self.page

    def held_pages(self) -> dict[int, HeldPage] | None:
        """A timed-out sync's pages by number; None when the letter holds none."""
        if self.pages is None:
            return None
        return {int(n): p for n, p in self.pages.items() if n.isdigit()}

    def records(self, max_bytes: int = dlq_parts.PART_MAX_BYTES) -> list[tuple[bytes, bytes]]:
        """``(key, value)`` records for the dead-letter topic, none over ``max_bytes``: a dead letter
        too large for one record (a timed-out sync of many big pages) is split, not refused by the
        broker, which would stall the partition (see ``heapsync/dlq_parts.py``)."""
        return dlq_parts.split(dlq_parts.record_key(self.sync), self.encode(), max_bytes)

    def summary(self) -> str:
        text = f"sync {self.sync_task_id or self.sync}"
        if self.pages:
            text += f", {len(self.pages)} pages held"
        if self.page_number is not None:
            text += f", page {self.page_number}"
        return text


# --------------------------------------------------------------------------
# Sink dead letters (``<prefix>.sink.dlq``), key: the delta id
# --------------------------------------------------------------------------


class SinkDeadLetter(DeadLetterHead):
    """What a sink could not apply: one failed operation (with the chunk it came from), a rejected
    import row, a whole delta (unknown account) or an unreadable deltas record (``value``)."""

    sink: str = "?"
    # the chunk (sinks.operations.delta_ref); no contact ids but ``contact_id`` below
    delta_id: str | None = None
    chunk: int | None = None
    chunks: int | None = None
    chunk_key: str | None = None
    account: str | None = None
    list_name: str | None = None
    segment_id: str | None = None
    segment_name: str | None = None
    identity_field: str | None = None
    sync_task_id: str | None = None
    replay_id: str | None = None
    # one operation
    operation: str | None = Field(None, description="add, remove, clear, or import (a rejected import row).")
    contact_id: Any = Field(None, description="The id the operation was for (an import row may hold any JSON).")
    identity_key: str | None = None
    status: int | None = None
    response: Any = None
    job_id: str | None = None
    row: dict[str, Any] | None = None
    rejected: int | None = None
    # a whole delta dead-lettered as it was
    delta: dict[str, Any] | None = None
    # an unreadable deltas record
    partition: int | None = None
    offset: int | None = None
    errors: list[dict[str, Any]] | None = None
    value: str | None = None

    @property
    def account_name(self) -> str | None:
        return self.account or _str_of(self.delta, "account")

    @property
    def list_of(self) -> str | None:
        """The list the letter is about: its own ``list_name`` or its delta's."""
        return self.list_name or _str_of(self.delta, "list_name")

    def summary(self) -> str:
        if self.operation:
            return f"{self.operation} on list {self.list_name or '?'}"
        return f"delta {self.delta_id or '?'} chunk {self.chunk or '?'}"


def _str_of(doc: dict[str, Any] | None, key: str) -> str | None:
    value = (doc or {}).get(key)
    return value if isinstance(value, str) else None


DeadLetterSource = Literal["rejected", "assembler", "sink"]
AnyDeadLetter = RejectedRecord | AssemblerDeadLetter | SinkDeadLetter | DeadLetterHead
_DEAD_LETTER_MODELS: dict[str, type[RejectedRecord] | type[AssemblerDeadLetter] | type[SinkDeadLetter]] = {
    "rejected": RejectedRecord, "assembler": AssemblerDeadLetter, "sink": SinkDeadLetter}


def read_dead_letter(source: DeadLetterSource, doc: dict[str, Any]) -> AnyDeadLetter:
    """A dead-letter record as its topic's model. One whose fields do not read (a wrong type) is
    still listed, by its reason: a :class:`DeadLetterHead`."""
    letter = read_tolerant(_DEAD_LETTER_MODELS[source], doc) or read_tolerant(DeadLetterHead, doc)
    if letter is not None:
        return letter
    reason = doc.get("reason")
    return DeadLetterHead(reason=reason if isinstance(reason, str) and reason else "unreadable dead-letter record")


# --------------------------------------------------------------------------
# Re-drive marks (``<prefix>.dlq.redrive``, compacted), key: the entry's place
# --------------------------------------------------------------------------


def mark_key(topic: str, partition: int, offset: int) -> str:
    """``<dlq topic>|<partition>|<offset>``: one mark per dead-letter record, the latest kept."""
    return f"{topic}|{partition}|{offset}"


class RedriveMark(_Tolerant):
    """What ``heapsync dlq redrive`` did with one entry; ``redriven`` entries are skipped next time."""

    entry: str = Field("", description="The entry id, <source>:<partition>:<offset>.")
    outcome: str = Field("pending", description="redriven or failed.")
    detail: str = ""
    replay_id: str | None = None
    at: datetime | None = None


def read_mark(value: bytes | None) -> RedriveMark | None:
    """A re-drive mark; None for a tombstone (the mark was deleted) or a record that does not read."""
    doc = decode_json(value)
    return None if doc is None else read_tolerant(RedriveMark, doc)


# --------------------------------------------------------------------------
# Sync metadata (the worker's ``syncs`` table, changelog ``<processor group>-syncs-changelog``)
# --------------------------------------------------------------------------


class SyncMeta(_Tolerant):
    """An open sync or drain, as the assembler keeps it (key: its sync key, JSON-encoded by Faust).

    The assembler writes it once per sync (:meth:`table_value`) and then updates ``received`` and
    ``total_pages`` in the plain dict on every page (its hot path: no model per page); ``heapsync
    status`` reads it here. Early workers kept ``received`` as a list of page numbers: read as its count.
    """

    account: str | None = None
    kind: Literal["sync", "drain"] = "sync"
    ref: str | None = Field(None, description="The sync_task_id, or the drain's identity.")
    replay_id: str | None = None
    segment: str | None = Field(None, description="The segment key.")
    segment_id: str | None = None
    segment_name: str | None = None
    identity_field: str | None = None
    announced: int = Field(0, description="total_pages of the first page seen.")
    total_pages: int = Field(0, description="The largest total_pages seen.")
    received: int = 0
    partition: int = 0
    started_at: float | None = None

    @field_validator("received", mode="before")
    @classmethod
    def _count_pages(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple, set)):
            return len(set(v))
        return v

    def table_value(self) -> dict[str, Any]:
        """The dict the ``syncs`` table holds."""
        return self.model_dump()


# --------------------------------------------------------------------------
# Done markers (the worker's ``done`` table, changelog ``<processor group>-done-changelog``)
# --------------------------------------------------------------------------

DONE_OUTCOMES = ("delta", "dead-letter", "disabled")
"""What the assembler did with an emitted sync: a delta sent, a dead letter, or nothing (segment disabled)."""


class DoneMarker(_Tolerant):
    """What became of an emitted sync (key: its sync key, JSON-encoded by Faust), so a late page of it is
    recognised; ``heapsync status`` counts the syncs skipped for a disabled segment from it.

    The assembler writes it as a plain dict once per sync (its keys are these fields); the first workers
    wrote ``true`` (no details), read as a marker with nothing set.
    """

    at: float | None = Field(None, description="Epoch seconds the sync was emitted.")
    complete: bool = True
    digests: list[str | None] = Field(default_factory=list, description="Per page (1-based), its content "
                                      "digest; None for a page that never arrived.")
    outcome: str | None = Field(None, description="One of DONE_OUTCOMES; markers from before it name none.")
    segment_id: str | None = Field(None, description="Set with outcome 'disabled'.")

    @field_validator("segment_id", mode="before")
    @classmethod
    def _segment_id_as_string(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


def read_done_marker(value: bytes | None) -> DoneMarker | None:
    """A done marker; None for a tombstone (pruned after the pages' retention) or a record that does not read."""
    if value is None:
        return None
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if doc is True:
        return DoneMarker()  # the first workers' marker
    if not isinstance(doc, dict):
        return None
    marker = read_tolerant(DoneMarker, doc)
    if marker is None and "digests" in doc:
        # only the assembler reads the digests: another shape of them must not hide the outcome from status
        marker = read_tolerant(DoneMarker, {k: v for k, v in doc.items() if k != "digests"})
    return marker
