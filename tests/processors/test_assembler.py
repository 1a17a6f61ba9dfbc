"""The assembler state machine over plain dicts: what deltas come out of what pages."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from heapsync.contracts import Delta, HeapDrain, HeapSync, delta_id_for
from heapsync_dev.samples import drain_request, heap_request
from processors import rules
from processors.assembler import Assembler, Output

ACCOUNT = "acme"


def new_assembler(**kw: Any) -> tuple[Assembler, list[dict[str, Any]]]:
    maps: list[dict[str, Any]] = [{}, {}, {}, {}]
    return Assembler(*maps, **kw), maps


def page(sync: str, n: int, total: int, add: list[str] | None = None, remove: list[str] | None = None,
         segment: str = "1", name: str = "Heap Test Segment") -> HeapSync:
    return HeapSync.model_validate(heap_request(sync, n, total, add=add or [], remove=remove or [],
                                                segment_id=segment, segment_name=name))


def feed(asm: Assembler, p: HeapSync, now: float = 0.0, replay_id: str | None = None) -> Output:
    return asm.drive(asm.on_sync_page(ACCOUNT, p, partition=0, now=now, replay_id=replay_id), now)


def tick(asm: Assembler, now: float) -> Output:
    return asm.drive(asm.on_tick(partition=0), now)


def merged(deltas: list[Delta]) -> tuple[set[str], set[str]]:
    return {i for d in deltas for i in d.add}, {i for d in deltas for i in d.remove}


def test_two_pages_out_of_order_make_one_delta() -> None:
    asm, maps = new_assembler()
    assert feed(asm, page("s1", 2, 2, ["c"], ["a"])).deltas == []
    out = feed(asm, page("s1", 1, 2, ["a", "b"]))
    [d] = out.deltas
    assert (d.add, d.remove, d.complete, d.missing_pages) == (["b", "c"], ["a"], True, [])
    assert d.delta_id == delta_id_for(ACCOUNT, "s1")
    assert (d.list_name, d.segment_name, d.identity_field, d.kind, d.sync_task_id) == (
        "HeapTestSegment", "Heap Test Segment", "email", "sync", "s1")
    pages, syncs, segments, done = maps
    assert (pages, syncs, segments) == ({}, {}, {})  # nothing left open
    assert len(done) == 1


def test_repeated_page_counts_once_and_different_content_is_flagged_first_kept() -> None:
    asm, _ = new_assembler()
    feed(asm, page("s1", 1, 2, ["a"]))
    feed(asm, page("s1", 1, 2, ["a"]))
    feed(asm, page("s1", 1, 2, ["evil"]))
    [d] = feed(asm, page("s1", 2, 2, ["b"])).deltas
    assert d.add == ["a", "b"]
    assert asm.counters.duplicate_pages == 2
    assert asm.counters.conflicting_duplicates == 1
    # a repeat after the delta went out is a duplicate, not a late page, and emits nothing
    assert feed(asm, page("s1", 2, 2, ["b"])) == Output()
    assert feed(asm, page("s1", 2, 2, ["other"])) == Output()
    assert (asm.counters.duplicate_pages, asm.counters.conflicting_duplicates, asm.counters.late_pages) == (4, 2, 0)


def test_conflicts_are_counted_and_left_out_of_their_page() -> None:
    asm, _ = new_assembler()
    [d] = feed(asm, page("s1", 1, 1, ["a", "b"], ["b", "c"])).deltas
    assert (d.add, d.remove) == (["a"], ["c"])
    assert asm.counters.conflicts == 1


def test_drain_is_one_empty_drain_delta() -> None:
    asm, _ = new_assembler()
    drain = HeapDrain.model_validate(drain_request(segment_id="1"))
    out = asm.drive(asm.on_drain(ACCOUNT, drain, request_id="r1", partition=0, now=0), 0)
    [d] = out.deltas
    assert (d.kind, d.add, d.remove, d.list_name, d.sync_task_id) == ("drain", [], [], "HeapTestSegment", None)
    # the same record again (a redelivery) is not a second drain
    assert asm.drive(asm.on_drain(ACCOUNT, drain, request_id="r1", partition=0, now=0), 0).deltas == []


def drain_step(asm: Assembler, request_id: str, digest: str | None, now: float = 0.0,
               replay_id: str | None = None) -> Output:
    drain = HeapDrain.model_validate(drain_request(segment_id="1"))
    return asm.drive(asm.on_drain(ACCOUNT, drain, request_id=request_id, partition=0, now=now,
                                  replay_id=replay_id, signed_digest=digest), now)


def test_the_same_signed_drain_under_new_request_ids_clears_once() -> None:
    """Issue 16 #3: X-Request-Id is not signed; a replayed drain must not clear the list again."""
    asm, maps = new_assembler()
    [d] = drain_step(asm, "r1", "ab" * 32).deltas
    assert d.kind == "drain" and d.delta_id == delta_id_for(ACCOUNT, f"drain:signed={'ab' * 32}")
    feed(asm, page("after", 1, 1, ["x"]), now=1)  # the list is filled again after the drain
    for n, rid in enumerate(["r2", "r3", "attacker-chosen"], start=1):
        assert drain_step(asm, rid, "ab" * 32, now=1 + n) == Output()
    assert asm.counters.duplicate_pages == 3 and asm.counters.deltas == 2
    assert (maps[0], maps[1], maps[2]) == ({}, {}, {})  # nothing left open
    # another signed drain (new ts or body, so a new digest) is a drain of its own
    [again] = drain_step(asm, "r1", "cd" * 32, now=9).deltas
    assert again.kind == "drain" and again.delta_id != d.delta_id


