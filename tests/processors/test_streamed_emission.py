"""Streamed emission (issue 15): a sync's delta computed in hash buckets spilled to files gives the very
delta, chunk for chunk, that the one-dict rules give, whatever the bucket bound."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from heapsync.contracts import HeapDrain
from heapsync_dev.samples import drain_request
from processors import rules, spill
from processors.assembler import Assembler, Output
from tests.processors.test_assembler import ACCOUNT, page

ids = st.sampled_from([f"user{i}@example.com" for i in range(14)] + ["x", "ü-ñ"])
# pages with repeats inside a page, conflicts (an id in both lists), removals and re-adds across pages
pages_of = st.lists(st.tuples(st.lists(ids, max_size=10), st.lists(ids, max_size=6)), min_size=1, max_size=7)


def reference_chunks(pages: list[tuple[list[str], list[str]]], size: int) -> list[tuple[list[str], list[str]]]:
    """Today's rules: one dict of the whole sync, then the chunk lists."""
    return rules.chunk_changes(rules.net_of_ordered(rules.page_changes(a, r) for a, r in pages), size)


@settings(max_examples=300, deadline=None)
@given(pages=pages_of, slots=st.integers(1, 9), max_ids=st.integers(1, 20), size=st.integers(1, 8))
def test_bucketed_net_gives_the_same_chunks_as_the_one_dict_rules(
        pages: list[tuple[list[str], list[str]]], slots: int, max_ids: int, size: int) -> None:
    numbered = [(n, rules.page_changes(a, r)) for n, (a, r) in enumerate(pages, start=1)]
    removes, adds, remove_ids, add_ids = rules.streamed_net(numbered, slots, max_ids)
    chunks = list(rules.iter_chunks(remove_ids, add_ids, size))
    assert chunks == reference_chunks(pages, size)
    assert rules.chunk_count(removes, adds, size) == len(chunks)


@settings(max_examples=150, deadline=None)
@given(pages=pages_of, max_ids=st.integers(1, 20), size=st.integers(1, 8))
def test_spilled_net_in_files_gives_the_same_chunks_and_leaves_no_files(
        pages: list[tuple[list[str], list[str]]], max_ids: int, size: int) -> None:
    numbered = [(n, rules.page_changes(a, r)) for n, (a, r) in enumerate(pages, start=1)]
    stored = sum(len(p.encode()) for _, p in numbered)
    with tempfile.TemporaryDirectory() as tmp:
        net = spill.SpilledNet(numbered, slots=spill.slots_for(stored, max_ids), max_ids=max_ids,
                               scratch_dir=Path(tmp))
        chunks = list(rules.iter_chunks(net.remove_ids(), net.add_ids(), size))
        net.close()
        assert chunks == reference_chunks(pages, size)
        assert rules.chunk_count(net.removes, net.adds, size) == len(chunks)
        assert list(Path(tmp).iterdir()) == []


def test_slots_bound_what_one_bucket_can_hold() -> None:
    assert spill.slots_for(4 * 1000, 1000) == 1  # at most 1,000 ids: one dict
    assert spill.slots_for(4 * 1000 + 1, 1000) == 2
    assert spill.slots_for(10**12, 1) == spill.MAX_SLOTS
    groups = rules.group_slots([3, 0, 2, 5, 1, 9], 5)
    assert groups == [[0, 2], [3], [4], [5]]  # consecutive, empty slots left out, an oversized slot alone


Sync = list[tuple[list[str], list[str]]]


def run_segment(syncs: list[Sync | None], arrivals: list[tuple[int, int]], scratch: Path, **kw: Any) -> Output:
    """Feed one segment's syncs (None: a drain) in the given arrival order; every delta that comes out."""
    asm = Assembler({}, {}, {}, {}, scratch_dir=scratch, **kw)
    out = Output()
    for i, n in arrivals:
        sync = syncs[i]
        if sync is None:
            drain = HeapDrain.model_validate(drain_request(segment_id="1"))
            step = asm.on_drain(ACCOUNT, drain, request_id=f"drain-{i}", partition=0, now=0)
        else:
            a, r = sync[n - 1]
            step = asm.on_sync_page(ACCOUNT, page(f"s{i}", n, len(sync), a, r), partition=0, now=0)
        out.extend(asm.drive(step, 0))
    return out


@settings(max_examples=100, deadline=None)
@given(syncs=st.lists(st.one_of(st.none(), pages_of), min_size=1, max_size=4), seed=st.integers(0, 2**32),
       size=st.integers(1, 6), emit_max_ids=st.integers(1, 12), cache_max_ids=st.integers(0, 30))
