"""`heapsync trace` (issue 14 §4): the pure rules (matching a contact, the outcome of each change, the
order per list) over plain records, and the command's output with the readers replaced."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import orjson
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

import heapsync_ops.trace
from heapsync.contracts import AppliedChunk, Delta, RedriveMark
from heapsync.topic_reader import Record
from heapsync_ops import cli
from heapsync_ops.trace import (
    Applied,
    DeadLetter,
    Filter,
    Seen,
    build,
    dead_letters_of,
    membership,
    might_touch,
    same_contact,
    seen_in,
    trace_steps,
)

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def delta(sync: str, *, add: tuple[str, ...] = (), remove: tuple[str, ...] = (), kind: str = "sync",
          list_name: str = "L", account: str = "acme", replay: str | None = None, identity: str = "email") -> Delta:
    return Delta(delta_id=f"d-{sync}", account=account, segment_id="7", segment_name=list_name, list_name=list_name,
                 identity_field=identity, kind=kind, sync_task_id=sync, add=list(add), remove=list(remove),
                 replay_id=replay, emitted_at=T0)  # type: ignore[arg-type]


def rec(value: Any, offset: int, *, topic: str = "t.deltas", partition: int = 0, key: bytes | None = None) -> Record:
    raw = value.model_dump_json().encode() if hasattr(value, "model_dump_json") else orjson.dumps(value)
    return Record(topic, partition, offset, 1_700_000_000_000 + offset, key, raw)


def progress(d: Delta, sink: str = "cordial", dead: int = 0) -> Record:
    applied = AppliedChunk(sink=sink, chunk_key=d.chunk_key, delta_id=d.delta_id, chunk=d.chunk, chunks=d.chunks,
                           account=d.account, list_name=d.list_name, segment_id=d.segment_id,
                           sync_task_id=d.sync_task_id, kind=d.kind, complete=True, adds=len(d.add),
                           removes=len(d.remove), dead_lettered=dead, applied_at=T0)
    return rec(applied, 0, topic="t.sink.progress", key=f"{sink}|{d.chunk_key}".encode())


def seen(d: Delta, offset: int, asked: str = "ann@x.com") -> Seen:
    [s] = seen_in(rec(d, offset), asked)
    return s


# -- matching ------------------------------------------------------------------------------------


def test_an_email_matches_trimmed_and_case_insensitively_other_identities_exactly() -> None:
    assert same_contact(" Ann@X.com ", "ann@x.COM", "email")
    assert same_contact("ann@x.com", "ANN@X.COM", None)  # a record without the field: email, the default
    assert not same_contact("ann@x.com", "anne@x.com", "email")
    assert not same_contact("Cust-1", "cust-1", "customerId") and same_contact("Cust-1", "Cust-1", "customerId")


def test_a_heap_field_the_account_maps_onto_cordials_email_matches_as_an_email() -> None:
    """``cordial_identity_key = "email"`` with Heap's field ``Email``: the accounts file says the ids are emails;
    without it (or for an account it does not list) the record's field decides, exactly."""
    from heapsync.settings import parse_accounts

    acc = parse_accounts('[accounts.acme]\nheap_webhook_secrets = ["0123456789abcdef-s"]\ncordial_api_key = "k"\n'
                         'cordial_identity_key = "email"\n', "accounts.toml")
    d = delta("s1", add=("Ann@X.com",), identity="Email")
    [s] = seen_in(rec(d, 1), "ann@x.com", accounts=acc)
    assert s.contact == "Ann@X.com"
    assert seen_in(rec(d, 1), "ann@x.com") == []
    assert seen_in(rec(delta("s1", add=("Ann@X.com",), identity="Email", account="other"), 1), "ann@x.com",
                   accounts=acc) == []
    whole = {"reason": "x", "delta": orjson.loads(d.model_dump_json())}
    assert list(dead_letters_of([("sink:0:1", rec(whole, 1), whole)], "ann@x.com", {}, acc)) == [d.chunk_key]
    assert dead_letters_of([("sink:0:1", rec(whole, 1), whole)], "ann@x.com", {}) == {}


def test_only_the_asked_contact_is_taken_from_a_chunk_whatever_case_heap_sent() -> None:
    [s] = seen_in(rec(delta("s1", add=("bob@x.com", "Ann@X.com"), remove=("cat@x.com",)), 4), "ann@x.com")
    assert (s.change, s.contact, s.sync_task_id, s.offset) == ("add", "Ann@X.com", "s1", 4)
    assert seen_in(rec(delta("s1", add=("bob@x.com",)), 1), "ann@x.com") == []
    [r] = seen_in(rec(delta("s2", remove=("ann@x.com",)), 2), "ANN@x.com")
    assert r.change == "remove"


