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


def hold_reason(members: int | None, kind: str, removes: int, rail: RemovalRail) -> str | None:
    """Why a delta must be held, or None to apply it.

    ``members``: the list's counted members, None when the sink never counted the list (counts
    start at the upgrade that brought the rail); ``removes``: the delta's removes (a drain removes
    all). A sync is held when it removes more than ``max_removal_fraction`` of ``members`` (with no
    members counted, any removal is held: the rail cannot tell it is harmless); a drain when
    ``hold_drains`` is set, when it would empty a counted list past the fraction, or, like a sync's
    removal, when the list was never counted.
    """
    fraction = rail.max_removal_fraction
    if kind == "drain":
        if rail.hold_drains:
            return "drain held (hold_drains)"
        if fraction is not None and members is None:
            return "drain of a list the sink has never counted (counts start at the upgrade)"
        if fraction is not None and members is not None and members > fraction * members:
            return f"drain would remove all {members} members (more than {fraction:.0%})"
        return None
    counted = members or 0
    if fraction is not None and removes > 0 and removes > fraction * counted:
        return f"would remove {removes} of {counted} members (more than {fraction:.0%})"
    return None


def members_after(members: int | None, delta: Delta) -> int:
    """The list's count after applying ``delta`` (one chunk): a drain empties it (None: never counted)."""
    if delta.kind == "drain":
        return 0
    return max(0, (members or 0) + len(delta.add) - len(delta.remove))


def hold_id(delta_id: str, replay_id: str | None) -> str:
    """What names one held delta: a ``heapsync replay`` copy shares the delta id, so it is
    ``<delta_id>@<replay_id>`` (the original is its bare delta id, as in :attr:`Delta.chunk_key`)."""
    return f"{delta_id}@{replay_id}" if replay_id else delta_id


def hold_id_of(delta: Delta) -> str:
    return hold_id(delta.delta_id, delta.replay_id)


# -- keys on the lists topic ---------------------------------------------------------


def count_key(sink: str, account: str, list_name: str) -> str:
    return f"{sink}|count|{account}|{list_name}"


def held_key(sink: str, chunk_key: str) -> str:
    return f"{sink}|held|{chunk_key}"


def decision_key(sink: str, hold: str) -> str:
    """``hold``: :func:`hold_id` (a bare delta id for an original, as the records before replays had)."""
    return f"{sink}|decision|{hold}"


# -- the state ---------------------------------------------------------------------------


@dataclass
class ListsState:
    """One sink's per-list state, built from the lists topic in order (a tombstone deletes its key).

    ``keep_ids``: the sink needs a held chunk's contact ids to apply it later; readers that only
    display (status page, ``heapsync status``, ``heapsync held``) pass False and keep the sizes only,
    so a held removal of millions of ids costs them a few bytes, not its ids.
    ``decisions`` are keyed by :func:`hold_id`."""

    sink: str
    keep_ids: bool = True
    counts: dict[ListKey, int] = field(default_factory=dict)
    pending: dict[ListKey, dict[str, HeldChunk]] = field(default_factory=dict)
    decisions: dict[str, HoldDecision] = field(default_factory=dict)
    _chunk_list: dict[str, ListKey] = field(default_factory=dict)
    _sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # chunk_key -> (adds, removes)

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
                    self.decisions[hold_id(decision.delta_id, decision.replay_id)] = decision
            else:
                return False
        except ValidationError:
            return False
        return True

    def put(self, chunk: HeldChunk) -> None:
        key = (chunk.delta.account, chunk.delta.list_name)
        self._sizes[chunk.delta.chunk_key] = (len(chunk.delta.add), len(chunk.delta.remove))
        if not self.keep_ids and (chunk.delta.add or chunk.delta.remove):
            chunk = chunk.model_copy(update={"delta": chunk.delta.model_copy(update={"add": [], "remove": []})})
        self.pending.setdefault(key, {})[chunk.delta.chunk_key] = chunk
        self._chunk_list[chunk.delta.chunk_key] = key

    def adds(self, chunk: HeldChunk) -> int:
        return self._sizes.get(chunk.delta.chunk_key, (len(chunk.delta.add), 0))[0]

    def removes(self, chunk: HeldChunk) -> int:
        return self._sizes.get(chunk.delta.chunk_key, (0, len(chunk.delta.remove)))[1]

    def drop(self, chunk_key: str) -> None:
        self._sizes.pop(chunk_key, None)
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
        """One row per held delta (plain data for ``heapsync held list``, status and the status page).

        A held delta is named by its :func:`hold_id` (``hold``): a replayed copy shares the delta id
        but is another delta, held, released and discarded on its own."""
        rows = []
        for key in sorted(self.pending):
            queue = self.queue(key)
            for n, chunk in enumerate(queue):
                if chunk.role != "held":
                    continue
                hold = hold_id_of(chunk.delta)
                own = [c for c in queue if hold_id_of(c.delta) == hold]
                # waiting: the other deltas behind this hold, up to the next hold
                behind: list[str] = []
                for later in queue[n + 1:]:
                    if later.role == "held":
                        break
                    other = hold_id_of(later.delta)
                    if other != hold and other not in behind:
                        behind.append(other)
                decision = self.decisions.get(hold)
                rows.append({
                    "hold": hold, "delta_id": chunk.delta.delta_id, "replay_id": chunk.delta.replay_id,
                    "account": key[0], "list_name": key[1],
                    "segment_id": chunk.delta.segment_id, "kind": chunk.delta.kind,
                    "sync_task_id": chunk.delta.sync_task_id, "reason": chunk.reason,
                    "members": chunk.members, "removes": chunk.removes,
                    "adds": sum(self.adds(c) for c in own), "chunks_held": len(own),
                    "chunks": chunk.delta.chunks, "held_at": chunk.held_at.isoformat(),
                    "waiting_deltas": behind, "waiting": len(behind),
                    "decision": decision.action if decision else None,
                })
        return rows

    def waiting_behind(self, hold: str) -> list[dict[str, Any]]:
        """The deltas waiting behind one hold (its :func:`hold_id`), in order (ids and sizes, never contact ids)."""
        for row in self.holds():
            if row["hold"] == hold:
                key = (row["account"], row["list_name"])
                out: dict[str, dict[str, Any]] = {}
                for c in self.queue(key):
                    other = hold_id_of(c.delta)
                    if other in row["waiting_deltas"]:
                        entry = out.setdefault(other, {
                            "hold": other, "delta_id": c.delta.delta_id, "replay_id": c.delta.replay_id,
                            "kind": c.delta.kind, "sync_task_id": c.delta.sync_task_id,
                            "chunks": 0, "adds": 0, "removes": 0})
                        entry["chunks"] += 1
                        entry["adds"] += self.adds(c)
                        entry["removes"] += self.removes(c)
                return list(out.values())
        return []

    def held_count(self) -> dict[str, int]:
        """Held deltas per account (for the metric)."""
        out: dict[str, int] = {}
        for row in self.holds():
            out[row["account"]] = out.get(row["account"], 0) + 1
        return out
