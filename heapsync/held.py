"""The removal rail (issue 14): when a delta is held, and the per-list state a sink keeps for it.

A mistaken drain or a broken segment definition on Heap's side can empty a list campaigns are
about to use. Per account (``max_removal_fraction``, ``hold_drains``) the sink holds such a delta
instead of applying it; later syncs of the same list wait behind it, so the list's changes stay in
order; ``heapsync held release|discard`` decides. The state lives on the compacted
``<prefix>.sink.lists`` topic (:class:`ListCount`, :class:`HeldChunk`, :class:`HoldDecision`), so it
survives a restart or a rebalance. Everything here is pure: the sink, ``heapsync held``,
``heapsync status`` and the status page all build the same :class:`ListsState` from those records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from heapsync.contracts import Delta, HeldChunk, HoldDecision, ListCount
from heapsync.settings import RemovalRail

ListKey = tuple[str, str]
"""(account, list_name)"""


# -- the decision ----------------------------------------------------------------


def estimated_removes(delta: Delta) -> int:
    """Removes of the whole delta, as seen from its first chunk.

    Removes come first in a delta (``processors.rules.chunk_changes``), so the only chunk, or a
    first chunk that also adds, holds them all. A remove-only first chunk of several counts as if
    every chunk were as full of removes: an upper bound, so the rail never lets a big delta through.
    """
    if delta.chunks == 1 or delta.add:
        return len(delta.remove)
    return len(delta.remove) * delta.chunks


def hold_reason(members: int, kind: str, removes: int, rail: RemovalRail) -> str | None:
    """Why a delta must be held, or None to apply it.

    ``members``: the list's counted members; ``removes``: the delta's removes (a drain removes all).
    A sync is held when it removes more than ``max_removal_fraction`` of ``members`` (with no
    members counted, any removal is held: the rail cannot tell it is harmless); a drain when
    ``hold_drains`` is set, or when it would empty a counted list past the fraction.
    """
    fraction = rail.max_removal_fraction
    if kind == "drain":
        if rail.hold_drains:
            return "drain held (hold_drains)"
        if fraction is not None and members > fraction * members:
            return f"drain would remove all {members} members (more than {fraction:.0%})"
        return None
    if fraction is not None and removes > 0 and removes > fraction * members:
        return f"would remove {removes} of {members} members (more than {fraction:.0%})"
    return None


def members_after(members: int, delta: Delta) -> int:
    """The list's count after applying ``delta`` (one chunk): a drain empties it."""
    if delta.kind == "drain":
        return 0
    return max(0, members + len(delta.add) - len(delta.remove))


# -- keys on the lists topic ---------------------------------------------------------


def count_key(sink: str, account: str, list_name: str) -> str:
    return f"{sink}|count|{account}|{list_name}"


def held_key(sink: str, chunk_key: str) -> str:
    return f"{sink}|held|{chunk_key}"


def decision_key(sink: str, delta_id: str) -> str:
    return f"{sink}|decision|{delta_id}"


# -- the state ---------------------------------------------------------------------------


