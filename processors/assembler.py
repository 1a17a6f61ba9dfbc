"""Page assembly: a state machine over a few key-value maps.

The maps are plain ``MutableMapping``s: dicts in tests, Faust tables (backed by
changelog topics) in the worker. Nothing here touches Kafka or Faust, so every
rule is tested directly.

- ``pages``:    page key -> one page's changes, encoded (written once per page)
- ``syncs``:    sync key -> small, fixed-size metadata of an open sync (a page
                counter, never the list of pages received)
- ``segments``: segment key -> {"p": partition, "q": open syncs in start order}
- ``done``:     sync key -> what became of an emitted sync (page digests, to
                recognise repeats and late pages after the sync is gone)
- ``done_days`` (optional): partition and UTC day -> sync keys marked done then, so
                that markers older than the pages' retention are removed by lookups
                on timer ticks instead of a scan of ``done``

Work per page is proportional to the page. A sync is emitted once its pages are
all in (or it timed out) *and* every earlier sync of the same segment has been
emitted, so an old delta never lands after a newer one.

Emitting is three steps so that the shell can make each durable before the next
(see ``processors/worker.py``): ``next_emission`` builds the deltas without
changing state; ``mark_emitted`` records the sync as done once the deltas are
acknowledged; ``forget`` drops the sync's pages once the done marker is durable.
A crash between any two steps repeats the emission (same ``delta_id``) or
finishes the clean-up; it never loses or mixes a sync. ``drive`` runs the three
steps back to back, for tests and for callers without a broker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from itertools import compress
from operator import not_
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping, MutableMapping, Protocol

from heapsync import naming
from heapsync.contracts import AssemblerDeadLetter, Delta, HeapDrain, HeapSync, HeldPage, SyncMeta, delta_id_for
from heapsync.identities import compared_as
from heapsync.settings import Account, segment_settings
from processors import rules, spill

log = logging.getLogger("heapsync.assembler")

PartialPolicy = Literal["emit", "dead-letter"]


@dataclass
class Counters:
    """Running totals of what the assembler saw; exported as Prometheus counters by the worker."""

    pages: int = 0
    duplicate_pages: int = 0
    conflicting_duplicates: int = 0
    conflicts: int = 0
    late_pages: int = 0
    total_pages_mismatches: int = 0
    deltas: int = 0
    delta_chunks: int = 0
    partial_deltas: int = 0
    dead_lettered: int = 0
    disabled_syncs: int = 0
    done_pruned: int = 0


@dataclass
class Step:
    """What one input asks for next: segments whose queue may now move, and records given up on."""

    segments: list[str] = field(default_factory=list)
    dead_letters: list[AssemblerDeadLetter] = field(default_factory=list)
    open_syncs: int | None = None
    oldest_open_seconds: float | None = None
    """On a tick: age of the partition's oldest open sync (0 when none is open)."""


class NetSource(Protocol):
    """A sync's net change as counts and streams of ids (in memory, or spilled to files)."""

    removes: int
    adds: int

    def prepare(self) -> Iterator[None]: ...

    def remove_ids(self) -> Iterator[str]: ...

    def add_ids(self) -> Iterator[str]: ...

    def close(self) -> None: ...


class MemoryNet:
    """The net change of a state dict (id -> member or not, in first-appearance order), streamed
    from the dict itself: no lists of all adds and removes are made."""

    def __init__(self, state: dict[str, bool]) -> None:
        self.state = state
        self.adds = sum(state.values())
        self.removes = len(state) - self.adds

    def prepare(self) -> Iterator[None]:
        return iter(())

    def remove_ids(self) -> Iterator[str]:
        return compress(self.state, map(not_, self.state.values()))

    def add_ids(self) -> Iterator[str]:
        return compress(self.state, self.state.values())

    def close(self) -> None:
        pass


