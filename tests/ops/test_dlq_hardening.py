"""Dead-letter hardening (issue 16 #7, #8, #12), on plain records:

- #7 re-driving a sync's content after a newer sync of its segment was emitted is refused
  unless forced;
- #8 no dead-letter record is larger than the limit, however large the dead letter; the parts
  read back as one entry that re-drives like an unsplit one; late pages carry their ids once;
- #12 a rejected request is re-driven from its exact bytes, and not at all when it was cut.
"""

from __future__ import annotations

import base64
from datetime import datetime, timezone
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from heapsync import dlq_parts
from heapsync.contracts import Delta, HeapSync, PageRecord, RejectedRecord, delta_id_for
from heapsync.topic_reader import Record
from heapsync_dev.samples import heap_request
from heapsync_ops import dlq
from processors.assembler import Assembler

LIMIT = 16 * 1024 * 1024  # the topics' max.message.bytes (heapsync/kafka.py)


def rec(value: Any, *, topic: str = "p.deltas.dlq", partition: int = 0, offset: int = 0, ts: int = 1_000,
        key: bytes | None = b"k") -> Record:
    raw = value if isinstance(value, bytes) or value is None else orjson.dumps(value)
    return Record(topic, partition, offset, ts, key, raw)


def as_records(pairs: list[tuple[bytes, bytes]], *, topic: str = "p.deltas.dlq", first: int = 0) -> list[Record]:
    return [Record(topic, 0, first + i, 1_000 + i, k, v) for i, (k, v) in enumerate(pairs)]


# -- #8: no record over the limit --------------------------------------------------------


def timed_out_dead_letter(pages: int, ids_per_page: int, id_len: int = 30) -> Any:
    """The issue's case through the assembler: a sync timed out with page 1 missing, the rest held."""
    asm = Assembler({}, {}, {}, {}, timeout_seconds=10, partial_policy="dead-letter")
    for n in range(2, pages + 2):
        ids = [f"{n:03d}-{i:08d}-".ljust(id_len, "x") + "@example.com" for i in range(ids_per_page)]
        asm.on_sync_page("acme", HeapSync.model_validate(heap_request("big", n, pages + 1, add=[])),
                         partition=0, now=0, add=ids, remove=[])
    [letter] = asm.drive(asm.on_tick(partition=0), now=10).dead_letters
    return letter


def test_a_dead_letter_over_the_record_limit_is_written_as_parts_each_within_it() -> None:
    letter = timed_out_dead_letter(pages=19, ids_per_page=30_000)  # the 19 x 30,000 ids
    whole = orjson.dumps({"reason": letter.reason, "sync": letter.sync_key, **letter.detail})
    assert len(whole) > LIMIT  # what used to be sent as one record and refused
    for limit in (dlq_parts.PART_MAX_BYTES, LIMIT):
        records = letter.records(limit)
        assert len(records) > 1 and max(len(k) + len(v) for k, v in records) <= limit
        assert {k for k, _ in records} == {letter.sync_key.encode()}  # one key: one partition, in order
    # read back: one entry, the same re-drive as the unsplit dead letter
    [joined] = dlq_parts.join(as_records(letter.records()))
    assert joined.value == whole and joined.offset == 0
    [entry] = [dlq.parse_entry("assembler", r) for r in dlq_parts.join(as_records(letter.records()))]
    assert entry.id == "assembler:0:0" and entry.reason == "sync timed out with pages missing"
    assert "19 pages held" in entry.summary
    split_plan = dlq.plan_redrive([entry], "r1", chunk_size=100_000)
    whole_plan = dlq.plan_redrive([dlq.parse_entry("assembler", rec(whole))], "r1", chunk_size=100_000)
    assert split_plan.outcomes[entry.id] == ("redriven", "")
    strip = [orjson.loads(o.value) | {"emitted_at": None} for o in split_plan.outputs]
    assert strip == [orjson.loads(o.value) | {"emitted_at": None} for o in whole_plan.outputs]
    assert sum(len(Delta.model_validate_json(o.value).add) for o in split_plan.outputs) == 19 * 30_000


def test_a_small_dead_letter_is_one_record_as_before() -> None:
    letter = timed_out_dead_letter(pages=2, ids_per_page=3)
    [(key, value)] = letter.records()
    assert key == b"acme|sync||big" and orjson.loads(value)["pages"]["2"]["add"][0].startswith("002-")


