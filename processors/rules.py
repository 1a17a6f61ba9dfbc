"""The membership rules, as pure functions over plain data.

How a sync becomes a delta:

1. ``page_changes``: a page's adds and removes; an id in both is a conflict and
   is left out of that page.
2. ``net_changes``: pages applied in page order; an id's last appearance wins.
3. ``chunk_changes``: the net changes cut into chunks of at most N ids, in a
   deterministic order, so the same sync always gives the same chunks.
4. the Cordial list is named by ``heapsync.naming.list_name``: the segment name with whitespace removed.

Plus the small decisions around them: how a page is stored (``encode_page``),
how a repeat is recognised (``digest``), which pages are missing, and the
expected page count when pages disagree on ``total_pages``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import orjson

ADD = "add"
REMOVE = "remove"


@dataclass(frozen=True)
class PageChanges:
    """One page's effective changes, conflicts removed, each list free of repeats, in the order sent."""

    add: tuple[str, ...]
    remove: tuple[str, ...]
    conflicts: int = 0

    def encode(self) -> bytes:
        """Compact, deterministic bytes: what the pages table stores (one write per page)."""
        return orjson.dumps([list(self.add), list(self.remove), self.conflicts])

    def digest(self) -> str:
        """Content fingerprint, to tell an exact repeat from a repeat with other ids (or another order)."""
        return digest(self.encode())


def digest(encoded_page: bytes) -> str:
    """Fingerprint of an encoded page; equal for equal content, whatever the order ids came in."""
    return hashlib.blake2b(encoded_page, digest_size=8).hexdigest()


def decode_page(raw: bytes) -> PageChanges:
    add, remove, conflicts = orjson.loads(raw)
    return PageChanges(tuple(add), tuple(remove), conflicts)


def page_changes(add: Iterable[str], remove: Iterable[str]) -> PageChanges:
    """A page's changes; an id in both lists of one page is a conflict and is left out of the page.

    Ids keep the order Heap sent them (first occurrence; repeats dropped): a stored page, and
    so the delta, is deterministic, without a per-page sort (sorting 1,000 ids per page cost
    ~8% of the worker's CPU; the assembler benchmark went ~10% faster without it).
    """
    adds, removes = dict.fromkeys(add), dict.fromkeys(remove)
    conflicts = adds.keys() & removes.keys() if adds and removes else set()
    for both in conflicts:
        del adds[both], removes[both]
    return PageChanges(add=tuple(adds), remove=tuple(removes), conflicts=len(conflicts))


@dataclass
class NetChanges:
    """A sync's net change: each id once, in ``add`` or ``remove``, in a deterministic order."""

    add: list[str] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.add) + len(self.remove)


def net_changes(pages: Mapping[int, PageChanges] | Sequence[tuple[int, PageChanges]]) -> NetChanges:
    """Apply pages in page-number order; an id's last appearance wins.

    Ids come out in the order they first appear (page order, then each page's
    sorted order): deterministic for the same pages, with no global sort of a
    possibly million-id sync.
    """
    items = sorted(pages.items() if isinstance(pages, Mapping) else pages, key=lambda kv: kv[0])
    return net_of_ordered(page for _, page in items)


def net_of_ordered(pages: Iterable[PageChanges]) -> NetChanges:
    """``net_changes`` for pages already in page order, taken one at a time (bounded memory)."""
    state: dict[str, bool] = {}
    for page in pages:
        state.update(dict.fromkeys(page.add, True))
        state.update(dict.fromkeys(page.remove, False))
    return net_from_state(state)


def net_from_state(state: dict[str, bool]) -> NetChanges:
    """Split id -> member-or-not (built in page order) into the net adds and removes."""
    return NetChanges(add=[i for i, member in state.items() if member],
                      remove=[i for i, member in state.items() if not member])


def chunk_changes(net: NetChanges, chunk_size: int) -> list[tuple[list[str], list[str]]]:
    """Chunks of at most ``chunk_size`` ids, removes first, then adds, in the net's order.

    An empty delta is one empty chunk, so that consumers still see the sync happened.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    removes, adds = net.remove, net.add
    if not removes and not adds:
        return [([], [])]
    chunks: list[tuple[list[str], list[str]]] = []
    total = len(removes) + len(adds)
    for start in range(0, total, chunk_size):
        end = start + chunk_size
        rm = removes[start:end] if start < len(removes) else []
        a_start, a_end = max(0, start - len(removes)), max(0, end - len(removes))
        chunks.append((adds[a_start:a_end], rm))
    return chunks


def apply_changes(members: set[str], add: Iterable[str], remove: Iterable[str]) -> set[str]:
    """What a list holds after a delta: the rule consumers (and tests) rely on."""
    return (set(members) - set(remove)) | set(add)


def missing_pages(received: Iterable[int], total_pages: int) -> list[int]:
    got = set(received)
    return [p for p in range(1, total_pages + 1) if p not in got]


def expected_pages(known_total: int, page_number: int, page_total: int) -> int:
    """Pages a sync needs when its pages disagree on ``total_pages``: the largest seen wins.

    Taking the largest means no page that exists is ever called late because an
    earlier page under-counted; at worst the sync waits for its timeout.
    """
    return max(known_total, page_total, page_number)


def drain_identity(request_id: str, signed_digest: str | None) -> str:
    """What tells one drain from another: a drain has no sync id.

    The digest of its signed ``ts`` and body (``PageRecord.signed_digest``), so the same signed
    drain posted again, under any ``X-Request-Id``, is the same drain and clears the list once.
    A record written before that field names the drain by its request id, as before. The two
    never meet: ``=`` is not allowed in a request id.
    """
    return f"signed={signed_digest}" if signed_digest else request_id


def drain_ref(request_id: str, signed_digest: str | None = None) -> str:
    """What names a drain in its delta id (``delta_id_for``) and its state key."""
    return f"drain:{drain_identity(request_id, signed_digest)}"


def sync_key(account: str, kind: str, ref: str, replay_id: str | None) -> str:
    """Key of one assembly in the state tables; a replay is assembled apart from the original.

    ``account|kind|replay_id|ref``: the account and kind hold no ``|``, replay ids are
    generated (no ``|``), and the sync id, any string per Heap, comes last, so no two
    syncs share a key, and the key ends with the sync id (``heapsync status`` shows it).
    """
    return f"{account}|{kind}|{replay_id or ''}|{ref}"


def page_key(sync_key: str, page_number: int) -> str:
    return f"{sync_key}#{page_number}"


def segment_key(account: str, segment_id: str) -> str:
    return orjson.dumps([account, segment_id]).decode()


DAY_SECONDS = 86_400


def done_day_key(partition: int, at: float) -> str:
    """Index key of the done markers written in ``partition`` on the UTC day of ``at``."""
    return f"{partition}|{int(at // DAY_SECONDS)}"


def expired_done_days(partition: int, now: float, retention_seconds: float, lookback_days: int) -> list[str]:
    """Index keys of whole days that ended at least ``retention_seconds`` ago, newest first.

    A done marker only guards against pages of its sync being read again; once the pages
    topic's retention has passed, none can be, so the marker may go. Only ``lookback_days``
    days before that line are looked at (lookups, not a scan of the table).
    """
    newest = int((now - retention_seconds) // DAY_SECONDS) - 1  # the last day that has fully ended by then
    return [f"{partition}|{day}" for day in range(newest, newest - lookback_days, -1) if day >= 0]