def test_a_drain_concerns_every_contact_and_unreadable_records_none() -> None:
    [s] = seen_in(rec(delta("", kind="drain"), 3), "ann@x.com")
    assert (s.change, s.contact) == ("drain", None)
    assert seen_in(Record("t", 0, 1, 0, None, b"not json"), "ann@x.com") == []
    assert seen_in(Record("t", 0, 1, 0, None, b'{"add": ["ann@x.com"]}'), "ann@x.com") == []  # not a delta


def test_account_and_list_narrow_the_trace() -> None:
    r = rec(delta("s1", add=("ann@x.com",), list_name="Vip"), 1)
    assert seen_in(r, "ann@x.com", Filter(account="other")) == []
    assert seen_in(r, "ann@x.com", Filter(list_name="Other")) == []
    assert len(seen_in(r, "ann@x.com", Filter(account="acme", list_name="Vip"))) == 1
    assert len(seen_in(r, "ann@x.com", Filter(list_name="7"))) == 1  # the segment id names the list too


emails = st.from_regex(r"[A-Za-z0-9._%+-]{1,12}@[A-Za-z0-9-]{1,8}\.[A-Za-z]{2,4}", fullmatch=True)


@given(asked=emails, others=st.lists(emails, max_size=5), flip=st.booleans())
def test_the_prefilter_never_drops_a_record_that_names_the_contact(asked: str, others: list[str], flip: bool) -> None:
    recorded = asked.swapcase() if flip else asked
    r = rec(delta("s", add=(*others, recorded)), 1)
    assert seen_in(r, asked) and might_touch(r.value, asked)


# -- outcomes --------------------------------------------------------------------------------------


def test_the_first_copy_of_an_applied_chunk_is_applied_later_copies_are_repeats_in_offset_order() -> None:
    add, rm = delta("s1", add=("ann@x.com",)), delta("s2", remove=("ann@x.com",))
    later = delta("s3", add=("ann@x.com",))
    applied = {d.chunk_key: Applied("cordial", d.chunk_key, T0, 0) for d in (add, rm)}
    steps = trace_steps([seen(later, 9), seen(rm, 5), seen(add, 3), seen(add, 1)], applied)
    assert [(s.seen.sync_task_id, s.seen.offset, s.outcome) for s in steps] == [
        ("s1", 1, "applied"), ("s1", 3, "repeat"), ("s2", 5, "applied"), ("s3", 9, "pending")]
    assert steps[0].at == T0 and steps[3].at is None
    assert membership(steps) == {("acme", "L"): False}


def test_a_dead_lettered_change_says_why_and_its_redrive_is_a_change_of_its_own() -> None:
    d = delta("s1", add=("ann@x.com", "bob@x.com"))
    again = delta("s1", add=("ann@x.com",), replay="r1")
    dead = {d.chunk_key: [DeadLetter("sink:0:4", d.chunk_key, T0, "cordial kept failing", "add", 503, "busy",
                                     True, "redriven", "r1")]}
    applied = {k: Applied("cordial", k, T0, 0) for k in (d.chunk_key, again.chunk_key)}
    steps = trace_steps([seen(d, 1), seen(again, 2)], applied, dead)
    assert [(s.outcome, s.seen.replay_id) for s in steps] == [("dead-lettered", None), ("applied", "r1")]
    assert steps[0].detail == "cordial kept failing (HTTP 503): busy; re-driven as replay r1"
    assert (steps[0].dead_letter, steps[0].redriven_as) == ("sink:0:4", "r1")
    assert membership(steps) == {("acme", "L"): True}
    # not re-driven yet: the contact is not a member
    pending = {d.chunk_key: [DeadLetter("sink:0:4", d.chunk_key, T0, "cordial rejected the operation", "add", 422,
                                        None, True)]}
    [only] = trace_steps([seen(d, 1)], applied, pending)
    assert (only.outcome, only.redriven_as, only.detail) == ("dead-lettered", None,
                                                             "cordial rejected the operation (HTTP 422)")
    assert membership([only]) == {("acme", "L"): None}


def held_record(d: Delta, role: str, offset: int, reason: str = "") -> Record:
    """A ``HeldChunk`` on the removal rail's lists topic, as the rail's sink writes it (issue 14 §1)."""
    return rec({"schema_version": 1, "sink": "cordial", "role": role, "seq": offset, "reason": reason,
                "partition": 0, "offset": offset, "held_at": T0.isoformat(), "delta": d.model_dump(mode="json")},
               offset, topic="t.sink.lists", key=f"cordial|held|{d.chunk_key}".encode())


