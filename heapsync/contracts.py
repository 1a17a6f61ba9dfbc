"""The data contracts, defined once: Heap's webhook payload, the records on
our topics, and the versioned delta that other consumers read.

Everything that crosses a process boundary is one of these models. The delta
model is published as JSON Schema (``heapsync/schemas/delta.v1.json``); a test
fails if the file and the model disagree.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

SYNC_ACTION = "segment.users.sync"
DRAIN_ACTION = "segment.users.drain"
KNOWN_ACTIONS = frozenset({SYNC_ACTION, DRAIN_ACTION})

NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]


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
# Records on our topics
# --------------------------------------------------------------------------


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


def signed_digest(ts: str, body: bytes) -> str:
    """SHA-256 (hex) of exactly what the HMAC covers: the ``ts`` as sent, then the raw body.

    Only the secret's holder can make a new one, so a captured request posted again, with any
    ``X-Request-Id`` or signature encoding, has the same digest. (``ts`` is all digits and a JSON
    object starts with ``{`` or whitespace, so the joint between them is never ambiguous.)
    """
    return hashlib.sha256(ts.encode() + body).hexdigest()


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
    """An operator's decision on a held delta (key ``<sink>|decision|<delta_id>``), written by
    ``heapsync held release|discard``; the sink carries it out, then deletes it."""

    schema_version: Literal[1] = 1
    sink: str
    delta_id: str
    account: str
    list_name: str
    action: Literal["release", "discard"]
    decided_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))


def delta_id_for(account: str, sync_key: str) -> str:
    """Same account and sync give the same id, on every run and replay."""
    return hashlib.sha256(f"{account}\x00{sync_key}".encode()).hexdigest()[:32]


def delta_json_schema() -> dict[str, Any]:
    return Delta.model_json_schema(mode="serialization")