@dataclass
class ListsState:
    """One sink's per-list state, built from the lists topic in order (a tombstone deletes its key)."""

    sink: str
    counts: dict[ListKey, int] = field(default_factory=dict)
    pending: dict[ListKey, dict[str, HeldChunk]] = field(default_factory=dict)
    decisions: dict[str, HoldDecision] = field(default_factory=dict)
    _chunk_list: dict[str, ListKey] = field(default_factory=dict)

    def feed(self, key: str, value: bytes | None, *, skip_writer: str | None = None) -> bool:
        """Apply one record; False when it is not this sink's, or unreadable (then it is ignored).

        ``skip_writer``: the sink's own records are already in its memory, and an old one read back
        after a newer local change must not undo it."""
        sink, _, rest = key.partition("|")
        kind, _, ident = rest.partition("|")
        if sink != self.sink:
            return False
        try:
            if kind == "count":
                if value is None:
                    return True
                count = ListCount.model_validate_json(value)
                if skip_writer is None or count.writer != skip_writer:
                    self.counts[(count.account, count.list_name)] = count.members
            elif kind == "held":
                if value is None:
                    self.drop(ident)
                    return True
                chunk = HeldChunk.model_validate_json(value)
                if skip_writer is None or chunk.writer != skip_writer:
                    self.put(chunk)
            elif kind == "decision":
                if value is None:
                    self.decisions.pop(ident, None)
                else:
                    decision = HoldDecision.model_validate_json(value)
                    self.decisions[decision.delta_id] = decision
            else:
                return False
        except ValidationError:
            return False
        return True

    def put(self, chunk: HeldChunk) -> None:
        key = (chunk.delta.account, chunk.delta.list_name)
        self.pending.setdefault(key, {})[chunk.delta.chunk_key] = chunk
        self._chunk_list[chunk.delta.chunk_key] = key

    def drop(self, chunk_key: str) -> None:
        key = self._chunk_list.pop(chunk_key, None)
        if key is None:
            return
        chunks = self.pending.get(key, {})
        chunks.pop(chunk_key, None)
        if not chunks:
            self.pending.pop(key, None)

    def is_pending(self, chunk_key: str) -> bool:
        return chunk_key in self._chunk_list

    def queue(self, key: ListKey) -> list[HeldChunk]:
        """The list's held and waiting chunks, in the order they must be applied."""
        return sorted(self.pending.get(key, {}).values(), key=lambda c: (c.seq, c.delta.chunk))

    def next_seq(self, key: ListKey, now_ns: int) -> int:
        return max([now_ns] + [c.seq + 1 for c in self.pending.get(key, {}).values()])

    def holds(self) -> list[dict[str, Any]]:
        """One row per held delta (plain data for ``heapsync held list``, status and the status page)."""
        rows = []
        for key in sorted(self.pending):
            queue = self.queue(key)
            for n, chunk in enumerate(queue):
                if chunk.role != "held":
                    continue
                own = [c for c in queue if c.delta.delta_id == chunk.delta.delta_id]
                # waiting: the other deltas behind this hold, up to the next hold
                behind: list[str] = []
                for later in queue[n + 1:]:
                    if later.role == "held":
                        break
                    if later.delta.delta_id != chunk.delta.delta_id and later.delta.delta_id not in behind:
                        behind.append(later.delta.delta_id)
                decision = self.decisions.get(chunk.delta.delta_id)
                rows.append({
                    "delta_id": chunk.delta.delta_id, "account": key[0], "list_name": key[1],
                    "segment_id": chunk.delta.segment_id, "kind": chunk.delta.kind,
                    "sync_task_id": chunk.delta.sync_task_id, "reason": chunk.reason,
                    "members": chunk.members, "removes": chunk.removes,
                    "adds": sum(len(c.delta.add) for c in own), "chunks_held": len(own),
                    "chunks": chunk.delta.chunks, "held_at": chunk.held_at.isoformat(),
                    "waiting_deltas": behind, "waiting": len(behind),
                    "decision": decision.action if decision else None,
                })
        return rows

    def waiting_behind(self, delta_id: str) -> list[dict[str, Any]]:
        """The deltas waiting behind one hold, in order (ids and sizes, never contact ids)."""
        for row in self.holds():
            if row["delta_id"] == delta_id:
                key = (row["account"], row["list_name"])
                out: dict[str, dict[str, Any]] = {}
                for c in self.queue(key):
                    if c.delta.delta_id in row["waiting_deltas"]:
                        entry = out.setdefault(c.delta.delta_id, {
                            "delta_id": c.delta.delta_id, "kind": c.delta.kind, "sync_task_id": c.delta.sync_task_id,
                            "chunks": 0, "adds": 0, "removes": 0})
                        entry["chunks"] += 1
                        entry["adds"] += len(c.delta.add)
                        entry["removes"] += len(c.delta.remove)
                return list(out.values())
        return []

    def held_count(self) -> dict[str, int]:
        """Held deltas per account (for the metric)."""
        out: dict[str, int] = {}
        for row in self.holds():
            out[row["account"]] = out.get(row["account"], 0) + 1
        return out
