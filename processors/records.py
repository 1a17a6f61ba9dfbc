"""Reading the pages topic: one record's bytes -> the page the assembler needs, parsed once.

The ingress writes a :class:`heapsync.contracts.PageRecord` whose ``payload`` is
the Heap body as received. Here the record and its payload are validated in a
single pass from the raw bytes (pydantic-core parses the JSON), instead of
parsing the record, re-serialising the payload and parsing it again.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Tag

from heapsync.contracts import DRAIN_ACTION, SYNC_ACTION, HeapDrain, HeapEnvelope, HeapSync

TICK = b'{"control":"tick"}'


def _action_tag(value: Any) -> str:
    action = value.get("action_type") if isinstance(value, dict) else getattr(value, "action_type", None)
    if action == SYNC_ACTION:
        return "sync"
    if action == DRAIN_ACTION:
        return "drain"
    return "other"


AnyPayload = Annotated[
    Union[
        Annotated[HeapSync, Tag("sync")],
        Annotated[HeapDrain, Tag("drain")],
        Annotated[HeapEnvelope, Tag("other")],
    ],
    Discriminator(_action_tag),
]


class IncomingPage(BaseModel):
    """A PageRecord with its payload already validated as the Heap request it carries."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    account: str
    request_id: str
    payload: AnyPayload
    replay_id: str | None = None


def is_tick(raw: bytes) -> bool:
    """Timer ticks share the pages topic so they are handled in order with the pages."""
    return raw == TICK


def parse_record(raw: bytes) -> IncomingPage:
    """Raises ``pydantic.ValidationError`` when the record is not a readable PageRecord."""
    return IncomingPage.model_validate_json(raw)
