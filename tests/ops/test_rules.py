"""The pure parts of the operations layer: replay selection, dead-letter re-drive plans,
status summaries and topic checks, on plain records."""

from __future__ import annotations

from datetime import datetime, timezone

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from heapsync import naming
from heapsync.contracts import Delta, PageRecord, RejectedRecord, delta_id_for, read_mark
from heapsync.topic_reader import Record, latest_by_key
from heapsync_dev.samples import heap_request
from heapsync_ops import dlq, replay, status, topics_admin


def rec(value: object, *, topic: str = "t", partition: int = 0, offset: int = 0, ts: int = 1_000,
        key: bytes | None = b"k") -> Record:
    raw = value if isinstance(value, bytes) or value is None else orjson.dumps(value)
    return Record(topic, partition, offset, ts, key, raw)


def page(task: str, n: int, total: int, *, account: str = "acme", replay_id: str | None = None,
         add: list[str] | None = None, segment_id: str = "15225086") -> dict:
    return PageRecord(account=account, request_id=f"{task}-{n}", received_at=datetime.now(timezone.utc),
                      payload=heap_request(task, n, total, add=add or [f"{task}{n}@x.io"], segment_id=segment_id),
                      replay_id=replay_id).model_dump(mode="json")


# -- replay -----------------------------------------------------------------------


def test_replay_skips_ticks_earlier_replays_and_other_accounts_and_counts_why() -> None:
    records = [
        rec(b'{"control":"tick"}', offset=0),
        rec(page("s1", 1, 2), offset=1),
        rec(page("s1", 2, 2), offset=2),
        rec(page("s2", 1, 1, account="other"), offset=3),
        rec(page("s3", 1, 1, replay_id="rOLD"), offset=4),
        rec(b"not json", offset=5),
        rec(page("s4", 1, 1, segment_id="999"), offset=6),
    ]
    report = replay.Report("pages", "rNEW", dry_run=True)
    chosen = list(replay.plan("pages", records, replay.Filter(account="acme", segment="15225086"), report))
    assert [c.record.offset for c in chosen] == [1, 2]
    assert report.groups == {("acme", "15225086", "s1"): 2}
    assert report.incomplete() == []
    assert report.skipped == {"tick": 1, "other account": 1, "earlier replay": 1, "unreadable": 1,
                              "other segment": 1}
    # with --include-replays, an earlier replay is chosen; this replay's own copies never are
    report = replay.Report("pages", "rOLD", dry_run=True)
    assert list(replay.plan("pages", [records[4]], replay.Filter(include_replays=True), report)) == []
    assert report.skipped == {} and report.read == 0  # its own copies are not part of the range


def test_replayed_page_keeps_every_field_and_validates() -> None:
    doc = {**page("s1", 1, 1), "future_field": 7}
    again = orjson.loads(replay.replayed_value(doc, "r1"))
    assert again["replay_id"] == "r1" and again["future_field"] == 7
    assert PageRecord.model_validate(again).payload == doc["payload"]


def test_replay_deltas_filters_on_list_name() -> None:
    d = Delta(delta_id="d1", account="acme", segment_id="1", segment_name="Heap Test Segment",
              list_name="HeapTestSegment", identity_field="email", kind="sync", sync_task_id="s1", add=["a@x.io"])
    report = replay.Report("deltas", "r1", dry_run=True)
    chosen = list(replay.plan("deltas", [rec(d.model_dump(mode="json"))], replay.Filter(segment="HeapTestSegment"),
                              report))
    assert len(chosen) == 1
    again = Delta.model_validate_json(replay.replayed_value(chosen[0].doc, "r1"))
    assert again.chunk_key == "d1:1@r1" and again.add == ["a@x.io"]


def test_parse_since_accepts_z_offsets_and_naive_utc() -> None:
    assert replay.parse_since("2026-11-24T05:00:00Z") == replay.parse_since("2026-11-24T05:00:00")
    assert replay.parse_since("2026-11-24T06:00:00+01:00") == replay.parse_since("2026-11-24T05:00:00Z")
    with pytest.raises(ValueError):
        replay.parse_since("yesterday")


def test_parse_since_accepts_spans_back_from_now() -> None:
    now = datetime(2026, 11, 24, 12, 0, tzinfo=timezone.utc)
    at = replay.parse_since
    assert at("2h", now) == at("2026-11-24T10:00:00Z")
    assert at("90m", now) == at("1h30m", now) == at("1h 30m", now) == at("2026-11-24T10:30:00Z")
    assert at("1d12h", now) == at("2026-11-23T00:00:00Z")
    assert at("45s", now) == at("2026-11-24T11:59:15Z")
    for bad in ("", "2", "h", "2w", "-2h", "2h-"):
        with pytest.raises(ValueError):
            at(bad, now)