def test_the_removal_rails_holds_slot_in_held_waiting_released_discarded() -> None:
    a, b, c, w = (delta(s, remove=("ann@x.com",)) for s in ("s1", "s2", "s3", "s4"))
    lists = [held_record(a, "held", 1, "would remove 9 of 10 members (more than 50%)"),
             held_record(b, "held", 2, "drain held (hold_drains)"), held_record(c, "held", 3, "r3"),
             Record("t.sink.lists", 0, 4, 0, f"cordial|held|{b.chunk_key}".encode(), None),  # decided
             Record("t.sink.lists", 0, 5, 0, f"cordial|held|{c.chunk_key}".encode(), None),
             held_record(w, "waiting", 6)]
    held = heapsync_ops.trace.held_states(lists, "cordial")
    discarded = progress(b)
    discarded = Record(discarded.topic, 0, 0, 0, discarded.key,
                       orjson.dumps({**orjson.loads(discarded.value or b""), "discarded": True}))
    out = build("ann@x.com", "cordial", [rec(a, 1), rec(b, 2), rec(c, 3), rec(w, 4)], [discarded, progress(c)],
                [], {}, held=held).as_json()
    steps = [(s["sync_task_id"], s["outcome"], s["detail"]) for s in out["lists"][0]["steps"]]
    assert steps == [
        ("s1", "held", "would remove 9 of 10 members (more than 50%)"),
        ("s2", "discarded", "held (drain held (hold_drains)) and discarded by an operator: nothing sent"),
        ("s3", "applied", f"held {T0.isoformat(timespec='seconds')} (r3), released"),
        ("s4", "waiting", "behind a held delta of this list"),
    ]
    assert out["lists"][0]["member"] is False  # only s3's removal was applied
    assert heapsync_ops.trace.held_states(lists, "archive") == {}


def test_every_chunk_of_a_held_delta_is_held_with_it_and_follows_the_decision() -> None:
    """The sink writes chunks 2..N of a held delta as "waiting" (the rail checks chunk 1); they are held with it,
    not waiting behind another delta: shown held with the hold's reason, then released or discarded with it."""
    reason = "would remove 9 of 10 members (more than 50%)"
    first, second = (delta("s1", remove=("ann@x.com",)).model_copy(update={"chunk": n, "chunks": 2}) for n in (1, 2))
    other = delta("s2", add=("ann@x.com",))  # another delta of the list, behind the hold
    lists = [held_record(first, "held", 1, reason), held_record(second, "waiting", 2),
             held_record(other, "waiting", 3)]
    contact_in_chunk_2 = [rec(first.model_copy(update={"remove": ["bob@x.com"]}), 1), rec(second, 2), rec(other, 3)]

    def steps(rail: list[Record], progress_records: list[Record]) -> list[tuple[str, str, str]]:
        out = build("ann@x.com", "cordial", contact_in_chunk_2, progress_records, [], {},
                    held=heapsync_ops.trace.held_states(rail, "cordial")).as_json()
        return [(s["chunk"], s["outcome"], s["detail"]) for s in out["lists"][0]["steps"]]

    assert steps(lists, []) == [("2/2", "held", reason), ("1/1", "waiting", "behind a held delta of this list")]
    decision = rec({"schema_version": 1, "sink": "cordial", "delta_id": first.delta_id, "account": "acme",
                    "list_name": "L", "action": "release"}, 4, topic="t.sink.lists",
                   key=f"cordial|decision|{first.delta_id}".encode())
    [(_, outcome, detail), _] = steps([*lists, decision], [])
    assert outcome == "held" and detail.startswith(reason + "; release decided by an operator, not carried out yet")
    tombstones = [Record("t.sink.lists", 0, 5 + n, 0, f"cordial|held|{d.chunk_key}".encode(), None)
                  for n, d in enumerate((first, second))]
    decided = [*lists, decision, *tombstones]
    assert steps(decided, [progress(first), progress(second)])[0] == (
        "2/2", "applied", f"held {T0.isoformat(timespec='seconds')} ({reason}), released")
    discarded = [Record(r.topic, 0, 0, 0, r.key, orjson.dumps({**orjson.loads(r.value or b""), "discarded": True}))
                 for r in (progress(first), progress(second))]
    assert steps(decided, discarded)[0] == (
        "2/2", "discarded", f"held ({reason}) and discarded by an operator: nothing sent")