@dataclass
class Emission:
    """One finished sync, ready to publish: its delta chunks (``iter_deltas``, built one at a time),
    or a dead letter (timeout policy)."""

    sync_key: str
    segment_key: str
    complete: bool
    chunks: int
    """Delta chunks: known once ``prepare`` has run (0 for a dead letter)."""
    dead_letter: AssemblerDeadLetter | None
    done_value: dict[str, Any]
    stored_pages: list[int]
    partition: int = 0
    net: NetSource | None = field(default=None, repr=False)
    chunk_size: int = 5000
    common: dict[str, Any] = field(default_factory=dict, repr=False)

    def prepare(self) -> Iterator[None]:
        """Compute what is left of the net change (a spilled sync's buckets), yielding between
        steps so that the shell can let its event loop run; sets ``chunks``."""
        if self.net is None:
            return
        yield from self.net.prepare()
        self.chunks = rules.chunk_count(self.net.removes, self.net.adds, self.chunk_size)

    def iter_deltas(self) -> Iterator[Delta]:
        """The delta chunks in order, each made when the one before has been taken, so a sync's
        output is never all in memory. Read once: the emission's scratch files go at the end."""
        if self.net is None:
            return
        try:
            for _ in self.prepare():
                pass
            chunks = rules.iter_chunks(self.net.remove_ids(), self.net.add_ids(), self.chunk_size)
            for n, (add, remove) in enumerate(chunks, start=1):
                yield Delta(**self.common, chunk=n, chunks=self.chunks, add=add, remove=remove)
        finally:
            self.close()

    def close(self) -> None:
        if self.net is not None:
            self.net.close()


@dataclass
class Output:
    """Everything inputs produced, in order (``drive``)."""

    deltas: list[Delta] = field(default_factory=list)
    dead_letters: list[AssemblerDeadLetter] = field(default_factory=list)

    def extend(self, other: Output) -> None:
        self.deltas.extend(other.deltas)
        self.dead_letters.extend(other.dead_letters)


class StoredPages(dict[int, str]):
    """Digest of each stored page of a sync, and their total size (``nbytes``): read together, so
    that deciding whether the sync's net change spills does not read every page a second time."""

    nbytes: int = 0


