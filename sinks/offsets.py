"""Which offset of a partition may be committed, when messages finish out of order.

The runner applies chunks of different lists concurrently, so message 12 may be
done while message 10 is still waiting on a paused account. Kafka keeps one
committed offset per partition, so it may only move past a message once every
message before it is done too: the commit point is the lowest unfinished offset.
Pure bookkeeping, tested directly.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator, Set
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

    def done_up_to(self) -> int | None:
        """The first offset not yet done (what lag counts from); None before anything was read."""
        point = self.commit_point()
        return self._pending[0].offset if self._pending else point

    def unfinished(self) -> int:
        return sum(1 for e in self._pending if not e.done)

    def due(self) -> int | None:
        """The commit point when it moved since the last commit, else None."""
        point = self.commit_point()
        if point is not None and point != self.committed:
            return point
        return None


class AppliedChunks(Set[str]):
    """Chunk keys a sink applied (read from and written to the progress topic), bounded in memory.

    The progress topic forgets a record after the topics' retention, so the set forgets a key at the
    same age; a cap on the count bounds it within that window too (the oldest go first). A forgotten
    key only means a redelivery of that chunk is applied again (every sink call is idempotent), and a
    redelivery is of uncommitted chunks, which are recent. Keys are kept in the order they were added,
    which is close to time order, so expiry pops from the front and stops at the first young key.
    """

    def __init__(self, max_age_seconds: float, max_entries: int) -> None:
        self.max_age = max_age_seconds
        self.max_entries = max_entries
        self._at: OrderedDict[str, float] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self._at

    def __iter__(self) -> Iterator[str]:
        return iter(self._at)

    def __len__(self) -> int:
        return len(self._at)

    def add(self, key: str, at: float, now: float) -> None:
        """Remember ``key`` applied at ``at`` (epoch seconds), unless that is already older than the retention."""
        if at < now - self.max_age:
            return
        self._at.pop(key, None)
        self._at[key] = at
        while len(self._at) > self.max_entries:
            self._at.popitem(last=False)
        self.expire(now)

    def discard(self, key: str) -> None:
        self._at.pop(key, None)

    def expire(self, now: float) -> None:
        """Forget the keys the progress topic no longer holds either."""
        cutoff = now - self.max_age
        while self._at:
            key, at = next(iter(self._at.items()))
            if at >= cutoff:
                break
            del self._at[key]


def record_time(timestamp_type: int, timestamp_ms: int, now: float) -> float:
    """When a progress record was written (epoch seconds), from a Kafka message's timestamp; ``now`` when it has none.

    ``timestamp_type`` 0 is librdkafka's TIMESTAMP_NOT_AVAILABLE."""
    return timestamp_ms / 1000 if timestamp_type != 0 and timestamp_ms > 0 else now