def test_a_very_long_sync_key_is_hashed_so_the_key_stays_small() -> None:
    key = dlq_parts.record_key("acme|" + "s" * 100_000)
    assert key.startswith(b"sha256:") and len(key) < 100
    assert dlq_parts.record_key("acme|s1") == b"acme|s1"


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 200_000), limit=st.integers(dlq_parts.MIN_PART_BYTES, 60_000),
       reason=st.text(max_size=400), key=st.binary(min_size=0, max_size=600), repeat=st.booleans(), seed=st.randoms())
def test_parts_never_exceed_the_limit_and_join_back_exactly(size: int, limit: int, reason: str, key: bytes,
                                                            repeat: bool, seed: Any) -> None:
    value = orjson.dumps({"reason": reason, "sync": reason * 3, "n": size, "blob": "é\u2028\x00" * (size // 3)})
    parts = dlq_parts.split(key, value, limit)
    assert all(len(k) + len(v) <= limit for k, v in parts)
    records = as_records(parts + (parts if repeat else []))  # a worker that resent the group after a crash
    others = [rec({"reason": "other"}, offset=10_000)]
    joined = dlq_parts.join(others + records)
    resent_whole = [value] if repeat and len(parts) == 1 else []  # an unsplit repeat is read twice, as before
    assert [r.value for r in joined] == [others[0].value, value, *resent_whole]
    if len(parts) > 2:  # a part lost: listed, says what is missing, not re-drivable
        lost = [r for r in as_records(parts) if r.offset != 1]
        [incomplete] = dlq_parts.join(lost)
        entry = dlq.parse_entry("assembler", incomplete)
        assert f"only {len(parts) - 1} of its {len(parts)} parts" in entry.doc["incomplete"]
        assert entry.reason == (reason[:200] or "unknown")
        plan = dlq.plan_redrive([entry], "r1")
        assert plan.outputs == [] and "cannot re-drive" in plan.outcomes[entry.id][1]
    records = as_records(parts)
    seed.shuffle(records)  # parts read out of order (never on one partition, but the join does not care)
    assert [r.value for r in dlq_parts.join(records)] == [value]


def test_a_late_page_dead_letter_carries_its_ids_once() -> None:
    asm = Assembler({}, {}, {}, {}, timeout_seconds=10)
    asm.drive(asm.on_sync_page("acme", HeapSync.model_validate(heap_request("s1", 1, 2, add=["a@x.io"])),
                               partition=0, now=0), 0)
    asm.drive(asm.on_tick(partition=0), 10)
    step = asm.on_sync_page("acme", HeapSync.model_validate(heap_request("s1", 2, 2, add=["late@x.io"] * 1)),
                            partition=0, now=11)
    [letter] = step.dead_letters
    letter.detail["record"] = {"payload": heap_request("s1", 2, 2, add=["late@x.io"])}  # as the worker adds it
    [(_, value)] = letter.records()
    assert value.count(b"late@x.io") == 1


def test_old_dead_letters_still_read_and_redrive() -> None:
    """Written before the split (ids twice in a late page, no sync_emitted_at): read as before."""
    page_record = PageRecord(account="acme", request_id="r-2", received_at=datetime.now(timezone.utc),
                             payload=heap_request("s1", 2, 2, add=["b@x.io"])).model_dump(mode="json")
    old_late = rec({"reason": "late page for an emitted sync", "sync": "acme|s1", "page_number": 2, "total_pages": 2,
                    "sync_task_id": "s1", "segment_id": "15225086", "segment_name": "Heap Test Segment",
                    "add": ["b@x.io"], "remove": [], "record": page_record}, offset=7)
    [read] = dlq_parts.join([old_late])
    entry = dlq.parse_entry("assembler", read)
    assert (entry.id, entry.account, entry.summary) == ("assembler:0:7", "acme", "sync s1, page 2")
    plan = dlq.plan_redrive([entry], "r9")
    [out] = plan.outputs
    assert out.target == "pages" and PageRecord.model_validate_json(out.value).replay_id == "r9"


# -- #7: stale sync content ---------------------------------------------------------------


def delta_rec(task: str | None, at: float, *, kind: str = "sync", segment: str = "15225086", account: str = "acme",
              replay: str | None = None, offset: int = 0, remove: list[str] | None = None) -> Record:
    d = Delta(delta_id=delta_id_for(account, task or "drain"), account=account, segment_id=segment,
              segment_name="Heap Test Segment", list_name="HeapTestSegment", identity_field="email", kind=kind,
              sync_task_id=task, remove=remove or [], replay_id=replay,
              emitted_at=datetime.fromtimestamp(at, timezone.utc))
    return Record("p.deltas", 0, offset, int(at * 1000), f"{account}:HeapTestSegment".encode(),
                  d.model_dump_json().encode())


def late_page(at: float | None, *, offset: int = 3, task: str = "s1") -> dlq.Entry:
    page_record = PageRecord(account="acme", request_id="r-2", received_at=datetime.now(timezone.utc),
                             payload=heap_request(task, 2, 2, add=["x@x.io"])).model_dump(mode="json")
    doc = {"reason": "late page for an emitted sync", "sync": f"acme|{task}", "page_number": 2, "total_pages": 2,
           "sync_task_id": task, "segment_id": "15225086", "segment_name": "Heap Test Segment", "adds": 1,
           "removes": 0, "record": page_record}
    if at is not None:
        doc["sync_emitted_at"] = at
    return dlq.parse_entry("assembler", rec(doc, offset=offset, ts=5_000_000))


def test_a_late_page_is_stale_once_a_newer_sync_of_its_segment_was_emitted() -> None:
    entry = late_page(100.0)
    ref = dlq.sync_ref(entry)
    assert ref == dlq.SyncRef("acme", "15225086", "s1", 100.0) and ref is not None
    deltas = [
        delta_rec("s0", 50.0),                           # older: before s1 went out
        delta_rec("s1", 100.2),                          # s1's own partial delta
        delta_rec("s1", 400.0, replay="rp"),             # a replay of s1: still s1's content
        delta_rec("s9", 150.0, segment="other"),         # another segment
        delta_rec("s8", 150.0, account="beta"),          # another account
        delta_rec("s2", 200.0, remove=["x@x.io"], offset=1),  # newer: removed x
        delta_rec("s2", 200.0, offset=2),                # its second chunk: one sync, named once
    ]
    [(entry_id, verdict)] = dlq.newer_syncs({entry.id: ref}, deltas).items()
    assert verdict.since == 100.0 and len(verdict.newer) == 1 and verdict.newer[0].startswith("sync s2 at ")
    problem = verdict.problem(ref)
    assert problem is not None and "segment 15225086 had 1 newer sync(s)" in problem and "sync s2" in problem
    # and a drain counts: it cleared the list after s1
    drained = dlq.newer_syncs({entry.id: ref}, [delta_rec(None, 300.0, kind="drain")])
    assert drained[entry.id].newer[0].startswith("a drain at ")
    # nothing newer: fine to re-drive
    assert dlq.newer_syncs({entry.id: ref}, deltas[:5])[entry.id].problem(ref) is None


def test_an_old_entry_is_dated_by_its_syncs_first_delta_or_refused_when_it_cannot_be() -> None:
    entry = late_page(None)
    ref = dlq.sync_ref(entry)
    assert ref is not None and ref.emitted_at is None
    verdict = dlq.newer_syncs({entry.id: ref}, [delta_rec("s1", 100.0), delta_rec("s2", 200.0)])[entry.id]
    assert verdict.since == 100.0 and len(verdict.newer) == 1
    unknown = dlq.newer_syncs({entry.id: ref}, [delta_rec("s2", 200.0)])[entry.id]
    assert unknown.since is None and "cannot tell" in (unknown.problem(ref) or "")


def test_a_timed_out_sync_without_its_time_is_dated_by_its_dead_letter() -> None:
    entry = dlq.parse_entry("assembler", rec({
        "reason": "sync timed out with pages missing", "sync": "acme|s1", "account": "acme", "sync_task_id": "s1",
        "segment_id": "15225086", "segment_name": "Heap Test Segment", "identity_field": "email",
        "total_pages": 2, "missing_pages": [2], "pages": {"1": {"add": ["x@x.io"], "remove": []}}}, ts=150_000))
    assert dlq.sync_ref(entry) == dlq.SyncRef("acme", "15225086", "s1", 150.0)
    # unreadable records and sink entries hold no sync content to check
    assert dlq.sync_ref(dlq.parse_entry("assembler", rec({"reason": "unreadable pages record", "value": "x"}))) is None
    assert dlq.sync_ref(dlq.parse_entry("sink", rec({"reason": "x", "delta": {}}))) is None


def test_stale_content_is_refused_unless_forced_and_forcing_warns() -> None:
    entry, fresh = late_page(100.0), late_page(100.0, offset=4, task="s5")
    stale = {entry.id: "segment 15225086 had 1 newer sync(s) emitted after sync s1 went out ..."}
    refused = dlq.plan_redrive([entry, fresh], "r1", stale=stale)
    outcome, detail = refused.outcomes[entry.id]
    assert outcome == "failed" and detail.startswith("refused: segment 15225086") and "--force" in detail
    assert refused.outcomes[fresh.id] == ("redriven", "") and len(refused.outputs) == 1
    assert refused.warnings == []
    forced = dlq.plan_redrive([entry, fresh], "r1", stale=stale, force=True)
    assert forced.outcomes[entry.id] == ("redriven", "") and len(forced.outputs) == 2
    [warning] = forced.warnings
    assert warning.startswith(f"{entry.id} re-driven with --force although segment 15225086")


# -- #12: exact bytes of a rejected request -----------------------------------------------


def rejected_entry(**fields: Any) -> dlq.Entry:
    r = RejectedRecord(account="acme", request_id="req1", received_at=datetime.now(timezone.utc),
                       reason="invalid payload", **fields)
    return dlq.parse_entry("rejected", rec(r.model_dump(mode="json"), topic="p.pages.rejected", offset=3))


def test_a_rejected_request_is_redriven_from_its_exact_bytes_not_the_lossy_text() -> None:
    exact = orjson.dumps(heap_request("s9", 1, 1, add=["josé@example.com"]))
    entry = rejected_entry(body=exact.decode().replace("é", "\ufffd"), body_base64=base64.b64encode(exact).decode())
    [out] = dlq.plan_redrive([entry], "r1").outputs
    page = PageRecord.model_validate_json(out.value)
    assert page.payload["data"]["add"] == [{"id": "josé@example.com"}]


def test_a_rejected_body_that_is_not_utf8_stays_rejected_instead_of_changing_its_ids() -> None:
    latin1 = orjson.dumps(heap_request("s9", 1, 1, add=["josé@example.com"])).decode().encode("latin-1")
    entry = rejected_entry(body=latin1.decode("utf-8", "replace"), body_base64=base64.b64encode(latin1).decode())
    plan = dlq.plan_redrive([entry], "r1")
    assert plan.outputs == []
    outcome, detail = plan.outcomes[entry.id]
    assert outcome == "failed" and "not UTF-8 (byte 0xe9" in detail


def test_a_rejected_body_cut_when_kept_is_refused_even_if_what_is_left_parses() -> None:
    body = orjson.dumps(heap_request("s9", 1, 1, add=["a@example.com"])).decode()
    plan = dlq.plan_redrive([rejected_entry(body=body, body_truncated=True)], "r1")
    assert plan.outputs == []
    [(outcome, detail)] = plan.outcomes.values()
    assert outcome == "failed" and "cut to fit a record" in detail


def test_timed_out_syncs_of_one_segment_are_redriven_oldest_first_whatever_the_read_order() -> None:
    def timed_out(task: str, at: float, partition: int) -> dlq.Entry:
        return dlq.parse_entry("assembler", Record("p.deltas.dlq", partition, 0, 1_000, b"k", orjson.dumps({
            "reason": "sync timed out with pages missing", "sync": f"acme|sync||{task}", "account": "acme",
            "sync_task_id": task, "segment_id": "15225086", "segment_name": "Heap Test Segment",
            "identity_field": "email", "total_pages": 2, "missing_pages": [2], "sync_emitted_at": at,
            "pages": {"1": {"add": [] if task == "new" else ["x@x.io"], "remove": ["x@x.io"] if task == "new" else []}},
        })))

    newer, older = timed_out("new", 200.0, 0), timed_out("old", 100.0, 1)  # read newer first (partition 0)
    plan = dlq.plan_redrive([newer, older], "r1")
    assert [Delta.model_validate_json(o.value).sync_task_id for o in plan.outputs] == ["old", "new"]
