"""The membership rules, as pure functions over plain data.

How a sync becomes a delta:

1. ``page_changes``: a page's adds and removes; an id in both is a conflict and
   is left out of that page.
2. ``net_changes``: pages applied in page order; an id's last appearance wins.
3. ``chunk_changes``: the net changes cut into chunks of at most N ids, in a
   deterministic order, so the same sync always gives the same chunks
   (``iter_chunks``: the same chunks over streams, one at a time).
4. the Cordial list is named by ``heapsync.naming.list_name_for``: the name the accounts file
   pins, else the segment name with whitespace removed.

A sync too large for one dict gets the same net, order and chunks bucket by bucket
(``streamed_net``: ``page_entries`` -> ``bucket_net`` -> ``merge_runs``; the assembler
runs it over scratch files, ``processors/spill.py``).

When the identity is ``email``, ids are normalised first (``normalise_ids``: trimmed,
lower-cased), so steps 1-3 apply to the contact Cordial sees; other identities stay exact.

Plus the small decisions around them: how a page is stored (``encode_page``),
how a repeat is recognised (``digest``), which pages are missing, and the
expected page count when pages disagree on ``total_pages``.
"""

from __future__ import annotations

import hashlib
import heapq
import zlib
from dataclasses import dataclass, field
from itertools import islice
from operator import itemgetter
from typing import Iterable, Iterator, Mapping, Sequence

import orjson

from heapsync.contracts import sync_key as sync_key  # the state tables' and dead letters' key
from heapsync.identities import EMAIL_IDENTITY, normalise_email, normalise_ids  # noqa: F401 (rules' vocabulary)

ADD = "add"
REMOVE = "remove"


def normalised_page(identity_field: str, page: PageChanges) -> PageChanges:
    """A stored page with its ids normalised again (pages stored before normalisation existed may hold
    case variants); the page rule then re-applies, so variants of one address in add and remove conflict."""
    if identity_field != EMAIL_IDENTITY:
        return page
    again = page_changes(normalise_ids(identity_field, page.add), normalise_ids(identity_field, page.remove))
    return PageChanges(again.add, again.remove, page.conflicts + again.conflicts)


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
    """``net_changes`` for pages already in page order, taken one at a time."""
    return net_from_state(net_state(pages))


def net_state(pages: Iterable[PageChanges]) -> dict[str, bool]:
    """Id -> member or not after pages in page order, in first-appearance order: one dict of
    every id of the sync (the assembler uses it only up to ``emit_max_ids``)."""
    state: dict[str, bool] = {}
    for page in pages:
        state.update(dict.fromkeys(page.add, True))
        state.update(dict.fromkeys(page.remove, False))
    return state


def net_from_state(state: dict[str, bool]) -> NetChanges:
    """Split id -> member-or-not (built in page order) into the net adds and removes."""
    return NetChanges(add=[i for i, member in state.items() if member],
                      remove=[i for i, member in state.items() if not member])


def chunk_changes(net: NetChanges, chunk_size: int) -> list[tuple[list[str], list[str]]]:
    """Chunks of at most ``chunk_size`` ids, removes first, then adds, in the net's order.

    An empty delta is one empty chunk, so that consumers still see the sync happened.
    """
    return list(iter_chunks(net.remove, net.add, chunk_size))


def chunk_count(removes: int, adds: int, chunk_size: int) -> int:
    """How many chunks ``iter_chunks`` makes of that many net removes and adds (at least one)."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    return max(1, -(-(removes + adds) // chunk_size))


def iter_chunks(removes: Iterable[str], adds: Iterable[str], chunk_size: int) -> Iterator[tuple[list[str], list[str]]]:
    """``(add, remove)`` chunks of at most ``chunk_size`` ids, each built when asked for.

    The very chunks ``chunk_changes`` makes (removes first, then adds, cut every ``chunk_size``
    ids), but over streams: only one chunk's ids are held at a time.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    rm_it, add_it = iter(removes), iter(adds)
    produced = False
    while True:
        rm = list(islice(rm_it, chunk_size))
        add = list(islice(add_it, chunk_size - len(rm))) if len(rm) < chunk_size else []
        if not rm and not add:
            if not produced:
                yield [], []
            return
        produced = True
        yield add, rm