def test_dead_letters_of_other_contacts_are_left_out_and_a_whole_chunk_gives_no_response() -> None:
    d = delta("s1", add=("ann@x.com", "bob@x.com"))
    ref = {"delta_id": d.delta_id, "chunk": 1, "chunk_key": d.chunk_key, "account": "acme", "list_name": "L"}
    entries = [
        ("sink:0:1", rec({**ref, "reason": "r", "operation": "add", "contact_id": "bob@x.com", "status": 422,
                          "response": "bob@x.com is invalid"}, 1, topic="t.sink.dlq"), {}),
        ("sink:0:2", rec({**ref, "reason": "unknown account", "delta": d.model_dump(mode="json")}, 2,
                         topic="t.sink.dlq"), {}),
        ("sink:0:3", rec({**ref, "reason": "cordial import rejected rows", "operation": "import", "rejected": 3},
                         3, topic="t.sink.dlq"), {}),
    ]
    entries = [(i, r, orjson.loads(r.value or b"")) for i, r, _ in entries]
    found = dead_letters_of(entries, "ANN@x.com", {"t.sink.dlq|0|2": RedriveMark(outcome="redriven", replay_id="r9")})
    assert [(x.entry, x.named, x.response, x.replay_id) for x in found[d.chunk_key]] == [
        ("sink:0:2", True, None, "r9"), ("sink:0:3", False, None, None)]


def test_rail_and_dead_letter_records_read_through_their_models_as_the_sink_reads_them() -> None:
    """The trace reads the lists topic and the sink's dead letters through ``HeldChunk``/``HoldDecision`` and
    ``SinkDeadLetter``: a lists record the sink cannot read holds nothing (the sink ignores it, the trace says
    pending, not held), and a dead letter without a reason says "unknown", as ``heapsync dlq list`` does."""
    from heapsync.contracts import SinkDeadLetter
    from heapsync.held import ListsState

    d = delta("s1", remove=("ann@x.com",))
    junk = rec({"role": "held", "reason": "not a HeldChunk"}, 1, topic="t.sink.lists",
               key=f"cordial|held|{d.chunk_key}".encode())
    state = ListsState("cordial")
    state.feed((junk.key or b"").decode(), junk.value)
    assert not state.is_pending(d.chunk_key)  # the sink holds nothing
    held = heapsync_ops.trace.held_states([junk], "cordial")
    [step] = build("ann@x.com", "cordial", [rec(d, 1)], [], [], {}, held=held).as_json()["lists"][0]["steps"]
    assert step["outcome"] == "pending"

    written = SinkDeadLetter(sink="cordial", delta_id=d.delta_id, chunk=1, chunk_key=d.chunk_key, account="acme",
                             list_name="L", operation="remove", contact_id="Ann@x.com", identity_key="email",
                             status=422, response={"error": "invalid"}, newer_field="kept")  # type: ignore[call-arg]
    doc = orjson.loads(written.encode())
    assert "reason" not in doc  # a writer that set none
    entry = ("sink:0:4", rec(doc, 4, topic="t.sink.dlq"), doc)
    [found] = dead_letters_of([entry], "ann@x.com", {})[d.chunk_key]
    assert (found.reason, found.operation, found.status, found.response) == (
        "unknown", "remove", 422, '{"error":"invalid"}')


def test_a_bulk_rejection_that_names_no_rows_qualifies_the_applied_change() -> None:
    d = delta("s1", add=("ann@x.com",))
    dead = {d.chunk_key: [DeadLetter("sink:1:7", d.chunk_key, T0, "cordial import rejected rows", "import", None,
                                     None, False)]}
    [s] = trace_steps([seen(d, 1)], {d.chunk_key: Applied("cordial", d.chunk_key, T0, 3)}, dead)
    assert s.outcome == "applied" and "may be among them (sink:1:7)" in s.detail
    [s] = trace_steps([seen(d, 1)], {}, dead)  # its progress record not written yet
    assert s.outcome == "pending"


@given(asked=emails, others=st.lists(emails, min_size=1, max_size=6))
def test_the_trace_never_holds_another_contacts_id(asked: str, others: list[str]) -> None:
    others = [o for o in others if o.lower() != asked.lower() and asked.lower() not in o.lower()
              and o.lower() not in asked.lower()]
    d1 = delta("s1", add=(asked, *others))
    d2 = delta("s2", remove=(*others, asked.upper()), replay="r1")
    dl = {"delta_id": d1.delta_id, "chunk": 1, "chunk_key": d1.chunk_key, "reason": "x", "operation": "add"}
    entries = [(f"sink:0:{n}", r, orjson.loads(r.value or b"")) for n, r in enumerate(
        rec({**dl, "contact_id": o, "response": o}, n, topic="t.sink.dlq") for n, o in enumerate(others))]
    out = build(asked, "cordial", [rec(d1, 1), rec(d2, 2)], [progress(d1), progress(d2)], entries, {})
    text = json.dumps(out.as_json()).lower()
    assert [s["outcome"] for s in out.as_json()["lists"][0]["steps"]] == ["applied", "applied"]
    assert not any(o.lower() in text for o in others)