# -- dead letters -------------------------------------------------------------------


def rejected(body: str, account: str = "acme") -> Record:
    r = RejectedRecord(account=account, request_id="req1", received_at=datetime.now(timezone.utc),
                       reason="invalid payload", body=body)
    return rec(r.model_dump(mode="json"), topic="p.pages.rejected", offset=3)


def test_rejected_entry_redrives_as_a_page_when_valid_now_and_is_kept_when_not() -> None:
    good = dlq.parse_entry("rejected", rejected(orjson.dumps(heap_request("s9", 1, 1, add=["a@x.io"])).decode()))
    bad = dlq.parse_entry("rejected", rec({**orjson.loads(rejected("{}").value or b""), "request_id": "req2"},
                                          offset=4))
    plan = dlq.plan_redrive([good, bad], "r1")
    assert plan.outcomes[good.id] == ("redriven", "")
    assert plan.outcomes[bad.id][0] == "failed" and "still invalid" in plan.outcomes[bad.id][1]
    [out] = plan.outputs
    assert out.target == "pages" and out.key == b"acme:15225086"
    page_record = PageRecord.model_validate_json(out.value)
    assert page_record.account == "acme" and page_record.request_id == "req1"
    assert page_record.payload["data"]["sync_info"]["sync_task_id"] == "s9"


def test_timed_out_sync_redrives_as_a_partial_delta_of_the_pages_it_held() -> None:
    entry = dlq.parse_entry("assembler", rec({
        "reason": "sync timed out with pages missing", "sync": "acme|s1", "account": "acme", "sync_task_id": "s1",
        "segment_id": "15225086", "segment_name": "Heap Test Segment", "identity_field": "email",
        "total_pages": 3, "missing_pages": [2],
        "pages": {"1": {"add": ["a@x.io", "b@x.io"], "remove": [], "digest": "x"},
                  "3": {"add": [], "remove": ["b@x.io", "c@x.io"], "digest": "y"}},
    }))
    assert entry.account == "acme" and "2 pages held" in entry.summary
    plan = dlq.plan_redrive([entry], "r1")
    [out] = plan.outputs
    delta = Delta.model_validate_json(out.value)
    assert out.target == "deltas" and out.key == b"acme:HeapTestSegment"
    assert (delta.add, sorted(delta.remove)) == (["a@x.io"], ["b@x.io", "c@x.io"])
    assert delta.complete is False and delta.missing_pages == [2] and delta.replay_id == "r1"
    assert delta.delta_id == delta_id_for("acme", "s1")


def test_late_page_without_content_cannot_be_redriven() -> None:
    entry = dlq.parse_entry("assembler", rec({"reason": "late page for an emitted sync", "sync": "acme|s1",
                                              "page_number": 2}))
    plan = dlq.plan_redrive([entry], "r1")
    assert plan.outputs == [] and plan.outcomes[entry.id][0] == "failed"


def test_sink_operations_are_gathered_into_one_delta_per_chunk_with_just_those_ids() -> None:
    def op(kind: str, contact: str, offset: int, delta_id: str = "d1") -> Record:
        return rec({"sink": "cordial", "reason": "cordial rejected the operation", "delta_id": delta_id, "chunk": 2,
                    "account": "acme", "list_name": "L", "operation": kind, "contact_id": contact,
                    "identity_key": "email", "status": 503}, offset=offset)

    entries = [dlq.parse_entry("sink", r) for r in
               (op("add", "a@x.io", 1), op("remove", "b@x.io", 2), op("add", "c@x.io", 3, delta_id="d2"))]
    plan = dlq.plan_redrive(entries, "r7")
    deltas = sorted((Delta.model_validate_json(o.value) for o in plan.outputs), key=lambda d: d.delta_id)
    assert [(d.delta_id, d.chunk, d.add, d.remove, d.replay_id) for d in deltas] == [
        ("d1", 2, ["a@x.io"], ["b@x.io"], "r7"), ("d2", 2, ["c@x.io"], [], "r7")]
    assert all(o == ("redriven", "") for o in plan.outcomes.values()) and len(plan.outcomes) == 3