def test_a_signed_drain_repeated_while_it_waits_in_its_segment_queue_is_one_drain() -> None:
    asm, _ = new_assembler()
    feed(asm, page("old", 1, 2, ["a"]))
    assert drain_step(asm, "r1", "ab" * 32) == Output()
    assert drain_step(asm, "r2", "ab" * 32) == Output()
    out = feed(asm, page("old", 2, 2, ["b"]))
    assert [d.kind for d in out.deltas] == ["sync", "drain"]


def test_drains_recorded_before_the_digest_are_still_named_by_request_id() -> None:
    asm, _ = new_assembler()
    [d] = drain_step(asm, "r1", None).deltas
    assert d.delta_id == delta_id_for(ACCOUNT, "drain:r1")
    assert drain_step(asm, "r1", None) == Output()  # a redelivery of the same record
    assert len(drain_step(asm, "r2", None).deltas) == 1  # without a digest nothing else can tell


def test_a_replayed_signed_drain_is_applied_again_as_a_replay() -> None:
    asm, _ = new_assembler()
    [first] = drain_step(asm, "r1", "ab" * 32).deltas
    [replayed] = drain_step(asm, "r1", "ab" * 32, replay_id="rp1").deltas
    assert replayed.delta_id == first.delta_id and replayed.replay_id == "rp1"


def test_a_later_sync_and_a_drain_wait_for_an_earlier_sync_of_the_segment() -> None:
    asm, _ = new_assembler()
    feed(asm, page("old", 1, 2, ["a"]))
    assert feed(asm, page("new", 1, 1, ["b"])).deltas == []
    drain = HeapDrain.model_validate(drain_request(segment_id="1"))
    assert asm.drive(asm.on_drain(ACCOUNT, drain, request_id="r", partition=0, now=0), 0).deltas == []
    # another segment is not held up
    assert len(feed(asm, page("elsewhere", 1, 1, ["z"], segment="2")).deltas) == 1
    out = feed(asm, page("old", 2, 2, ["c"]))
    assert [(d.sync_task_id, d.kind) for d in out.deltas] == [("old", "sync"), ("new", "sync"), (None, "drain")]


def test_timeout_emits_a_partial_delta_then_releases_the_queue_and_late_pages_are_dead_lettered() -> None:
    asm, maps = new_assembler(timeout_seconds=60)
    feed(asm, page("old", 1, 3, ["a"]), now=0)
    feed(asm, page("old", 3, 3, ["c"]), now=1)
    feed(asm, page("new", 1, 1, ["b"]), now=2)
    assert tick(asm, now=59).deltas == []
    out = tick(asm, now=60)
    assert [(d.sync_task_id, d.complete, d.missing_pages) for d in out.deltas] == [
        ("old", False, [2]), ("new", True, [])]
    assert out.deltas[0].add == ["a", "c"]
    assert asm.counters.partial_deltas == 1
    late = feed(asm, page("old", 2, 3, ["x"]), now=61)
    assert late.deltas == []
    [letter] = late.dead_letters
    # the ids once: as counts here, the worker adds the whole pages record (what a re-drive needs)
    assert letter.detail["page_number"] == 2 and (letter.detail["adds"], letter.detail["removes"]) == (1, 0)
    assert "add" not in letter.detail and "remove" not in letter.detail
    assert letter.detail["sync_emitted_at"] == 60  # when the sync went out without it: `dlq redrive` checks
    assert asm.counters.late_pages == 1
    assert maps[0] == {} and maps[1] == {} and maps[2] == {}


