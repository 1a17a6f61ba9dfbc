"""The removal rail's pure rules (heapsync/held.py) and its settings: when a delta is held, the
member count, and the per-list state every reader builds from the lists topic."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from heapsync.contracts import HeldChunk, HoldDecision, ListCount
from heapsync.held import ListsState, count_key, decision_key, estimated_removes, held_key, hold_reason, members_after
from heapsync.settings import AccountError, RemovalRail, parse_accounts, removal_rail_for
from tests.sink_helpers import make_delta

fractions = st.floats(min_value=0.01, max_value=1.0, allow_nan=False)
counts = st.integers(min_value=0, max_value=10_000)
rails = st.builds(RemovalRail, max_removal_fraction=st.none() | fractions, hold_drains=st.booleans())

ACCOUNT = ('[accounts.acme]\nheap_webhook_secrets = ["0123456789abcdef0123"]\ncordial_api_key = "k"\n')


def test_the_rail_is_off_unless_an_operator_sets_it() -> None:
    account = parse_accounts(ACCOUNT)["acme"]
    rail = removal_rail_for(account, "15225086")
    assert rail == RemovalRail() and not rail.on
    assert hold_reason(1000, "sync", 1000, rail) is None
    assert hold_reason(1000, "drain", 1000, rail) is None


def test_account_keys_are_read_and_checked() -> None:
    account = parse_accounts(ACCOUNT + "max_removal_fraction = 0.2\nhold_drains = true\n")["acme"]
    assert removal_rail_for(account, "1") == RemovalRail(max_removal_fraction=0.2, hold_drains=True)
    assert parse_accounts(ACCOUNT + "max_removal_fraction = 0\n")["acme"].max_removal_fraction == 0  # any removal held
    for bad in ("max_removal_fraction = -0.1", "max_removal_fraction = 1.5", "hold_drain = true"):
        with pytest.raises(AccountError, match="accounts.acme"):
            parse_accounts(ACCOUNT + bad + "\n")


@given(counts, counts, rails)
def test_an_off_rail_never_holds(members: int, removes: int, rail: RemovalRail) -> None:
    if not rail.on:
        assert hold_reason(members, "sync", removes, rail) is None
        assert hold_reason(members, "drain", members, rail) is None


@given(counts, counts, fractions)
def test_a_sync_is_held_exactly_when_it_removes_more_than_the_fraction(members: int, removes: int,
                                                                        fraction: float) -> None:
    rail = RemovalRail(max_removal_fraction=fraction)
    reason = hold_reason(members, "sync", removes, rail)
    assert (reason is not None) == (removes > 0 and removes > fraction * members)
    if reason is not None:
        assert f"{removes} of {members}" in reason


@given(counts, st.integers(min_value=0, max_value=500), st.integers(min_value=0, max_value=500), rails)
def test_removing_more_never_turns_a_hold_into_an_apply(members: int, removes: int, more: int,
                                                        rail: RemovalRail) -> None:
    if hold_reason(members, "sync", removes, rail) is not None:
        assert hold_reason(members, "sync", removes + more, rail) is not None


@given(counts, rails)
def test_a_drain_is_held_with_hold_drains_or_when_it_empties_a_counted_list_past_the_fraction(
        members: int, rail: RemovalRail) -> None:
    reason = hold_reason(members, "drain", members, rail)
    past_fraction = rail.max_removal_fraction is not None and members > rail.max_removal_fraction * members
    assert (reason is not None) == (rail.hold_drains or past_fraction)


@given(counts, st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50), st.booleans()), max_size=20))
def test_the_count_never_goes_negative_and_a_drain_empties_it(start: int,
                                                              steps: list[tuple[int, int, bool]]) -> None:
    members = start
    for adds, removes, drain in steps:
        delta = make_delta("L", add=[f"a{i}" for i in range(adds)], remove=[f"r{i}" for i in range(removes)],
                           kind="drain" if drain else "sync")
        after = members_after(members, delta)
        assert after >= 0
        assert after == (0 if drain else max(0, members + adds - removes))
        members = after


def test_removes_of_a_chunked_delta_are_estimated_from_its_first_chunk_upwards() -> None:
    assert estimated_removes(make_delta("L", add=["a"], remove=["r1", "r2"], chunks=3)) == 2  # removes come first
    assert estimated_removes(make_delta("L", remove=["r1", "r2"], chunks=3)) == 6  # remove-only: upper bound
    assert estimated_removes(make_delta("L", remove=["r1", "r2"])) == 2


def held(delta_id: str, chunk: int = 1, role: str = "held", seq: int = 1, list_name: str = "L") -> HeldChunk:
    return HeldChunk(sink="cordial", role=role, seq=seq, reason="r", partition=0, offset=seq,
                     delta=make_delta(list_name, remove=["x"], delta_id=delta_id, chunk=chunk, chunks=2))


def test_state_from_records_orders_the_queue_and_tombstones_delete() -> None:
    state = ListsState("cordial")
    first, second, third = held("d1", 1, seq=1), held("d1", 2, "waiting", seq=2), held("d2", 1, "waiting", seq=3)
    for c in (third, first, second):
        assert state.feed(held_key("cordial", c.delta.chunk_key), c.model_dump_json().encode())
    assert [c.delta.chunk_key for c in state.queue(("acme", "L"))] == ["d1:1", "d1:2", "d2:1"]
    [row] = state.holds()
    assert row["delta_id"] == "d1" and row["waiting_deltas"] == ["d2"] and row["chunks_held"] == 2
    assert state.waiting_behind("d1") == [{"hold": "d2", "delta_id": "d2", "replay_id": None, "kind": "sync",
                                           "sync_task_id": None, "chunks": 1, "adds": 0, "removes": 1}]
    decision = HoldDecision(sink="cordial", delta_id="d1", account="acme", list_name="L", action="discard")
    state.feed(decision_key("cordial", "d1"), decision.model_dump_json().encode())
    assert state.holds()[0]["decision"] == "discard"
    for c in (first, second):
        state.feed(held_key("cordial", c.delta.chunk_key), None)
    assert state.holds() == [] and len(state.queue(("acme", "L"))) == 1
    count = ListCount(sink="cordial", account="acme", list_name="L", members=7, writer="me")
    state.feed(count_key("cordial", "acme", "L"), count.model_dump_json().encode(), skip_writer="me")
    assert state.counts == {}  # the sink's own record, read back: already in its memory
    state.feed(count_key("cordial", "acme", "L"), count.model_dump_json().encode(), skip_writer="other")
    assert state.counts == {("acme", "L"): 7}
    assert not state.feed("archive|count|acme|L", b"{}") and not state.feed("cordial|held|x", b"not json")


@given(st.permutations(range(6)))
def test_the_queue_order_does_not_depend_on_the_order_records_are_read(order: list[int]) -> None:
    """Held chunks live on several partitions of the lists topic: any read order gives the same queue."""
    chunks = [held(f"d{n // 2}", n % 2 + 1, "held" if n == 0 else "waiting", seq=n) for n in range(6)]
    state = ListsState("cordial")
    for n in order:
        state.feed(held_key("cordial", chunks[n].delta.chunk_key), chunks[n].model_dump_json().encode())
    assert [c.delta.chunk_key for c in state.queue(("acme", "L"))] == [c.delta.chunk_key for c in chunks]
    [row] = state.holds()
    assert (row["delta_id"], row["waiting_deltas"]) == ("d0", ["d1", "d2"])


@given(rails)
def test_a_list_never_counted_holds_a_drain_exactly_when_it_would_hold_a_sync_s_removal(rail: RemovalRail) -> None:
    """Counts start at the upgrade: an uncounted list (None) must not let a drain through that the
    same list's removal of a single member would not pass."""
    drain = hold_reason(None, "drain", 0, rail)
    removal = hold_reason(None, "sync", 1, rail)
    assert (drain is not None) == (removal is not None or rail.hold_drains)
    if rail.max_removal_fraction is not None and not rail.hold_drains:
        assert drain is not None and "never counted" in drain
    assert hold_reason(0, "drain", 0, RemovalRail(max_removal_fraction=0.5)) is None  # counted, empty: harmless