@dataclass
class _Running:
    """In-memory net state of a sync whose pages 1..next_page-1 are applied (a cache, never the truth)."""

    next_page: int = 1
    state: dict[str, bool] = field(default_factory=dict)


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
        cache_max_ids: int = 2_000_000,
        emit_max_ids: int = 1_000_000,
        scratch_dir: Path | None = None,
        done_days: MutableMapping[str, Any] | None = None,
        done_retention_seconds: float | None = None,
        prune_every_seconds: float = 3600.0,
        prune_lookback_days: int = 366,
        accounts: Mapping[str, Account] | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        self.pages, self.syncs, self.segments, self.done = pages, syncs, segments, done
        # per-segment settings (pinned list name, enabled), read when a sync is emitted
        self.accounts: Mapping[str, Account] = accounts or {}
        self.done_days = done_days
        self.done_retention_seconds = done_retention_seconds
        self.prune_every_seconds = prune_every_seconds
        self.prune_lookback_days = prune_lookback_days
        self._pruned_at: dict[int, float] = {}
        self.chunk_size = chunk_size
        self.timeout_seconds = timeout_seconds
        self.partial_policy = partial_policy
        self.counters = Counters()
        # Net state built while pages arrive, so a big sync's delta is ready when its last page is.
        # Only an optimisation: emission falls back to the stored pages, and the shell clears it on
        # rebalance. Bounded by the number of ids held.
        self.cache_max_ids = cache_max_ids
        # A sync not in the cache is assembled from its stored pages: in one dict up to this many
        # id occurrences, else in hash buckets of about this many, spilled to ``scratch_dir``.
        self.emit_max_ids = emit_max_ids
        self.scratch_dir = scratch_dir
        self._running: dict[str, _Running | None] = {}
        self._cached_ids = 0

    def clear_cache(self) -> None:
        self._running.clear()
        self._cached_ids = 0

    # -- inputs -----------------------------------------------------------

    def on_sync_page(self, account: str, payload: HeapSync, *, partition: int, now: float,
                     replay_id: str | None = None, add: Iterable[str] | None = None,
                     remove: Iterable[str] | None = None) -> Step:
        """One sync page. ``add``/``remove``, when given, are the page's ids (already taken out of
        ``payload`` by the record parser); otherwise the payload's members are used."""
        info = payload.data.sync_info
        page = info.page_number
        skey = rules.sync_key(account, "sync", info.sync_task_id, replay_id)
        seg = rules.segment_key(account, payload.data.segment.id)
        self.counters.pages += 1
        identity = payload.customer_config.identity_field()
        # emails as Cordial compares them, before the rules: variants of one address are one contact
        compared = self._compared_as(account, identity)
        changes = rules.page_changes(
            rules.normalise_ids(compared, add if add is not None else [m.id for m in payload.data.add or ()]),
            rules.normalise_ids(compared, remove if remove is not None else [m.id for m in payload.data.remove or ()]))
        encoded = changes.encode()

        finished = self.done.get(skey)
        if finished is not None:
            return self._after_done(skey, seg, page, finished, encoded, changes, payload)

        meta = self.syncs.get(skey)
        if meta is None:
            # written through the contract once per sync; each page then updates the plain dict (hot path)
            meta = SyncMeta(
                account=account, kind="sync", ref=info.sync_task_id, replay_id=replay_id, segment=seg,
                segment_id=payload.data.segment.id, segment_name=payload.data.segment.name,
                identity_field=identity, announced=info.total_pages,
                total_pages=info.total_pages, received=0, partition=partition, started_at=now,
            ).table_value()
            self._enqueue(seg, skey, partition)
        else:
            meta = dict(meta)
        if info.total_pages != meta["announced"]:
            self.counters.total_pages_mismatches += 1
            log.warning("pages of one sync disagree on total_pages; the largest is used",
                        extra={"sync": skey, "page": page, "total_pages": info.total_pages,
                               "first_total_pages": meta["announced"]})
        meta["total_pages"] = rules.expected_pages(meta["total_pages"], page, info.total_pages)

        pkey = rules.page_key(skey, page)
        previous = self.pages.get(pkey)
        if previous is not None:
            self._count_repeat(skey, page, rules.digest(previous), rules.digest(encoded))
            # Re-assert what a crash may have lost (each table has its own changelog): the first
            # copy of the page, the page count, the sync's place in its segment's queue.
            self.pages[pkey] = previous
            meta["received"] = self._recount(skey, meta["total_pages"])
            self._enqueue(seg, skey, partition, meta["started_at"])
        else:
            self.counters.conflicts += changes.conflicts
            self.pages[pkey] = encoded
            meta["received"] += 1
        self.syncs[skey] = meta
        self._advance(skey, page, changes if previous is None else None, meta["total_pages"], self._compared_of(meta))
        # An incomplete sync cannot release its segment's queue (timeouts are the ticks' job), so
        # most pages skip the queue check. A repeat always re-checks: it may be a redelivery after
        # a crash that stopped between storing the last page and emitting.
        if previous is None and meta["received"] < meta["total_pages"]:
            return Step()
        return Step(segments=[seg])

    def _advance(self, skey: str, page: int, changes: rules.PageChanges | None, total: int,
                 identity_field: str = "") -> None:
        """Apply pages to the sync's running net state, in page order, as far as they are in."""
        if skey not in self._running:
            self._running[skey] = _Running()
        run = self._running[skey]
        if run is None:
            return  # over the memory bound: this sync is assembled from its stored pages at the end
        while run.next_page <= total:
            if run.next_page == page and changes is not None:
                current: rules.PageChanges | None = changes
            else:
                raw = self.pages.get(rules.page_key(skey, run.next_page))
                current = rules.normalised_page(identity_field, rules.decode_page(raw)) if raw is not None else None
            if current is None:
                return
            before = len(run.state)
            run.state.update(dict.fromkeys(current.add, True))
            run.state.update(dict.fromkeys(current.remove, False))
            self._cached_ids += len(run.state) - before
            run.next_page += 1
            if self._cached_ids > self.cache_max_ids:
                self._drop_running(skey, keep_marker=True)
                return

    def _drop_running(self, skey: str, keep_marker: bool = False) -> None:
        run = self._running.pop(skey, None)
        if run is not None:
            self._cached_ids -= len(run.state)
        if keep_marker:
            self._running[skey] = None

    def on_drain(self, account: str, payload: HeapDrain, *, request_id: str, partition: int, now: float,
                 replay_id: str | None = None, signed_digest: str | None = None) -> Step:
        """A drain, named by ``signed_digest`` when the record has it (else ``request_id``): a repeat
        of the same signed drain, open or already emitted, is counted and makes no second delta."""
        skey = rules.sync_key(account, "drain", rules.drain_identity(request_id, signed_digest), replay_id)
        seg = rules.segment_key(account, payload.data.segment.id)
        self.counters.pages += 1
        if skey in self.done or skey in self.syncs:
            self.counters.duplicate_pages += 1
            meta = self.syncs.get(skey)
            if meta is not None:
                self._enqueue(seg, skey, partition, meta["started_at"])
            return Step(segments=[seg])
        self.syncs[skey] = SyncMeta(
            account=account, kind="drain", ref=rules.drain_ref(request_id, signed_digest), replay_id=replay_id,
            segment=seg, segment_id=payload.data.segment.id, segment_name=payload.data.segment.name,
            identity_field=payload.customer_config.identity_field(), announced=0, total_pages=0, received=0,
            partition=partition, started_at=now,
        ).table_value()
        self._enqueue(seg, skey, partition)
        return Step(segments=[seg])

    def on_tick(self, *, partition: int, now: float | None = None) -> Step:
        """Segments of ``partition`` with open syncs: the shell re-checks them for timeouts.

        With ``now``, done markers past their retention are also removed (at most once per
        ``prune_every_seconds`` per partition). The tick is an event of ``partition``, so the
        removals go to that partition's changelog, where the markers were written.
        """
        if now is not None:
            self._prune_done(partition, now)
        segs = [k for k, v in list(self.segments.items()) if v is not None and v["p"] == partition]
        queues = [self.segments[k]["q"] for k in segs]
        open_syncs = sum(len(q) for q in queues)
        oldest = 0.0
        if now is not None:
            # a queue is in start order: its head is its oldest sync (only heads are read, one per segment)
            for queue in queues:
                meta = self.syncs.get(queue[0]) if queue else None
                if meta is not None:
                    oldest = max(oldest, now - float(meta["started_at"]))
        return Step(segments=segs, open_syncs=open_syncs, oldest_open_seconds=oldest if now is not None else None)

    # -- emitting -----------------------------------------------------------

    def next_emission(self, seg: str, now: float) -> Emission | None:
        """The head of the segment's queue if it can be emitted now (complete or timed out).

        Does not change what the sync holds: call ``mark_emitted`` once the deltas
        are out, then ``forget``. Heads already done (a crash before ``forget``)
        are cleaned up here.
        """
        while True:
            entry = self.segments.get(seg)
            if not entry or not entry["q"]:
                return None
            head = entry["q"][0]
            meta = self.syncs.get(head)
            if head in self.done or meta is None:
                self._cleanup(head, seg, meta)
                continue
            if meta["kind"] == "drain":
                return self._emission(head, meta, StoredPages(), complete=True, now=now)
            stored = StoredPages()
            if meta["received"] >= meta["total_pages"]:
                stored = self._stored(head, meta["total_pages"])
                if len(stored) == meta["total_pages"]:
                    return self._emission(head, meta, stored, complete=True, now=now)
                meta = {**meta, "received": len(stored)}  # the counter ran ahead of the pages: repair
                self.syncs[head] = meta
                log.warning("sync's page counter ran ahead of its stored pages; repaired",
                            extra={"sync": head, "stored": len(stored), "total_pages": meta["total_pages"]})
            if now - meta["started_at"] >= self.timeout_seconds:
                stored = stored or self._stored(head, meta["total_pages"])
                return self._emission(head, meta, stored, complete=False, now=now)
            return None

    def mark_emitted(self, em: Emission) -> None:
        """The deltas (or dead letter) are out: remember the sync as done before dropping its pages."""
        self.done[em.sync_key] = em.done_value
        if self.done_days is not None:
            # a crash may keep the marker and lose this entry: that marker is then never pruned (a leak, not an error)
            day = rules.done_day_key(em.partition, em.done_value["at"])
            keys = list(self.done_days.get(day) or [])
            if em.sync_key not in keys:
                self.done_days[day] = [*keys, em.sync_key]
        if em.dead_letter is not None:
            self.counters.dead_lettered += 1
        elif em.done_value.get("outcome") == "disabled":
            self.counters.disabled_syncs += 1
        else:
            self.counters.deltas += 1
            self.counters.delta_chunks += em.chunks
            self.counters.partial_deltas += 0 if em.complete else 1

    def _prune_done(self, partition: int, now: float) -> None:
        if self.done_days is None or self.done_retention_seconds is None:
            return
        if now - self._pruned_at.get(partition, float("-inf")) < self.prune_every_seconds:
            return
        self._pruned_at[partition] = now
        for day in rules.expired_done_days(partition, now, self.done_retention_seconds, self.prune_lookback_days):
            keys = self.done_days.get(day)
            if keys is None:
                continue
            for skey in keys:
                if skey in self.done:
                    del self.done[skey]
            del self.done_days[day]
            self.counters.done_pruned += len(keys)

    def forget(self, em: Emission) -> None:
        self._drop_running(em.sync_key)
        self._cleanup(em.sync_key, em.segment_key, self.syncs.get(em.sync_key), em.stored_pages)

    def drive(self, step: Step, now: float) -> Output:
        """Run every emission a step allows, without a broker in between (tests, replays in memory)."""
        out = Output(dead_letters=list(step.dead_letters))
        for seg in step.segments:
            while (em := self.next_emission(seg, now)) is not None:
                out.deltas.extend(em.iter_deltas())
                if em.dead_letter is not None:
                    out.dead_letters.append(em.dead_letter)
                self.mark_emitted(em)
                self.forget(em)
        return out

    # -- internals ---------------------------------------------------------

    def _after_done(self, skey: str, seg: str, page: int, finished: dict[str, Any], encoded: bytes,
                    changes: rules.PageChanges, payload: HeapSync) -> Step:
        digests = finished.get("digests") or []
        first = digests[page - 1] if page <= len(digests) else None
        if first is not None:
            self._count_repeat(skey, page, first, rules.digest(encoded))
            return Step(segments=[seg])
        self.counters.late_pages += 1
        log.warning("page arrived after its sync was emitted without it; dead-lettered",
                    extra={"sync": skey, "page": page})
        # Counts only: the shell adds the whole pages record (what a re-drive needs), and the ids
        # once more here would double the dead letter. ``sync_emitted_at`` is when the sync went
        # out without this page: `heapsync dlq redrive` refuses it if a newer sync of the
        # segment was emitted since.
        return Step(segments=[seg], dead_letters=[AssemblerDeadLetter.late_page(
            skey, page_number=page, total_pages=payload.data.sync_info.total_pages,
            sync_task_id=payload.data.sync_info.sync_task_id, segment_id=payload.data.segment.id,
            segment_name=payload.data.segment.name, adds=len(changes.add), removes=len(changes.remove),
            sync_emitted_at=finished.get("at"),
        )])

    def _count_repeat(self, skey: str, page: int, first_digest: str, new_digest: str) -> None:
        self.counters.duplicate_pages += 1
        if first_digest != new_digest:
            self.counters.conflicting_duplicates += 1
            log.warning("page repeated with different content; first copy kept",
                        extra={"sync": skey, "page": page})

    def _recount(self, skey: str, total: int) -> int:
        return sum(1 for p in range(1, total + 1) if rules.page_key(skey, p) in self.pages)

    def _stored(self, skey: str, total: int) -> StoredPages:
        """Digest and size of each stored page of the sync (the pages themselves are read again only if needed)."""
        found = StoredPages()
        for p in range(1, total + 1):
            raw = self.pages.get(rules.page_key(skey, p))
            if raw is not None:
                found[p] = rules.digest(raw)
                found.nbytes += len(raw)
        return found

    def _read_pages(self, skey: str, numbers: Iterable[int], identity_field: str = "") -> Iterator[rules.PageChanges]:
        for _, page in self._numbered_pages(skey, numbers, identity_field):
            yield page

    def _numbered_pages(self, skey: str, numbers: Iterable[int],
                        identity_field: str = "") -> Iterator[tuple[int, rules.PageChanges]]:
        """Stored pages, normalised again for an email identity (a page stored by an older version may hold
        case variants): so a delta never carries two variants of one address."""
        for p in numbers:
            raw = self.pages.get(rules.page_key(skey, p))
            if raw is not None:
                yield p, rules.normalised_page(identity_field, rules.decode_page(raw))

    def _kept_pages(self, skey: str, numbers: list[int],
                    identity_field: str) -> Iterator[tuple[int, rules.PageChanges]]:
        """``_numbered_pages`` for pages read while the emission is prepared, between yields to the
        event loop: a page found stored before and gone now fails the emission (it is re-driven)
        instead of leaving the delta short of its ids."""
        for p in numbers:
            raw = self.pages.get(rules.page_key(skey, p))
            if raw is None:
                raise RuntimeError(f"page {p} of the sync was dropped while its delta was being built")
            yield p, rules.normalised_page(identity_field, rules.decode_page(raw))

    def _enqueue(self, seg: str, skey: str, partition: int, started_at: float | None = None) -> None:
        """Add a sync to its segment's queue, once. A new sync goes last; one put back after a
        crash (``started_at`` given) goes before the syncs that started after it."""
        entry = self.segments.get(seg)
        queue = list(entry["q"]) if entry else []
        if skey in queue:
            return
        position = len(queue)
        if started_at is not None:
            for i, other in enumerate(queue):
                other_meta = self.syncs.get(other)
                if other_meta is not None and other_meta["started_at"] > started_at:
                    position = i
                    break
        queue.insert(position, skey)
        self.segments[seg] = {"p": partition, "q": queue}

    def _dequeue(self, seg: str, skey: str) -> None:
        entry = self.segments.get(seg)
        if not entry:
            return
        queue = [k for k in entry["q"] if k != skey]
        if queue:
            self.segments[seg] = {**entry, "q": queue}
        else:
            del self.segments[seg]

    def _cleanup(self, skey: str, seg: str, meta: dict[str, Any] | None,
                 stored_pages: Iterable[int] | None = None) -> None:
        if stored_pages is None:
            stored_pages = range(1, (meta or {}).get("total_pages", 0) + 1)
        for p in stored_pages:
            pkey = rules.page_key(skey, p)
            if pkey in self.pages:
                del self.pages[pkey]
        if skey in self.syncs:
            del self.syncs[skey]
        self._dequeue(seg, skey)

    def _emission(self, skey: str, meta: dict[str, Any], stored: StoredPages, *,
                  complete: bool, now: float) -> Emission:
        seg = meta["segment"]
        is_sync = meta["kind"] == "sync"
        total = meta["total_pages"]
        missing = rules.missing_pages(stored, total) if is_sync else []
        done_value: dict[str, Any] = {
            "at": now, "complete": complete,
            "digests": [stored.get(p) for p in range(1, total + 1)],
        }
        if not segment_settings(self.accounts, meta["account"], meta["segment_id"]).enabled:
            # acknowledged, kept in the pages topic (a replay re-drives it once enabled), nothing downstream
            done_value.update(outcome="disabled", segment_id=str(meta["segment_id"]))
            log.info("segment disabled in the accounts file; sync assembled, no delta",
                     extra={"sync": skey, "account": meta["account"], "segment_id": str(meta["segment_id"])})
            return Emission(skey, seg, complete, 0, None, done_value, sorted(stored), meta.get("partition", 0))
        if not complete and self.partial_policy == "dead-letter":
            done_value["outcome"] = "dead-letter"
            log.warning("sync timed out with pages missing; dead-lettered",
                        extra={"sync": skey, "missing": len(missing), "total_pages": total})
            numbers = sorted(stored)
            pages = {str(p): HeldPage(add=list(changes.add), remove=list(changes.remove), conflicts=changes.conflicts)
                     for p, changes in zip(numbers, self._read_pages(skey, numbers, self._compared_of(meta)))}
            letter = AssemblerDeadLetter.timed_out(
                skey, account=meta["account"], segment_id=meta["segment_id"], segment_name=meta["segment_name"],
                identity_field=meta["identity_field"], replay_id=meta["replay_id"], sync_task_id=meta["ref"],
                total_pages=total, missing_pages=missing, pages=pages,
                list_name=self._list_name(meta),  # a re-drive goes to the list the sync was for (a pinned one too)
                sync_emitted_at=now)
            return Emission(skey, seg, False, 0, letter, done_value, sorted(stored), meta.get("partition", 0))
        done_value["outcome"] = "delta"
        if not complete:
            log.warning("sync timed out with pages missing; partial delta emitted",
                        extra={"sync": skey, "missing": len(missing), "total_pages": total})
        net = self._net(skey, meta, stored, complete)
        common: dict[str, Any] = dict(
            delta_id=delta_id_for(meta["account"], meta["ref"]),
            account=meta["account"],
            segment_id=meta["segment_id"],
            segment_name=meta["segment_name"],
            list_name=self._list_name(meta),
            identity_field=meta["identity_field"],
            kind=meta["kind"],
            sync_task_id=meta["ref"] if meta["kind"] == "sync" else None,
            complete=complete,
            total_pages=meta["total_pages"],
            missing_pages=missing,
            replay_id=meta["replay_id"],
        )
        return Emission(skey, seg, complete, 0, None, done_value, sorted(stored), meta.get("partition", 0),
                        net=net, chunk_size=self.chunk_size, common=common)

    def _compared_as(self, account: str, identity_field: str) -> str:
        """The identity the sync's ids compare under: email too when the account maps the Heap field
        onto Cordial's email key (``cordial_identity_key = "email"``)."""
        found = self.accounts.get(account)
        return compared_as(identity_field, found.identity_key(identity_field) if found is not None else None)

    def _compared_of(self, meta: dict[str, Any]) -> str:
        return self._compared_as(meta["account"], meta["identity_field"])

    def _list_name(self, meta: dict[str, Any]) -> str:
        """The sync's Cordial list: pinned in the accounts file, else named after the segment as it is now."""
        pinned = segment_settings(self.accounts, meta["account"], meta["segment_id"]).list_name
        return naming.list_name_for(meta["segment_name"], pinned)

    def _net(self, skey: str, meta: dict[str, Any], stored: StoredPages, complete: bool) -> NetSource:
        """Where the delta's ids come from: the running state when it is complete, else the stored
        pages, in one dict if they are small enough, else spilled to scratch files by hash slot
        (read by the emission's ``prepare``, a few pages at a time)."""
        if meta["kind"] == "drain":
            return MemoryNet({})
        run = self._running.get(skey)
        if complete and run is not None and run.next_page > meta["total_pages"]:
            return MemoryNet(run.state)
        numbers = sorted(stored)
        size = stored.nbytes
        slots = spill.slots_for(size, self.emit_max_ids)
        if slots == 1:
            return MemoryNet(rules.net_state(self._read_pages(skey, numbers, self._compared_of(meta))))
        log.info("sync's net change computed from its stored pages in scratch files",
                 extra={"sync": skey, "pages": len(numbers), "page_bytes": size, "slots": slots})
        return spill.SpilledNet(self._kept_pages(skey, numbers, self._compared_of(meta)), slots=slots,
                                max_ids=self.emit_max_ids, scratch_dir=self.scratch_dir)