def test_dead_letter_policy_sends_the_timed_out_sync_with_its_pages() -> None:
    asm, _ = new_assembler(timeout_seconds=10, partial_policy="dead-letter")
    feed(asm, page("s", 2, 2, ["b"], ["c"]), now=0)
    out = tick(asm, now=10)
    assert out.deltas == []
    [letter] = out.dead_letters
    assert letter.detail["missing_pages"] == [1]
    assert letter.detail["pages"] == {"2": {"add": ["b"], "remove": ["c"], "conflicts": 0}}
    assert asm.counters.dead_lettered == 1


def test_pages_disagreeing_on_total_pages_wait_for_the_largest() -> None:
    asm, _ = new_assembler()
    feed(asm, page("s", 1, 2, ["a"]))
    assert feed(asm, page("s", 2, 3, ["b"])).deltas == []
    [d] = feed(asm, page("s", 3, 3, ["c"])).deltas
    assert d.add == ["a", "b", "c"] and d.total_pages == 3
    assert asm.counters.total_pages_mismatches == 2  # pages 2 and 3 differ from page 1


def test_big_sync_is_chunked_and_chunks_partition_the_ids() -> None:
    asm, _ = new_assembler(chunk_size=7)
    feed(asm, page("s", 1, 2, [f"u{i}" for i in range(30)]))
    out = feed(asm, page("s", 2, 2, [], [f"u{i}" for i in range(20, 40)]))
    assert [d.chunk for d in out.deltas] == list(range(1, len(out.deltas) + 1))
    assert {d.chunks for d in out.deltas} == {len(out.deltas)} == {6}
    assert all(len(d.add) + len(d.remove) <= 7 for d in out.deltas)
    assert len({d.delta_id for d in out.deltas}) == 1
    add, remove = merged(out.deltas)
    assert add == {f"u{i}" for i in range(20)} and remove == {f"u{i}" for i in range(20, 40)}


def test_replayed_pages_make_a_fresh_delta_with_the_same_id_and_the_replay_id() -> None:
    asm, _ = new_assembler()
    [first] = feed(asm, page("s", 1, 1, ["a"])).deltas
    assert feed(asm, page("s", 1, 1, ["a"])).deltas == []  # a plain repeat is swallowed
    [again] = feed(asm, page("s", 1, 1, ["a"]), replay_id="rp1").deltas
    assert (again.delta_id, again.replay_id, again.add) == (first.delta_id, "rp1", ["a"])
    assert again.chunk_key != first.chunk_key


def test_crash_after_publishing_before_marking_done_repeats_the_same_delta() -> None:
    asm, maps = new_assembler()
    asm.drive(asm.on_sync_page(ACCOUNT, page("s", 1, 2, ["a"]), partition=0, now=0), 0)
    step = asm.on_sync_page(ACCOUNT, page("s", 2, 2, ["b"]), partition=0, now=0)
    published = asm.next_emission(step.segments[0], 0)
    assert published is not None  # ... sent, then the worker dies before mark_emitted
    # restart: the uncommitted page is read again on the same state
    [again] = feed(asm, page("s", 2, 2, ["b"])).deltas
    assert again.model_dump(exclude={"emitted_at"}) == next(published.iter_deltas()).model_dump(exclude={"emitted_at"})


def test_crash_after_marking_done_finishes_the_cleanup_without_a_second_delta() -> None:
    asm, maps = new_assembler()
    feed(asm, page("s", 1, 2, ["a"]))
    step = asm.on_sync_page(ACCOUNT, page("s", 2, 2, ["b"]), partition=0, now=0)
    em = asm.next_emission(step.segments[0], 0)
    assert em is not None
    asm.mark_emitted(em)  # ... and the worker dies before forget
    assert feed(asm, page("s", 2, 2, ["b"])).deltas == []
    assert maps[0] == {} and maps[1] == {} and maps[2] == {}