def test_display_readers_keep_sizes_not_contact_ids() -> None:
    """The status page, `heapsync status` and `heapsync held` build the state without ids: a held
    removal of many contacts costs them its sizes only, and shows the same numbers."""
    ids = [f"user{n}@example.com" for n in range(500)]
    chunk = HeldChunk(sink="cordial", role="held", seq=1, reason="r", partition=0, offset=1, removes=500,
                      delta=make_delta("L", add=["new@example.com"], remove=ids, delta_id="d1"))
    waiting = HeldChunk(sink="cordial", role="waiting", seq=2, partition=0, offset=2,
                        delta=make_delta("L", add=ids[:3], delta_id="d2"))
    full, display = ListsState("cordial"), ListsState("cordial", keep_ids=False)
    for state in (full, display):
        for c in (chunk, waiting):
            state.feed(held_key("cordial", c.delta.chunk_key), c.model_dump_json().encode())
    assert display.holds() == full.holds()
    assert display.waiting_behind("d1") == full.waiting_behind("d1")
    assert display.holds()[0]["adds"] == 1 and display.waiting_behind("d1")[0]["adds"] == 3
    assert "example.com" not in repr(display.pending)
    assert "example.com" in repr(full.pending)  # the sink keeps them: it applies the chunk on release


def test_the_status_page_keeps_no_contact_ids_of_held_deltas() -> None:
    from heapsync_ops.status_page import StatusBoard

    board = StatusBoard()
    chunk = HeldChunk(sink="cordial", role="held", seq=1, reason="r", partition=0, offset=1,
                      delta=make_delta("L", remove=["secret@example.com"], delta_id="d1"))
    board.on_lists(held_key("cordial", chunk.delta.chunk_key).encode(), chunk.model_dump_json().encode())
    assert "secret@example.com" not in repr(board.held["cordial"].pending)
    assert board.held["cordial"].holds()[0]["hold"] == "d1"


