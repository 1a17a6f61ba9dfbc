"""The pure membership rules, directly and as properties."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from heapsync import naming
from processors import rules

ids = st.sampled_from([f"u{i}@example.com" for i in range(30)])
page_strategy = st.tuples(st.lists(ids, max_size=12), st.lists(ids, max_size=12))


def test_list_name_drops_all_whitespace() -> None:
    assert naming.list_name("Heap Test Segment") == "HeapTestSegment"
    assert naming.list_name(" Power\tUsers \n2024 ") == "PowerUsers2024"
    assert naming.list_name("Already") == "Already"


def test_an_id_in_both_lists_of_a_page_is_a_conflict_left_out() -> None:
    page = rules.page_changes(["a", "b", "b"], ["b", "c"])
    assert (page.add, page.remove, page.conflicts) == (("a",), ("c",), 1)


def test_last_appearance_wins_in_page_order() -> None:
    pages = {2: rules.page_changes([], ["a"]), 1: rules.page_changes(["a", "b"], []),
             3: rules.page_changes(["c"], ["b"])}
    net = rules.net_changes(pages)
    assert (net.add, net.remove) == (["c"], ["a", "b"])


def test_conflict_in_a_page_leaves_earlier_pages_in_force() -> None:
    # page 2 both adds and removes "a": page 2 says nothing about "a", so page 1's add stands
    net = rules.net_changes({1: rules.page_changes(["a"], []), 2: rules.page_changes(["a"], ["a"])})
    assert (net.add, net.remove) == (["a"], [])


def test_digest_ignores_repeated_ids_but_not_content_or_order() -> None:
    a = rules.page_changes(["x", "y"], ["z"]).digest()
    assert a == rules.page_changes(["x", "y", "x"], ["z", "z"]).digest()
    assert a != rules.page_changes(["x"], ["y", "z"]).digest()
    # Heap's retries resend the same body; the same ids in another order is another page as sent
    assert a != rules.page_changes(["y", "x"], ["z"]).digest()


def test_net_order_is_deterministic_whatever_the_page_arrival_order() -> None:
    pages = [(1, rules.page_changes(["b", "a"], [])), (2, rules.page_changes(["c"], ["a"]))]
    assert rules.net_changes(pages) == rules.net_changes(list(reversed(pages)))
    assert rules.net_changes(pages).add == ["b", "c"]


def test_empty_delta_is_one_empty_chunk() -> None:
    assert rules.chunk_changes(rules.NetChanges(), 5) == [([], [])]


def test_expected_pages_takes_the_largest_total_seen() -> None:
    assert rules.expected_pages(2, 1, 3) == 3
    assert rules.expected_pages(3, 2, 2) == 3
    assert rules.missing_pages([1, 3], 4) == [2, 4]


def test_keys_do_not_collide_whatever_the_sync_id() -> None:
    a = rules.sync_key("acme", "sync", "x|replay:1", None)
    b = rules.sync_key("acme", "sync", "x", "1")
    assert a != b
    assert rules.sync_key("acme", "drain", "r1", None) != rules.sync_key("acme", "sync", "r1", None)


@given(add=st.sets(ids), remove=st.sets(ids), size=st.integers(1, 7))
def test_chunks_partition_the_ids(add: set[str], remove: set[str], size: int) -> None:
    net = rules.NetChanges(sorted(add - remove), sorted(remove))
    chunks = rules.chunk_changes(net, size)
    seen = [i for a, r in chunks for i in a + r]
    assert all(len(a) + len(r) <= size for a, r in chunks)
    assert len(seen) == len(set(seen)) == len(net)
    assert [i for a, _ in chunks for i in a] == net.add
    assert [i for _, r in chunks for i in r] == net.remove
    assert rules.chunk_changes(net, size) == chunks  # deterministic


@settings(max_examples=200)
@given(pages=st.lists(page_strategy, min_size=1, max_size=8), start=st.sets(ids))
def test_applying_the_net_delta_gives_the_list_the_pages_describe(
        pages: list[tuple[list[str], list[str]]], start: set[str]) -> None:
    # The list the pages describe: apply each page in order, a conflicting id untouched by its page.
    members = set(start)
    for add, remove in pages:
        both = set(add) & set(remove)
        members = (members - (set(remove) - both)) | (set(add) - both)
    net = rules.net_changes({n: rules.page_changes(a, r) for n, (a, r) in enumerate(pages, start=1)})
    assert not set(net.add) & set(net.remove)
    assert len(set(net.add)) == len(net.add) and len(set(net.remove)) == len(net.remove)
    after = set(start)
    for a, r in rules.chunk_changes(net, 3):
        after = rules.apply_changes(after, a, r)
    assert after == members


# ---------------------------------------------------------------- a drain's identity (issue 16 #3)

DIGEST = "ab" * 32
request_ids = st.from_regex(r"\A[A-Za-z0-9._:-]{1,128}\Z")  # what the ingress keeps of X-Request-Id


@given(first=request_ids, second=request_ids)
def test_a_signed_drain_is_named_by_its_digest_whatever_its_request_id(first: str, second: str) -> None:
    assert rules.drain_ref(first, DIGEST) == rules.drain_ref(second, DIGEST) == f"drain:signed={DIGEST}"
    assert rules.drain_identity(first, DIGEST) == rules.drain_identity(second, DIGEST)


@given(first=request_ids, second=request_ids)
def test_a_drain_recorded_without_a_digest_keeps_its_request_id(first: str, second: str) -> None:
    assert rules.drain_ref(first) == rules.drain_ref(first, None) == f"drain:{first}"
    assert (rules.drain_ref(first) == rules.drain_ref(second)) == (first == second)


@given(request_id=request_ids)
def test_no_request_id_can_pose_as_a_signed_drain(request_id: str) -> None:
    assert rules.drain_ref(request_id) != rules.drain_ref("x", DIGEST)
    assert rules.drain_identity(request_id, None) != rules.drain_identity("x", DIGEST)
    assert rules.sync_key("acme", "drain", rules.drain_identity(request_id, None), None) != \
        rules.sync_key("acme", "drain", rules.drain_identity("x", DIGEST), None)


def test_different_signed_drains_have_different_refs() -> None:
    assert rules.drain_ref("r", "ab" * 32) != rules.drain_ref("r", "cd" * 32)