def test_a_page_counter_that_ran_ahead_of_the_stored_pages_does_not_emit_early() -> None:
    # A crash can leave the sync's counter in the changelog but not the page it counted.
    asm, maps = new_assembler()
    feed(asm, page("s", 1, 2, ["a"]))
    skey = rules.sync_key(ACCOUNT, "sync", "s", None)
    maps[1][skey] = {**maps[1][skey], "received": 2}
    assert tick(asm, now=1).deltas == []
    [d] = feed(asm, page("s", 2, 2, ["b"])).deltas
    assert d.add == ["a", "b"] and d.complete


def test_a_stored_page_whose_count_was_lost_is_recounted_on_redelivery() -> None:
    asm, maps = new_assembler()
    feed(asm, page("s", 1, 2, ["a"]))
    skey = rules.sync_key(ACCOUNT, "sync", "s", None)
    asm.on_sync_page(ACCOUNT, page("s", 2, 2, ["b"]), partition=0, now=0)
    maps[1][skey] = {**maps[1][skey], "received": 1}  # the counter write was lost in the crash
    [d] = feed(asm, page("s", 2, 2, ["b"])).deltas
    assert d.add == ["a", "b"]


def test_a_sync_lost_from_its_segment_queue_is_put_back_in_start_order_on_redelivery() -> None:
    asm, maps = new_assembler()
    feed(asm, page("first", 1, 2, ["a"]), now=1)
    feed(asm, page("second", 1, 1, ["b"]), now=2)  # complete, waits behind "first"
    seg = rules.segment_key(ACCOUNT, "1")
    first = rules.sync_key(ACCOUNT, "sync", "first", None)
    maps[2][seg] = {**maps[2][seg], "q": [k for k in maps[2][seg]["q"] if k != first]}  # lost in a crash
    out = feed(asm, page("first", 1, 2, ["a"]), now=3)  # the uncommitted page comes again
    assert [d.sync_task_id for d in out.deltas] == []  # "second" still waits: "first" is back ahead of it
    out = feed(asm, page("first", 2, 2, ["c"]), now=4)
    assert [d.sync_task_id for d in out.deltas] == ["first", "second"]


# -- properties ---------------------------------------------------------------

USERS = [f"u{i}@example.com" for i in range(25)]
sync_pages = st.lists(st.tuples(st.lists(st.sampled_from(USERS), max_size=8),
                                st.lists(st.sampled_from(USERS), max_size=8)), min_size=1, max_size=7)


def in_order_delta(pages: list[tuple[list[str], list[str]]], sync: str = "s") -> tuple[set[str], set[str]]:
    asm, _ = new_assembler()
    out = Output()
    for n, (a, r) in enumerate(pages, start=1):
        out.extend(feed(asm, page(sync, n, len(pages), a, r)))
    return merged(out.deltas)


@settings(max_examples=150, deadline=None)
@given(pages=sync_pages, seed=st.integers(0, 2**32), chunk=st.integers(1, 10))
def test_any_shuffle_and_duplication_gives_the_in_order_delta(
        pages: list[tuple[list[str], list[str]]], seed: int, chunk: int) -> None:
    rnd = random.Random(seed)
    arrivals = list(range(1, len(pages) + 1)) + [rnd.randint(1, len(pages)) for _ in range(rnd.randint(0, 5))]
    rnd.shuffle(arrivals)
    asm, maps = new_assembler(chunk_size=chunk)
    out = Output()
    for n in arrivals:
        a, r = pages[n - 1]
        out.extend(feed(asm, page("s", n, len(pages), a, r)))
    assert len({d.delta_id for d in out.deltas}) == 1
    assert sorted(d.chunk for d in out.deltas) == list(range(1, out.deltas[0].chunks + 1))
    add, remove = merged(out.deltas)
    assert not add & remove
    assert sum(len(d.add) + len(d.remove) for d in out.deltas) == len(add) + len(remove)  # each id once
    assert (add, remove) == in_order_delta(pages)
    assert maps[0] == {} and maps[1] == {} and maps[2] == {}
    # the running in-memory net state is only a cache: without it, the very same chunks come out
    uncached, _ = new_assembler(chunk_size=chunk, cache_max_ids=0)
    plain = Output()
    for n in arrivals:
        a, r = pages[n - 1]
        plain.extend(feed(uncached, page("s", n, len(pages), a, r)))
    assert [d.model_dump(exclude={"emitted_at"}) for d in plain.deltas] == [
        d.model_dump(exclude={"emitted_at"}) for d in out.deltas]