def test_progress_of_another_sink_does_not_count_as_applied() -> None:
    d = delta("s1", add=("ann@x.com",))
    out = build("ann@x.com", "cordial", [rec(d, 1)], [progress(d, sink="archive")], [], {})
    assert [s["outcome"] for s in out.as_json()["lists"][0]["steps"]] == ["pending"]


def test_drains_only_of_lists_the_contact_is_in() -> None:
    mine, other = delta("s1", add=("ann@x.com",)), delta("", kind="drain", list_name="Other")
    drain = delta("", kind="drain")
    out = build("ann@x.com", "cordial", [rec(mine, 1), rec(other, 2), rec(drain, 3)],
                [progress(mine), progress(drain)], [], {}).as_json()
    [lst] = out["lists"]
    assert [(s["change"], s["outcome"], s["detail"]) for s in lst["steps"]] == [
        ("add", "applied", ""), ("drain", "applied", "the list was emptied")]
    assert lst["member"] is False


# -- the command -----------------------------------------------------------------------------------


def fake_gather(monkeypatch: pytest.MonkeyPatch, deltas: list[Delta]) -> list[str]:
    asked: list[str] = []

    def gather(settings: Any, contact: str, *, sink: str, flt: Filter) -> Any:
        asked.append(contact)
        return build(contact, sink, [rec(d, n) for n, d in enumerate(deltas)], [progress(d) for d in deltas], [],
                     {}, flt)

    monkeypatch.setattr(heapsync_ops.trace, "gather", gather)
    monkeypatch.setattr(cli, "_checked", lambda: (None, {}))
    return asked


def test_the_table_prints_markup_as_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gather(monkeypatch, [delta("[bold]s1", add=("ann@x.com", "bob@x.com"), list_name="[/x]")])
    res = CliRunner().invoke(cli.cli, ["trace", "ann@x.com"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "acme / [/x]: ann@x.com" in res.output and "[bold]s1" in res.output and "applied" in res.output
    assert "after the last applied change: a member" in res.output and "bob@x.com" not in res.output


def test_json_output_and_the_contact_read_from_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = fake_gather(monkeypatch, [delta("s1", add=("Ann@x.com",))])
    res = CliRunner().invoke(cli.cli, ["trace", "-", "--json"], input="ann@x.com\n")
    assert res.exit_code == 0, res.output + repr(res.exception)
    doc = json.loads(res.output)
    assert asked == ["ann@x.com"] and doc["lists"][0]["steps"][0]["contact"] == "Ann@x.com"
    assert CliRunner().invoke(cli.cli, ["trace", "-"], input="\n").exit_code == 2


def test_a_list_on_two_partitions_is_merged_by_time_keeping_each_partitions_order() -> None:
    """A re-drive produced with another partitioner lands on another partition of the deltas topic."""
    a, b, c = (delta(s, add=("ann@x.com",)) for s in ("s1", "s2", "s3"))
    redrive = delta("s2", add=("ann@x.com",), replay="r1")

    def at(d: Delta, partition: int, offset: int, ms: int) -> Seen:
        [s] = seen_in(Record("t", partition, offset, ms, None, d.model_dump_json().encode()), "ann@x.com")
        return s

    # partition 2 holds s1, s2, s3 (s3 written by a producer whose clock is behind); the re-drive of s2
    # went to partition 0: late, or between s1 and s2
    part2 = [at(c, 2, 7, 2_000), at(b, 2, 6, 3_000), at(a, 2, 5, 1_000)]
    for written, expected in ((4_000, ["s1", "s2", "s3", "s2@r1"]), (1_500, ["s1", "s2@r1", "s2", "s3"])):
        order = heapsync_ops.trace.apply_order([*part2, at(redrive, 0, 0, written)])
        assert [f"{s.sync_task_id}@{s.replay_id}" if s.replay_id else s.sync_task_id for s in order] == expected
    doc = build("ann@x.com", "cordial", [Record("t", 2, 5, 1, None, a.model_dump_json().encode()),
                                         Record("t", 0, 0, 2, None, redrive.model_dump_json().encode())],
                [], [], {}).as_json()
    assert doc["lists"][0]["partitions"] == [0, 2]