def test_assembler_emits_the_same_deltas_streamed_as_with_the_one_dict_rules(
        syncs: list[Sync | None], seed: int, size: int, emit_max_ids: int, cache_max_ids: int) -> None:
    """Syncs and drains of one segment, pages shuffled and repeated: with a tiny cache and bucket bound
    (so most syncs spill) the deltas are those of an assembler holding everything in memory."""
    rnd = random.Random(seed)
    pending = [[(i, n) for n in range(1, len(s) + 1)] if s is not None else [(i, 0)] for i, s in enumerate(syncs)]
    for p in pending:
        p += [rnd.choice(p) for _ in range(rnd.randint(0, 2))]  # repeats
        rnd.shuffle(p)
    arrivals: list[tuple[int, int]] = []
    while any(pending):
        arrivals.append(rnd.choice([p for p in pending if p]).pop())
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / "scratch"
        big = run_segment(syncs, arrivals, scratch, chunk_size=size)
        small = run_segment(syncs, arrivals, scratch, chunk_size=size, emit_max_ids=emit_max_ids,
                            cache_max_ids=cache_max_ids)
        assert not scratch.exists() or list(scratch.iterdir()) == []  # every emission removed its files
    assert [d.model_dump(exclude={"emitted_at"}) for d in small.deltas] == [
        d.model_dump(exclude={"emitted_at"}) for d in big.deltas]
    for i, sync in enumerate(syncs):  # and the one-dict delta is the rule's
        if sync is None:
            continue
        mine = [(d.add, d.remove) for d in big.deltas if d.sync_task_id == f"s{i}"]
        assert mine == reference_chunks(sync, size)


def test_emitting_a_large_sync_holds_one_bucket_and_one_chunk_not_the_sync(tmp_path: Path) -> None:
    """Python allocations while a 100,000-id sync's delta is computed and taken chunk by chunk stay
    a small fraction of what the sync's ids take (the one-dict emission held them all, twice)."""
    import tracemalloc

    pages = [([f"user{n:03d}-{i:04d}@example.com" for i in range(1000)], [f"user{n - 1:03d}-{i:04d}@example.com"
              for i in range(0, 1000, 50)] if n else []) for n in range(100)]
    asm = Assembler({}, {}, {}, {}, chunk_size=1000, cache_max_ids=0, emit_max_ids=5000,
                    scratch_dir=tmp_path / "scratch")
    for n, (a, r) in enumerate(pages, start=1):
        step = asm.on_sync_page(ACCOUNT, page("big", n, len(pages), a, r), partition=0, now=0)
    tracemalloc.start()
    try:
        em = asm.next_emission(step.segments[0], 0)
        assert em is not None
        steps = sum(1 for _ in em.prepare())  # the shell lets its event loop run between these
        ids = 0
        for delta in em.iter_deltas():
            ids += len(delta.add) + len(delta.remove)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ids == 100_000 and em.chunks == 100
    assert steps >= 20  # one per bucket of at most 5,000 occurrences
    assert peak < 5_000_000, f"{peak / 1e6:.1f} MB allocated at peak"  # 2.8 MB; the code before: 12.3 MB


class CountingPages(dict[str, bytes]):
    """A pages table that counts reads, to see when the emission reads the stored pages."""

    reads = 0

    def get(self, key: str, default: Any = None) -> Any:
        self.reads += 1
        return super().get(key, default)


def test_a_spilled_sync_is_read_a_few_pages_per_step_of_prepare(tmp_path: Path) -> None:
    """Issue 15: ``next_emission`` runs in one go on the worker's event loop, so it reads each stored
    page once (digest and size) and spills nothing; ``prepare`` then writes the scratch files at most
    ``SCATTER_PAGES`` pages between yields, so heartbeats and acks run while a 100,000-page sync spills."""
    n_pages = 3 * spill.SCATTER_PAGES + 7
    table = CountingPages()
    asm = Assembler(table, {}, {}, {}, chunk_size=50, cache_max_ids=0, emit_max_ids=20,
                    scratch_dir=tmp_path / "scratch")
    pages = [([f"u{n}-{i}@example.com" for i in range(4)], [f"u{n - 1}-0@example.com"] if n else [])
             for n in range(n_pages)]
    for n, (a, r) in enumerate(pages, start=1):
        step = asm.on_sync_page(ACCOUNT, page("big", n, n_pages, a, r), partition=0, now=0)
    table.reads = 0
    em = asm.next_emission(step.segments[0], 0)
    assert em is not None and isinstance(em.net, spill.SpilledNet)
    assert table.reads == n_pages  # digests and sizes in one read; nothing scattered yet
    assert not list((tmp_path / "scratch").rglob("slot-*"))
    table.reads = 0
    reads_per_step = []
    for _ in em.prepare():
        reads_per_step.append(table.reads)
        table.reads = 0
    assert sum(reads_per_step) + table.reads == n_pages
    assert max(reads_per_step) <= spill.SCATTER_PAGES
    assert sum(1 for r in reads_per_step if r) >= n_pages // spill.SCATTER_PAGES
    chunks = [(d.add, d.remove) for d in em.iter_deltas()]
    assert chunks == reference_chunks(pages, 50)


def test_a_page_gone_while_a_spilled_sync_is_prepared_fails_the_emission(tmp_path: Path) -> None:
    """Pages are read between yields: one dropped meanwhile must not leave a short delta marked complete."""
    table: dict[str, bytes] = {}
    asm = Assembler(table, {}, {}, {}, chunk_size=50, cache_max_ids=0, emit_max_ids=2,
                    scratch_dir=tmp_path / "scratch")
    for n in range(1, 4):
        step = asm.on_sync_page(ACCOUNT, page("s", n, 3, [f"a{n}", f"b{n}", f"c{n}"], []), partition=0, now=0)
    em = asm.next_emission(step.segments[0], 0)
    assert em is not None and isinstance(em.net, spill.SpilledNet)
    del table[rules.page_key(em.sync_key, 3)]
    with pytest.raises(RuntimeError, match="page 3"):
        list(em.prepare())
    assert not (tmp_path / "scratch").exists() or not any((tmp_path / "scratch").iterdir())
