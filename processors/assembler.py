"""Page assembly: a state machine over four key-value maps.

The maps are plain ``MutableMapping``s: dicts in tests, Faust tables (backed by
changelog topics) in the worker. Nothing here touches Kafka or Faust, so every
rule is tested directly.

- ``pages``:    "<account>|<sync>|<page>" -> one page's changes (written once)
- ``syncs``:    "<account>|<sync>"        -> small metadata of an open sync
- ``segments``: "<account>|<segment>"     -> open syncs of the segment, in start order
- ``done``:     "<account>|<sync>"        -> when the sync's delta was emitted

Work per page is proportional to the page: no page rewrites a whole-sync value.
A sync is emitted once its pages are all in *and* every earlier sync of the
same segment has been emitted or timed out, so an old delta never lands after a
newer one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal, MutableMapping

from heapsync.contracts import Delta, HeapDrain, HeapSync, delta_id_for
from processors import rules

log = logging.getLogger("heapsync.assembler")

PartialPolicy = Literal["emit", "dead-letter"]


@dataclass
class Counters:
    pages: int = 0
    duplicate_pages: int = 0
    conflicting_duplicates: int = 0
    conflicts: int = 0
    late_pages: int = 0
    deltas: int = 0
    partial_deltas: int = 0
    dead_lettered: int = 0


@dataclass
class DeadLetter:
    reason: str
    sync_key: str
    detail: dict[str, Any]


@dataclass
class Output:
    """What one input produced: delta chunks to publish and syncs given up on."""

    deltas: list[Delta] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)

    def extend(self, other: Output) -> None:
        self.deltas.extend(other.deltas)
        self.dead_letters.extend(other.dead_letters)


def _sync_key(account: str, sync_id: str) -> str:
    return f"{account}|{sync_id}"


def _replayed(sync_ref: str, replay_id: str | None) -> str:
    """A replayed page belongs to a fresh sync: its key carries the replay id (replay contract)."""
    return f"{sync_ref}@{replay_id}" if replay_id else sync_ref


def _page_key(sync_key: str, page: int) -> str:
    return f"{sync_key}|{page}"


class Assembler:
    def __init__(
        self,
        pages: MutableMapping[str, Any],
        syncs: MutableMapping[str, Any],
        segments: MutableMapping[str, Any],
        done: MutableMapping[str, Any],
        *,
        chunk_size: int = 5000,
        timeout_seconds: float = 3600.0,
        partial_policy: PartialPolicy = "emit",
    ) -> None:
        self.pages, self.syncs, self.segments, self.done = pages, syncs, segments, done
        self.chunk_size = chunk_size
        self.timeout_seconds = timeout_seconds
        self.partial_policy = partial_policy
        self.counters = Counters()

    # -- inputs -----------------------------------------------------------

    def on_sync_page(self, account: str, payload: HeapSync, *, partition: int, now: float,
                     replay_id: str | None = None) -> Output:
        info = payload.data.sync_info
        skey = _sync_key(account, _replayed(info.sync_task_id, replay_id))
        self.counters.pages += 1
        if skey in self.done:
            self.counters.late_pages += 1
            log.warning("page for an already emitted sync", extra={"sync": skey, "page": info.page_number})
            return Output(dead_letters=[DeadLetter("late page for an emitted sync", skey,
                                                   {"page_number": info.page_number})])
        changes = rules.page_changes(
            (m.id for m in payload.data.add or ()), (m.id for m in payload.data.remove or ()))
        meta = self.syncs.get(skey)
        if meta is None:
            meta = {
                "account": account,
                "sync_task_id": info.sync_task_id,
                "segment_id": payload.data.segment.id,
                "segment_name": payload.data.segment.name,
                "identity_field": payload.customer_config.identity_field(),
                "kind": "sync",
                "total_pages": info.total_pages,
                "received": [],
                "partition": partition,
                "started_at": now,
                "replay_id": replay_id,
            }
            self._enqueue(account, payload.data.segment.id, skey)
        pkey = _page_key(skey, info.page_number)
        previous = self.pages.get(pkey)
        if previous is not None:
            self.counters.duplicate_pages += 1
            if previous["digest"] != changes.digest():
                self.counters.conflicting_duplicates += 1
                log.warning("page repeated with different content; first copy kept",
                            extra={"sync": skey, "page": info.page_number})
            return Output()
        if info.total_pages != meta["total_pages"]:
            log.warning("total_pages differs between pages; first value kept",
                        extra={"sync": skey, "page": info.page_number})
        self.counters.conflicts += changes.conflicts
        self.pages[pkey] = {"add": list(changes.add), "remove": list(changes.remove),
                            "digest": changes.digest()}
        meta = {**meta, "received": meta["received"] + [info.page_number]}
        self.syncs[skey] = meta
        return self._drain_segment(account, meta["segment_id"], now)

    def on_drain(self, account: str, payload: HeapDrain, *, request_id: str, partition: int, now: float,
                 replay_id: str | None = None) -> Output:
        skey = _sync_key(account, _replayed(f"drain:{request_id}", replay_id))
        self.counters.pages += 1
        if skey in self.done or skey in self.syncs:
            self.counters.duplicate_pages += 1
            return Output()
        self.syncs[skey] = {
            "account": account,
            "sync_task_id": None,
            "segment_id": payload.data.segment.id,
            "segment_name": payload.data.segment.name,
            "identity_field": payload.customer_config.identity_field(),
            "kind": "drain",
            "total_pages": 0,
            "received": [],
            "partition": partition,
            "started_at": now,
            "replay_id": replay_id,
        }
        self._enqueue(account, payload.data.segment.id, skey)
        return self._drain_segment(account, payload.data.segment.id, now)

    def on_tick(self, *, partition: int, now: float) -> Output:
        """Time out syncs of ``partition`` that waited too long, then release what they held up."""
        out = Output()
        expired = [
            (k, m) for k, m in list(self.syncs.items())
            if m["partition"] == partition and now - m["started_at"] >= self.timeout_seconds
        ]
        for skey, meta in expired:
            if skey not in self.syncs:
                continue  # already released by an earlier iteration
            out.extend(self._finish(skey, self.syncs[skey], complete=False))
            out.extend(self._drain_segment(meta["account"], meta["segment_id"], now))
        return out

    # -- internals ---------------------------------------------------------

    def _enqueue(self, account: str, segment_id: str, skey: str) -> None:
        seg = f"{account}|{segment_id}"
        self.segments[seg] = [*self.segments.get(seg, []), skey]

    def _drain_segment(self, account: str, segment_id: str, now: float) -> Output:
        """Emit complete syncs from the head of the segment's queue, in start order."""
        out = Output()
        seg = f"{account}|{segment_id}"
        while True:
            queue = self.segments.get(seg) or []
            if not queue:
                break
            head = queue[0]
            meta = self.syncs.get(head)
            if meta is None:  # finished elsewhere (timeout): just drop it from the queue
                self._dequeue(seg, head)
                continue
            if meta["kind"] == "sync" and len(set(meta["received"])) < meta["total_pages"]:
                break
            out.extend(self._finish(head, meta, complete=True))
        return out

    def _dequeue(self, seg: str, skey: str) -> None:
        queue = [k for k in self.segments.get(seg, []) if k != skey]
        if queue:
            self.segments[seg] = queue
        elif seg in self.segments:
            del self.segments[seg]

    def _finish(self, skey: str, meta: dict[str, Any], *, complete: bool) -> Output:
        out = Output()
        received = sorted(set(meta["received"]))
        missing = rules.missing_pages(received, meta["total_pages"]) if meta["kind"] == "sync" else []
        page_map = {p: self.pages.get(_page_key(skey, p)) for p in received}
        if not complete and self.partial_policy == "dead-letter":
            self.counters.dead_lettered += 1
            out.dead_letters.append(DeadLetter("sync timed out with pages missing", skey, {
                **{k: meta[k] for k in ("account", "sync_task_id", "segment_id", "segment_name",
                                        "identity_field", "total_pages")},
                "missing_pages": missing,
                "pages": {str(p): v for p, v in page_map.items() if v is not None},
            }))
        else:
            out.deltas.extend(self._deltas(skey, meta, page_map, complete, missing))
            self.counters.deltas += 1
            self.counters.partial_deltas += 0 if complete else 1
        for p in received:
            self.pages.pop(_page_key(skey, p), None)
        self.syncs.pop(skey, None)
        self.done[skey] = True
        self._dequeue(f"{meta['account']}|{meta['segment_id']}", skey)
        return out

    def _deltas(self, skey: str, meta: dict[str, Any], page_map: dict[int, Any],
                complete: bool, missing: list[int]) -> list[Delta]:
        if meta["kind"] == "drain":
            chunks: list[tuple[list[str], list[str]]] = [([], [])]
        else:
            net = rules.net_changes({p: rules.PageChanges(tuple(v["add"]), tuple(v["remove"]))
                                     for p, v in page_map.items() if v is not None})
            chunks = rules.chunk_changes(net, self.chunk_size)
        replay_id = meta.get("replay_id")
        sync_ref = skey.split("|", 1)[1]
        if replay_id and sync_ref.endswith(f"@{replay_id}"):
            sync_ref = sync_ref[: -len(replay_id) - 1]  # a replay keeps the delta id; its chunk key differs
        common = dict(
            delta_id=delta_id_for(meta["account"], sync_ref),
            account=meta["account"],
            segment_id=meta["segment_id"],
            segment_name=meta["segment_name"],
            list_name=rules.list_name(meta["segment_name"]),
            identity_field=meta["identity_field"],
            kind=meta["kind"],
            sync_task_id=meta["sync_task_id"],
            complete=complete,
            total_pages=meta["total_pages"],
            missing_pages=missing,
            chunks=len(chunks),
            replay_id=replay_id,
        )
        return [Delta(**common, chunk=n, add=add, remove=remove)
                for n, (add, remove) in enumerate(chunks, start=1)]
