"""How a Heap segment names its Cordial list: a pure rule shared by the worker, the operator tools and the status page."""

from __future__ import annotations

import re

_WHITESPACE = re.compile(r"\s+")


def list_name(segment_name: str) -> str:
    """'Heap Test Segment' -> 'HeapTestSegment' (Cordial's documented naming)."""
    return _WHITESPACE.sub("", segment_name)