def test_an_operator_names_the_original_by_its_delta_id_and_a_replayed_copy_with_its_replay_id() -> None:
    from heapsync_ops.held import HoldError, find

    state = ListsState("cordial", keep_ids=False)
    did = "abcdef0123456789" * 2
    for n, replay in enumerate([None, "r7"]):
        c = HeldChunk(sink="cordial", role="held", seq=n, reason="r", partition=0, offset=n,
                      delta=make_delta("L" if replay is None else "M", remove=["x"], delta_id=did).model_copy(
                          update={"replay_id": replay}))
        state.feed(held_key("cordial", c.delta.chunk_key), c.model_dump_json().encode())
    assert find(state, did)["list_name"] == "L" and find(state, did[:8])["replay_id"] is None
    assert find(state, f"{did[:8]}@r7")["hold"] == f"{did}@r7"
    with pytest.raises(HoldError, match="no held delta"):
        find(state, f"{did}@r8")
    decision = HoldDecision(sink="cordial", delta_id=did, replay_id="r7", account="acme", list_name="M",
                            action="release")
    state.feed(decision_key("cordial", f"{did}@r7"), decision.model_dump_json().encode())
    assert {r["hold"]: r["decision"] for r in state.holds()} == {did: None, f"{did}@r7": "release"}
    old = b'{"schema_version": 1, "sink": "cordial", "delta_id": "d", "account": "a", "list_name": "L", "action": "discard"}'
    assert HoldDecision.model_validate_json(old).replay_id is None  # a record from before replays were named