def test_a_delta_dead_lettered_whole_goes_back_with_a_replay_id() -> None:
    d = Delta(delta_id="d1", account="ghost", segment_id="1", segment_name="S", list_name="S",
              identity_field="email", kind="sync", add=["a@x.io"])
    entry = dlq.parse_entry("sink", rec({"sink": "cordial", "reason": "unknown account", "delta_id": "d1",
                                         "delta": d.model_dump(mode="json")}))
    [out] = dlq.plan_redrive([entry], "r2").outputs
    assert Delta.model_validate_json(out.value).chunk_key == "d1:1@r2"


def test_marks_hide_redriven_entries_from_counts_and_redrive() -> None:
    entries = [dlq.parse_entry("sink", rec({"reason": "x", "account": "acme"}, topic="p.sink.dlq", offset=i))
               for i in range(3)]
    marks = {entries[0].mark_key: read_mark(dlq.mark_value(entries[0], "redriven", "", "r1")),
             entries[1].mark_key: read_mark(dlq.mark_value(entries[1], "failed", "still invalid", "r1"))}
    assert [dlq.state_of(e, marks) for e in entries] == ["redriven", "failed", "pending"]
    assert dlq.counts_by_reason(entries, marks) == {"sink": {"x": 2}}
    assert dlq.matches(entries[0], account="acme", reason="X") and not dlq.matches(entries[0], account="other")


def test_unreadable_dead_letter_is_still_listed() -> None:
    entry = dlq.parse_entry("sink", rec(b"\xff garbage"))
    assert entry.reason == "unreadable dead-letter record"


# -- status -----------------------------------------------------------------------


def test_lag_counts_from_the_earliest_record_when_nothing_is_committed() -> None:
    assert status.lag_of(None, 5, 12) == 7
    assert status.lag_of(10, 5, 12) == 2
    assert status.lag_of(15, 5, 12) == 0  # a broker that under-reports its end never gives negative lag
    assert status.lag_of(2, 5, 12) == 7  # committed offset already deleted by retention
    assert status.lag_of(11, 5, 12, newest_is_tick=True) == 0  # only the worker's newest tick is left


def test_open_syncs_read_the_changelog_with_tombstones_and_either_received_shape() -> None:
    meta = {"account": "acme", "sync_task_id": "s1", "segment_id": "1", "segment_name": "S", "kind": "sync",
            "total_pages": 3, "received": [1, 3, 3], "partition": 0, "started_at": 100.0}
    records = [
        rec(meta, key=b'"acme|s1"'),
        rec({**meta, "received": 2, "started_at": 50.0}, key=b'"acme|s2"'),
        rec(meta, key=b'"acme|gone"'), rec(None, key=b'"acme|gone"'),
    ]
    syncs = status.open_syncs(latest_by_key(records), now=160.0)
    assert [(s["sync"], s["pages_received"], s["total_pages"], s["age_seconds"]) for s in syncs] == [
        ("acme|s2", 2, 3, 110.0), ("acme|s1", 2, 3, 60.0)]


def test_last_applied_keeps_the_latest_chunk_per_sink_and_list() -> None:
    def chunk(sink: str, sync: str, at: str) -> Record:
        return rec({"sink": sink, "chunk_key": f"{sync}:1", "delta_id": sync, "chunk": 1, "chunks": 1,
                    "account": "acme", "list_name": "L", "segment_id": "1", "sync_task_id": sync, "kind": "sync",
                    "complete": True, "adds": 2, "removes": 1, "applied_at": at})

    rows = status.last_applied([chunk("cordial", "s1", "2026-01-01T00:00:01"),
                                chunk("cordial", "s2", "2026-01-01T00:00:02"),
                                chunk("archive", "s1", "2026-01-01T00:00:03")])
    assert [(r["sink"], r["sync_task_id"]) for r in rows] == [("archive", "s1"), ("cordial", "s2")]
    discarded = rec({**orjson.loads(chunk("cordial", "s3", "2026-01-01T00:00:09").value or b""), "adds": 0,
                     "removes": 0, "discarded": True})  # a held delta `heapsync held discard` decided: not applied
    rows = status.last_applied([chunk("cordial", "s2", "2026-01-01T00:00:02"), discarded])
    assert [(r["sink"], r["sync_task_id"]) for r in rows] == [("cordial", "s2")]


@given(st.lists(st.tuples(st.sampled_from([b"a", b"b", b"c"]), st.one_of(st.none(), st.binary(min_size=1))),
                max_size=30))
def test_latest_by_key_is_what_compaction_would_keep(ops: list[tuple[bytes, bytes | None]]) -> None:
    expected: dict[bytes, bytes] = {}
    for k, v in ops:
        if v is None:
            expected.pop(k, None)
        else:
            expected[k] = v
    got = latest_by_key(rec(v, key=k, offset=i) for i, (k, v) in enumerate(ops))
    assert {k: r.value for k, r in got.items()} == expected


