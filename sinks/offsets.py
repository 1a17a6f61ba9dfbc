"""Which offset of a partition may be committed, when messages finish out of order.

The runner applies chunks of different lists concurrently, so message 12 may be
done while message 10 is still waiting on a paused account. Kafka keeps one
committed offset per partition, so it may only move past a message once every
message before it is done too: the commit point is the lowest unfinished offset.
Pure bookkeeping, tested directly.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class Entry:
    offset: int
    done: bool = False


@dataclass
class PartitionProgress:
    """Offsets of one partition read since it was assigned, in the order they were read."""

    topic: str
    partition: int
    revoked: bool = False
    _pending: deque[Entry] = field(default_factory=deque)
    _commit_at: int | None = None  # next offset to consume, once everything before it is done
    committed: int | None = None  # what was last sent to Kafka

    def track(self, offset: int) -> Entry:
        entry = Entry(offset)
        self._pending.append(entry)
        return entry

    def commit_point(self) -> int | None:
        """The offset to commit (Kafka's "next to read"): just past the done prefix; None if nothing new."""
        while self._pending and self._pending[0].done:
            self._commit_at = self._pending.popleft().offset + 1
        return self._commit_at

    def unfinished(self) -> int:
        return sum(1 for e in self._pending if not e.done)

    def due(self) -> int | None:
        """The commit point when it moved since the last commit, else None."""
        point = self.commit_point()
        if point is not None and point != self.committed:
            return point
        return None
