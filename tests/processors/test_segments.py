"""The assembler with per-segment settings (a pinned list name, a disabled segment) and email identities as
Cordial compares them (issue 14, #2 and #3), over dicts. The chain is in tests/chain/test_segments.py."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from heapsync import identities
from heapsync.contracts import HeapDrain, HeapSync
from heapsync.settings import Account
from heapsync_dev.samples import drain_request, heap_request
from processors import rules
from processors.assembler import Assembler, Output
from tests.core.test_segment_settings import accounts


def new_assembler(acc: dict[str, Account] | None = None, **kw: Any) -> Assembler:
    return Assembler({}, {}, {}, {}, accounts=acc, **kw)


def page(sync: str, n: int, total: int, add: list[str] | None = None, remove: list[str] | None = None,
         segment: str = "1", name: str = "Heap Test Segment", identity: str = "email") -> HeapSync:
    return HeapSync.model_validate(heap_request(sync, n, total, add=add or [], remove=remove or [],
                                                segment_id=segment, segment_name=name, identity=identity))


def feed(asm: Assembler, p: HeapSync, now: float = 0.0) -> Output:
    return asm.drive(asm.on_sync_page("acme", p, partition=0, now=now), now)


def test_a_pinned_list_survives_a_rename_and_an_unpinned_one_follows_the_name() -> None:
    asm = new_assembler(accounts('[accounts.acme.segments."1"]\nlist_name = "Customers"\n'))
    [before] = feed(asm, page("s1", 1, 1, ["a@x.com"], segment="1", name="Old Name")).deltas
    [after] = feed(asm, page("s2", 1, 1, ["b@x.com"], segment="1", name="New Name")).deltas
    assert before.list_name == after.list_name == "Customers"
    assert after.segment_name == "New Name"  # the delta still says what Heap calls it
    [other] = feed(asm, page("s3", 1, 1, ["c@x.com"], segment="2", name="New Name")).deltas
    assert other.list_name == "NewName"
    [drain] = asm.drive(asm.on_drain("acme", HeapDrain.model_validate(drain_request("1", "Newest")),
                                     request_id="r", partition=0, now=0), 0).deltas
    assert drain.list_name == "Customers"


def test_a_timed_out_sync_dead_letter_names_the_pinned_list_for_its_redrive() -> None:
    asm = new_assembler(accounts('[accounts.acme.segments."1"]\nlist_name = "Customers"\n'),
                        timeout_seconds=10, partial_policy="dead-letter")
    feed(asm, page("s", 2, 2, ["b@x.com"]), now=0)
    [letter] = asm.drive(asm.on_tick(partition=0), 10).dead_letters
    assert letter.list_name == "Customers"


def test_a_disabled_segment_is_assembled_and_marked_done_with_no_delta() -> None:
    asm = new_assembler(accounts('[accounts.acme.segments."1"]\nenabled = false\n'))
    assert feed(asm, page("s1", 2, 2, ["a@x.com"])).deltas == []
    out = feed(asm, page("s1", 1, 2, ["b@x.com"]))
    assert out.deltas == [] and out.dead_letters == []
    assert asm.counters.disabled_syncs == 1 and asm.counters.deltas == 0
    done = asm.done[rules.sync_key("acme", "sync", "s1", None)]
    assert done["outcome"] == "disabled" and done["segment_id"] == "1"
    assert asm.pages == {} and asm.syncs == {} and asm.segments == {}  # nothing left open
    # a repeat of a page of the skipped sync is a repeat, not a new sync
    assert feed(asm, page("s1", 1, 2, ["b@x.com"])).deltas == [] and asm.counters.duplicate_pages == 1
    # a drain of a disabled segment does not clear its list either
    assert asm.drive(asm.on_drain("acme", HeapDrain.model_validate(drain_request("1")), request_id="r",
                                  partition=0, now=0), 0).deltas == []
    # other segments of the account flow
    assert len(feed(asm, page("s2", 1, 1, ["c@x.com"], segment="2")).deltas) == 1


def test_a_disabled_segment_timing_out_is_not_dead_lettered() -> None:
    asm = new_assembler(accounts('[accounts.acme.segments."1"]\nenabled = false\n'),
                        timeout_seconds=10, partial_policy="dead-letter")
    feed(asm, page("s", 2, 2, ["b@x.com"]), now=0)
    out = asm.drive(asm.on_tick(partition=0), 10)
    assert out.deltas == [] and out.dead_letters == [] and asm.counters.disabled_syncs == 1



# -- email identities ------------------------------------------------------------------


def test_emails_are_trimmed_and_lower_cased_other_identities_stay_exact() -> None:
    assert rules.normalise_ids("email", [" Ann@X.com ", "BOB@x.COM"]) == ["ann@x.com", "bob@x.com"]
    assert rules.normalise_ids("user_id", [" Ann ", "ann"]) == [" Ann ", "ann"]


def test_case_variants_in_one_page_are_one_contact_and_add_remove_variants_conflict() -> None:
    asm = new_assembler()
    [d] = feed(asm, page("s", 1, 1, ["Ann@x.com", "ann@X.com", " ANN@x.com", "Bob@x.com"], ["BOB@x.com"])).deltas
    assert (d.add, d.remove) == (["ann@x.com"], [])
    assert asm.counters.conflicts == 1


def test_last_appearance_wins_across_case_variants() -> None:
    asm = new_assembler()
    feed(asm, page("s", 2, 2, remove=["ann@x.com"]))
    [d] = feed(asm, page("s", 1, 2, add=["Ann@X.com"])).deltas
    assert (d.add, d.remove) == ([], ["ann@x.com"])


def test_other_identities_keep_their_case() -> None:
    asm = new_assembler()
    [d] = feed(asm, page("s", 1, 1, ["Ann", "ann"], identity="user_id")).deltas
    assert sorted(d.add) == ["Ann", "ann"]


FIELDS = st.sampled_from(["email", "Email", "user_email", "customerId", "user_id"])


@settings(max_examples=100, deadline=None)
@given(field=FIELDS, mapped_to=st.sampled_from([None, "email", "customerId", "Email"]),
       ids=st.lists(st.sampled_from([" Ann@X.com", "ann@x.com", "BOB@x.com ", "Cust-1"]), max_size=5))
def test_ids_are_normalised_exactly_when_they_go_to_cordials_email_key(
        field: str, mapped_to: str | None, ids: list[str]) -> None:
    """The rule: an account's ``identity_key`` decides (a Heap field ``Email`` mapped onto ``email`` is emails);
    without the account, only a field named ``email``."""
    line = f'cordial_identity_key = "{mapped_to}"\n' if mapped_to else ""
    account = accounts(line)["acme"]
    to_email = account.identity_key(field) == "email"
    compared = identities.compared_as(field, account.identity_key(field))
    assert (compared == "email") == to_email
    expected = [i.strip().lower() for i in ids] if to_email else ids
    assert rules.normalise_ids(compared, ids) == expected
    assert (identities.compared_as(field) == "email") == (field == "email")


def test_a_heap_field_the_account_maps_onto_cordials_email_gives_one_contact_per_address() -> None:
    asm = new_assembler(accounts('cordial_identity_key = "email"\n'))
    assert feed(asm, page("s", 1, 2, ["Ann@x.com", " ann@X.com"], identity="Email")).deltas == []
    [d] = feed(asm, page("s", 2, 2, ["BOB@x.com"], ["Ann@X.COM"], identity="Email")).deltas
    assert (d.add, d.remove, d.identity_field) == (["bob@x.com"], ["ann@x.com"], "Email")
    # not mapped (the Cordial key is the Heap field's own name): exact, as before
    [d] = feed(new_assembler(accounts()), page("s", 1, 1, ["Ann@x.com", "ann@x.com"], identity="Email")).deltas
    assert sorted(d.add) == ["Ann@x.com", "ann@x.com"]


def test_pages_stored_before_normalisation_never_give_a_delta_two_variants() -> None:
    """A sync in flight across the upgrade: its first page was stored with the ids as sent."""
    asm = new_assembler()
    feed(asm, page("s", 2, 3, add=["carl@x.com"]))
    skey = rules.sync_key("acme", "sync", "s", None)
    asm.pages[rules.page_key(skey, 1)] = rules.PageChanges(("Ann@x.com", "ann@x.com", "Bob@x.com"),
                                                           ("BOB@x.com",)).encode()
    asm.syncs[skey] = {**asm.syncs[skey], "received": 2}
    asm.clear_cache()  # the running state of a restarted worker is empty
    [d] = feed(asm, page("s", 3, 3, remove=["Carl@X.com"])).deltas
    assert (d.add, d.remove) == (["ann@x.com"], ["carl@x.com"])


EMAILS = st.sampled_from(["ann@x.com", "bob@x.com", "carl@x.com", "dee@x.com"])


def _variant(address: str, upper: list[bool], pad: bool) -> str:
    text = "".join(c.upper() if up else c for c, up in zip(address, upper + [False] * len(address)))
    return f" {text} " if pad else text


@settings(max_examples=150, deadline=None)
@given(
    syncs=st.lists(st.lists(st.tuples(st.lists(EMAILS, max_size=4), st.lists(EMAILS, max_size=4)),
                            min_size=1, max_size=3), min_size=1, max_size=3),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_final_list_is_the_same_whatever_case_variants_and_order_pages_arrive_in(
        syncs: list[list[tuple[list[str], list[str]]]], seed: int) -> None:
    """Each page sent once in lower case in page order, once with every id in a random case (and padding),
    pages in a random arrival order: the list Cordial ends with is the same, and no delta holds two
    variants of one address."""
    rnd = random.Random(seed)

    def final(variants: bool) -> set[str]:
        asm, members = new_assembler(), set[str]()
        for s, pages in enumerate(syncs):
            order = list(enumerate(pages, start=1))
            if variants:
                rnd.shuffle(order)
            deltas = []
            for n, (add, remove) in order:
                def look(ids: list[str]) -> list[str]:
                    if not variants:
                        return ids
                    return [_variant(i, [rnd.random() < 0.5 for _ in range(12)], rnd.random() < 0.2) for i in ids]
                deltas += feed(asm, page(f"s{s}", n, len(pages), look(add), look(remove))).deltas
            for d in deltas:
                assert len(d.add) + len(d.remove) == len({i.lower() for i in d.add + d.remove})
                assert all(i == i.strip().lower() for i in d.add + d.remove)
                members = rules.apply_changes(members, d.add, d.remove)
        return members

    assert final(variants=True) == final(variants=False)