# -- topics -------------------------------------------------------------------------


def test_topic_differences_and_retention_display() -> None:
    assert topics_admin.human_retention("1209600000") == "14d"
    assert topics_admin.human_retention("3600000") == "1h"
    assert topics_admin.human_retention("-1") == "forever"
    assert topics_admin.differences({"retention.ms": "1209600000"}, {"retention.ms": "86400000",
                                                                     "cleanup.policy": "delete"}) == [
        "retention.ms=86400000 (wanted 1209600000)"]
    assert topics_admin.differences({"cleanup.policy": "compact"}, {"cleanup.policy": "compact"}) == []



def test_replicated_topics_refuse_writes_that_only_one_copy_would_hold() -> None:
    """With replication 3 every topic heapsync creates sets min.insync.replicas=2 itself (a broker's
    default is 1: acks=all would then acknowledge a page held by the leader alone)."""
    from heapsync.kafka import min_insync_replicas, topic_configs
    from heapsync.settings import Settings

    assert [min_insync_replicas(r) for r in (1, 2, 3, 5)] == [None, None, 2, 2]
    three = topic_configs(Settings(topic_replication=3))
    assert three and all(cfg["min.insync.replicas"] == "2" for cfg in three.values())
    assert all("min.insync.replicas" not in cfg for cfg in topic_configs(Settings(topic_replication=1)).values())
    # `heapsync topics` flags a replicated topic made elsewhere with the broker's default of 1
    assert topics_admin.differences({"min.insync.replicas": "2"}, {"min.insync.replicas": "1"}) == [
        "min.insync.replicas=1 (wanted 2)"]
    assert topics_admin.differences({}, {"min.insync.replicas": "1"}) == []


def test_the_workers_changelogs_refuse_writes_that_only_one_copy_would_hold() -> None:
    """Faust creates the tables' changelog topics itself: with replication 3 they get min.insync.replicas=2
    too (a changelog acknowledged on one copy could lose a sync's pages with that broker)."""
    from heapsync.settings import Settings
    from processors.worker import create_app

    app = create_app(Settings(topic_replication=3, processor_store="memory://", processor_group="isr-3"))
    assert app.tables and all(t.changelog_topic.config == {"min.insync.replicas": "2"} for t in app.tables.values())
    app = create_app(Settings(topic_replication=1, processor_store="memory://", processor_group="isr-1"))
    assert all(not t.changelog_topic.config for t in app.tables.values())

def test_list_name_rule_matches_the_assembler() -> None:
    assert naming.list_name("Heap Test Segment") == "HeapTestSegment"


def test_dry_run_warns_about_syncs_only_partly_in_the_range() -> None:
    report = replay.Report("pages", "r1", dry_run=True)
    list(replay.plan("pages", [rec(page("s1", 2, 3), offset=0), rec(page("s1", 3, 3), offset=1),
                               rec(page("s2", 1, 1), offset=2)], replay.Filter(), report))
    assert report.incomplete() == [{"account": "acme", "segment": "15225086", "sync": "s1", "pages": 2,
                                    "total_pages": 3}]
    assert report.as_json()["incomplete_syncs"] == report.incomplete()


@given(st.lists(st.tuples(st.sampled_from(["add", "remove"]), st.sampled_from(["a@x.io", "b@x.io", "c@x.io"]),
                          st.sampled_from(["d1", "d2"])), min_size=1, max_size=20))
def test_redriven_operations_end_in_each_ids_last_failed_operation(ops: list[tuple[str, str, str]]) -> None:
    entries = [dlq.parse_entry("sink", rec({"reason": "cordial rejected the operation", "delta_id": d, "chunk": 1,
                                            "account": "acme", "list_name": "L", "operation": op,
                                            "contact_id": who, "identity_key": "email"}, offset=i))
               for i, (op, who, d) in enumerate(ops)]
    plan = dlq.plan_redrive(entries, "r1")
    assert set(plan.outcomes) == {e.id for e in entries}
    for delta_id in {d for _, _, d in ops}:
        [delta] = [Delta.model_validate_json(o.value) for o in plan.outputs
                   if Delta.model_validate_json(o.value).delta_id == delta_id]
        assert not set(delta.add) & set(delta.remove)
        last = {who: op for op, who, d in ops if d == delta_id}
        assert {i: "add" for i in delta.add} | {i: "remove" for i in delta.remove} == last
