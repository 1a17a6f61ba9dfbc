"""How a Heap segment names its Cordial list: a pure rule shared by the worker, the operator tools and the status page."""

from __future__ import annotations

import re

_WHITESPACE = re.compile(r"\s+")


def list_name(segment_name: str) -> str:
    """'Heap Test Segment' -> 'HeapTestSegment' (Cordial's documented naming)."""
    return _WHITESPACE.sub("", segment_name)


def list_name_for(segment_name: str, pinned: str | None = None) -> str:
    """The Cordial list of a segment: the name pinned in the accounts file (``list_name`` in the segment's
    table), else ``list_name(segment_name)``. A pin keeps a segment renamed in Heap on its list; without
    it, the new name starts a new list."""
    return pinned if pinned else list_name(segment_name)
