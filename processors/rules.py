"""The membership rules, as pure functions over plain data.

How a sync becomes a delta:

1. ``page_changes``: a page's adds and removes; an id in both is a conflict and
   is left out of that page.
2. ``net_changes``: pages applied in page order; an id's last appearance wins.
3. ``chunk_changes``: the net changes, sorted, cut into chunks of at most N ids,
   so the same sync always gives the same chunks.
4. ``list_name``: the Cordial list is the segment name with whitespace removed.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

_WHITESPACE = re.compile(r"\s+")

ADD = "add"
REMOVE = "remove"


def list_name(segment_name: str) -> str:
    """'Heap Test Segment' -> 'HeapTestSegment' (Cordial's documented naming)."""
    return _WHITESPACE.sub("", segment_name)


@dataclass(frozen=True)
class PageChanges:
    """One page's effective changes, conflicts removed."""

    add: tuple[str, ...]
    remove: tuple[str, ...]
    conflicts: int = 0

    def digest(self) -> str:
        """Content fingerprint, to tell an exact repeat from a repeat with other content."""
        h = hashlib.sha256()
        for op, ids in ((ADD, sorted(set(self.add))), (REMOVE, sorted(set(self.remove)))):
            h.update(op.encode())
            for i in ids:
                h.update(b"\x00" + i.encode())
        h.update(f"|{self.conflicts}".encode())
        return h.hexdigest()[:32]


def page_changes(add: Iterable[str], remove: Iterable[str]) -> PageChanges:
    add_set, remove_set = set(add), set(remove)
    conflicts = add_set & remove_set
    return PageChanges(
        add=tuple(sorted(add_set - conflicts)),
        remove=tuple(sorted(remove_set - conflicts)),
        conflicts=len(conflicts),
    )


@dataclass
class NetChanges:
    add: set[str] = field(default_factory=set)
    remove: set[str] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.add) + len(self.remove)


def net_changes(pages: Mapping[int, PageChanges] | Sequence[tuple[int, PageChanges]]) -> NetChanges:
    """Apply pages in page-number order; an id's last appearance wins."""
    items = sorted(pages.items() if isinstance(pages, Mapping) else pages, key=lambda kv: kv[0])
    state: dict[str, bool] = {}
    for _, page in items:
        for i in page.add:
            state[i] = True
        for i in page.remove:
            state[i] = False
    net = NetChanges()
    for i, member in state.items():
        (net.add if member else net.remove).add(i)
    return net


def chunk_changes(net: NetChanges, chunk_size: int) -> list[tuple[list[str], list[str]]]:
    """Deterministic chunks of at most ``chunk_size`` ids: removes first, then adds, each sorted.

    An empty delta is one empty chunk, so that consumers still see the sync happened.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    ops = [(REMOVE, i) for i in sorted(net.remove)] + [(ADD, i) for i in sorted(net.add)]
    if not ops:
        return [([], [])]
    chunks: list[tuple[list[str], list[str]]] = []
    for start in range(0, len(ops), chunk_size):
        part = ops[start:start + chunk_size]
        chunks.append(([i for op, i in part if op == ADD], [i for op, i in part if op == REMOVE]))
    return chunks


def apply_changes(members: set[str], add: Iterable[str], remove: Iterable[str]) -> set[str]:
    """What a list holds after a delta: the rule consumers (and tests) rely on."""
    return (set(members) - set(remove)) | set(add)


def missing_pages(received: Iterable[int], total_pages: int) -> list[int]:
    got = set(received)
    return [p for p in range(1, total_pages + 1) if p not in got]