@settings(max_examples=100, deadline=None)
@given(syncs=st.lists(sync_pages, min_size=1, max_size=4), seed=st.integers(0, 2**32))
def test_deltas_of_one_segment_come_out_in_the_order_the_syncs_started(
        syncs: list[list[tuple[list[str], list[str]]]], seed: int) -> None:
    rnd = random.Random(seed)
    pending = [[(i, n) for n in range(1, len(pages) + 1)] for i, pages in enumerate(syncs)]
    for p in pending:
        rnd.shuffle(p)
    arrivals: list[tuple[int, int]] = []
    while any(pending):  # interleave the syncs' pages at random
        arrivals.append(rnd.choice([p for p in pending if p]).pop())
    started: list[int] = []
    asm, _ = new_assembler()
    out = Output()
    for i, n in arrivals:
        if i not in started:
            started.append(i)
        a, r = syncs[i][n - 1]
        out.extend(feed(asm, page(f"s{i}", n, len(syncs[i]), a, r)))
    emitted = [d.sync_task_id for d in out.deltas if d.chunk == 1]
    assert emitted == [f"s{i}" for i in started]
    for i, pages in enumerate(syncs):
        assert merged([d for d in out.deltas if d.sync_task_id == f"s{i}"]) == in_order_delta(pages)
    # applying the deltas in emitted order gives the list the pages describe, in start order
    members: set[str] = set()
    expected: set[str] = set()
    for d in out.deltas:
        members = rules.apply_changes(members, d.add, d.remove)
    for i in started:
        for a, r in syncs[i]:
            both = set(a) & set(r)
            expected = (expected - (set(r) - both)) | (set(a) - both)
    assert members == expected


DAY = 86_400.0


def test_done_markers_go_once_the_pages_retention_has_passed() -> None:
    days: dict[str, Any] = {}
    asm, maps = new_assembler(done_days=days, done_retention_seconds=14 * DAY)
    done = maps[3]
    at = 100 * DAY + 3600  # 01:00 on day 100
    feed(asm, page("s1", 1, 1, ["a"]), now=at)
    feed(asm, page("s2", 1, 1, ["b"], segment="2"), now=at + 60)
    assert set(done) == {rules.sync_key(ACCOUNT, "sync", s, None) for s in ("s1", "s2")}
    assert days == {rules.done_day_key(0, at): list(done)}

    asm.on_tick(partition=0, now=at + 14 * DAY)  # day 100 has not been over for 14 days yet
    assert len(done) == 2
    asm.on_tick(partition=0, now=115 * DAY + 1)  # one hour later at least, and day 100 ended 14 days ago
    assert done == {} and days == {}
    assert asm.counters.done_pruned == 2
    # a page of the sync read again after that is a new sync: only possible past the topic's retention
    assert len(feed(asm, page("s1", 1, 1, ["a"]), now=116 * DAY).deltas) == 1


def test_pruning_touches_only_the_ticking_partition_and_at_most_hourly() -> None:
    days: dict[str, Any] = {}
    asm, maps = new_assembler(done_days=days, done_retention_seconds=DAY)
    done = maps[3]
    step = asm.on_sync_page(ACCOUNT, page("p1", 1, 1, ["a"]), partition=1, now=10 * DAY)
    asm.drive(step, 10 * DAY)
    feed(asm, page("p0", 1, 1, ["b"], segment="2"), now=10 * DAY)
    asm.on_tick(partition=0, now=11 * DAY)  # day 10 ended less than a day ago: nothing yet
    asm.on_tick(partition=0, now=12 * DAY)  # within the hour? no: a day later, prunes partition 0
    assert set(done) == {rules.sync_key(ACCOUNT, "sync", "p1", None)}
    asm.on_tick(partition=1, now=12 * DAY)
    assert done == {}


def test_without_a_day_index_markers_stay() -> None:
    asm, maps = new_assembler()
    feed(asm, page("s1", 1, 1, ["a"]), now=0.0)
    asm.on_tick(partition=0, now=1000 * DAY)
    assert len(maps[3]) == 1


@given(at=st.floats(0, 1e9), age=st.floats(0, 1e8), retention=st.floats(0, 1e7))
def test_a_day_expires_exactly_when_it_ended_a_retention_ago(at: float, age: float, retention: float) -> None:
    now = at + age
    ended = (at // DAY + 1) * DAY
    expired = rules.done_day_key(3, at) in rules.expired_done_days(3, now, retention, lookback_days=2000)
    if age < 1500 * DAY:  # inside the lookback
        assert expired == (ended <= now - retention)