# -- streamed net change (bounded memory) -------------------------------------------------
#
# A sync too large to hold as one dict is computed in hash buckets. Each occurrence of an id
# gets a position, ``page << 32 | index`` (index over the page's adds, then its removes: the
# order ``net_of_ordered`` applies them), signed: + for an add, - for a remove. Every occurrence
# of an id falls in the same slot (a stable hash, not Python's per-process ``hash``), so a
# slot's net is computed apart from the others; the slots' nets, each in first-appearance
# order, merged by position give exactly ``net_of_ordered``'s order, whatever the number of
# slots or buckets. So the chunks are the same as ever: a re-emission after a crash, by this
# code or the one before, sends the very same chunks under the same ``(delta_id, chunk)``.

POSITION_BITS = 32


def page_entries(page_number: int, changes: PageChanges, slots: int) -> dict[int, tuple[list[str], list[int]]]:
    """A page's occurrences by slot: ``slot -> (ids, signed positions)``, in the page's order."""
    out: dict[int, tuple[list[str], list[int]]] = {}
    base = page_number << POSITION_BITS
    crc = zlib.crc32
    for index, member_id in enumerate(changes.add):
        ids, poss = out.setdefault(crc(member_id.encode()) % slots, ([], []))
        ids.append(member_id)
        poss.append(base + index)
    offset = base + len(changes.add)
    for index, member_id in enumerate(changes.remove):
        ids, poss = out.setdefault(crc(member_id.encode()) % slots, ([], []))
        ids.append(member_id)
        poss.append(-(offset + index))
    return out


def bucket_net(entries: Iterable[tuple[list[str], list[int]]]) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """The net of one bucket's occurrences: ``(removes, adds)``, each a list of ``(first position,
    id)`` in position order; an id's last occurrence decides.

    ``entries`` hold each slot's occurrences in page order, slot after slot (the ids of two
    slots never meet, so only the order within a slot matters); the sort then only merges the
    slots' already ordered runs."""
    member: dict[str, bool] = {}
    first: dict[str, int] = {}
    for ids, poss in entries:
        for member_id, pos in zip(ids, poss):
            if member_id not in first:
                first[member_id] = pos if pos >= 0 else -pos
            member[member_id] = pos >= 0
    removes = [(first[i], i) for i, m in member.items() if not m]
    adds = [(first[i], i) for i, m in member.items() if m]
    removes.sort()
    adds.sort()
    return removes, adds


def group_slots(counts: Sequence[int], max_ids: int) -> list[list[int]]:
    """Consecutive slots grouped into buckets of at most ``max_ids`` occurrences (a slot over
    the bound is a bucket of its own); empty slots are left out."""
    groups: list[list[int]] = []
    size = max_ids + 1
    for slot, count in enumerate(counts):
        if not count:
            continue
        if size + count > max_ids:
            groups.append([])
            size = 0
        groups[-1].append(slot)
        size += count
    return groups


def merge_runs(runs: Iterable[Iterable[tuple[int, str]]]) -> Iterator[str]:
    """Ids of several ``(position, id)`` runs, each in position order, in position order overall."""
    return map(itemgetter(1), heapq.merge(*runs))


def streamed_net(pages: Iterable[tuple[int, PageChanges]], slots: int,
                 max_ids: int) -> tuple[int, int, Iterator[str], Iterator[str]]:
    """``net_of_ordered`` computed bucket by bucket, over plain data: ``(removes, adds,
    remove ids, add ids)``. What the assembler does with its occurrences in files (the
    reference for its property test)."""
    by_slot: list[list[tuple[list[str], list[int]]]] = [[] for _ in range(slots)]
    counts = [0] * slots
    for number, changes in pages:
        for slot, entry in page_entries(number, changes, slots).items():
            by_slot[slot].append(entry)
            counts[slot] += len(entry[0])
    remove_runs, add_runs = [], []
    for group in group_slots(counts, max_ids):
        removes, adds = bucket_net(e for slot in group for e in by_slot[slot])
        remove_runs.append(removes)
        add_runs.append(adds)
    return (sum(map(len, remove_runs)), sum(map(len, add_runs)),
            merge_runs(remove_runs), merge_runs(add_runs))


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
