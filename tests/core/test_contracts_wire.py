"""Every record kind on every topic, as the code before the contract models wrote it, still reads.

The byte strings below are literal records in the formats earlier heapsync versions wrote (dict
writers, before the models in ``heapsync/contracts.py``): each must decode through its model, and
the models' writers must produce what those readers, and the earlier ones, expect.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import orjson
import pytest

from heapsync.contracts import (
    TICK,
    AppliedChunk,
    AssemblerDeadLetter,
    DeadLetterHead,
    Delta,
    DoneMarker,
    HeldPage,
    RedriveMark,
    RejectedRecord,
    SinkDeadLetter,
    SyncMeta,
    Tick,
    delta_key,
    is_tick,
    list_key,
    mark_key,
    pages_key,
    progress_key,
    read_dead_letter,
    read_done_marker,
    read_mark,
    rejected_key,
    sync_key,
)
from heapsync.dlq_parts import join
from heapsync.topic_reader import Record
from heapsync_ops import dlq
from processors.records import parse_record

# -- pages topic ---------------------------------------------------------------------

OLD_SYNC_PAGE = (
    b'{"schema_version":1,"account":"acme","request_id":"req-1","received_at":"2026-01-01T00:00:00Z",'
    b'"replay_id":null,"payload":{"action_type":"segment.users.sync","customer_config":{"fields":[{"field_id":"1",'
    b'"value":{"id":"email","display_name":"Email"},"field_type":"identity_mapping"}]},"data":{"segment":'
    b'{"id":15225086,"name":"Heap Test Segment"},"sync_info":{"page_number":1,"total_pages":2,"sync_task_id":"t1"},'
    b'"add":[{"id":"a@x.io"}],"remove":[{"id":"b@x.io"}]}}}'
)
OLD_DRAIN_PAGE = (  # before signed_digest: a drain named by its request id
    b'{"schema_version":1,"account":"acme","request_id":"req-2","received_at":"2026-01-01T00:00:00+00:00",'
    b'"replay_id":null,"payload":{"action_type":"segment.users.drain","customer_config":{"fields":[]},'
    b'"data":{"segment":{"id":"15225086","name":"Heap Test Segment"}}}}'
)


def test_an_old_sync_page_and_drain_read() -> None:
    page = parse_record(OLD_SYNC_PAGE)
    assert (page.account, page.request_id, page.add, page.remove) == ("acme", "req-1", ["a@x.io"], ["b@x.io"])
    drain = parse_record(OLD_DRAIN_PAGE)
    assert drain.signed_digest is None and drain.payload.action_type == "segment.users.drain"
    assert pages_key("acme", "15225086") == b"acme:15225086"


def test_a_tick_is_the_tick_model_and_the_bytes_the_worker_always_sent() -> None:
    assert TICK == b'{"control":"tick"}' == Tick().model_dump_json().encode()
    assert Tick.model_validate_json(TICK).control == "tick"
    assert is_tick(TICK) and not is_tick(OLD_SYNC_PAGE)


# -- rejected topic ------------------------------------------------------------------

OLD_REJECTED = (  # before body_base64 and body_truncated
    b'{"schema_version":1,"account":"acme","request_id":"req-3","received_at":"2026-01-01T00:00:00Z",'
    b'"reason":"invalid payload","errors":[{"path":"data","message":"Field required","type":"missing"}],'
    b'"headers":{"Content-Type":"application/json"},"body":"{\\"action_type\\":\\"x\\"}"}'
)


def test_an_old_rejected_request_reads_with_its_exact_body() -> None:
    letter = read_dead_letter("rejected", orjson.loads(OLD_REJECTED))
    assert isinstance(letter, RejectedRecord)
    assert letter.exact_body() == b'{"action_type":"x"}' and letter.account_name == "acme"
    entry = dlq.parse_entry("rejected", Record("p.pages.rejected", 0, 3, 1000, rejected_key("acme"), OLD_REJECTED))
    assert (entry.account, entry.reason, entry.summary) == ("acme", "invalid payload", "request req-3")


# -- deltas topic --------------------------------------------------------------------

OLD_DELTA = (
    b'{"schema_version":1,"delta_id":"d1","account":"acme","segment_id":"15225086","segment_name":"Heap Test Segment",'
    b'"list_name":"HeapTestSegment","identity_field":"email","kind":"sync","sync_task_id":"t1","complete":true,'
    b'"total_pages":2,"missing_pages":[],"chunk":1,"chunks":1,"add":["a@x.io"],"remove":[],"replay_id":null,'
    b'"emitted_at":"2026-01-01T00:00:00Z"}'
)


def test_an_old_delta_reads_and_keeps_its_key() -> None:
    delta = Delta.model_validate_json(OLD_DELTA)
    assert delta_key(delta) == b"acme:HeapTestSegment" == list_key("acme", "HeapTestSegment").encode()
    assert delta.list_key == "acme:HeapTestSegment"


# -- sink progress topic -------------------------------------------------------------

OLD_APPLIED = (  # before dead_lettered
    b'{"sink":"cordial","chunk_key":"d1:1","delta_id":"d1","chunk":1,"chunks":1,"account":"acme",'
    b'"list_name":"HeapTestSegment","segment_id":"15225086","sync_task_id":"t1","kind":"sync","complete":true,'
    b'"adds":1,"removes":0,"applied_at":"2026-01-01T00:00:01Z"}'
)


def test_an_old_progress_record_reads() -> None:
    chunk = AppliedChunk.model_validate_json(OLD_APPLIED)
    assert (chunk.dead_lettered, chunk.applied_at) == (0, datetime(2026, 1, 1, 0, 0, 1, tzinfo=timezone.utc))
    assert progress_key("cordial", chunk.chunk_key) == "cordial|d1:1"


# -- assembler dead letters ----------------------------------------------------------

OLD_TIMED_OUT = (
    b'{"reason":"sync timed out with pages missing","sync":"acme|sync||t1","account":"acme","segment_id":"15225086",'
    b'"segment_name":"Heap Test Segment","identity_field":"email","replay_id":null,"sync_task_id":"t1",'
    b'"total_pages":3,"missing_pages":[1],"pages":{"2":{"add":["b"],"remove":["c"],"conflicts":0}},'
    b'"sync_emitted_at":1767225600.0}'
)
OLD_LATE_PAGE = (
    b'{"reason":"late page for an emitted sync","sync":"acme|sync||t1","page_number":2,"total_pages":2,'
    b'"sync_task_id":"t1","segment_id":"15225086","segment_name":"Heap Test Segment","adds":1,"removes":0,'
    b'"sync_emitted_at":null,"record":' + OLD_SYNC_PAGE + b"}"
)
EARLY_LATE_PAGE = (  # the first workers: the pages record under "page", no segment or sync fields of its own
    b'{"reason":"late page for an emitted sync","sync":"acme|sync||t1","page":' + OLD_SYNC_PAGE + b"}"
)
OLD_UNREADABLE = (
    b'{"reason":"unreadable pages record","sync":"partition-3","errors":[{"type":"missing","loc":["account"],'
    b'"msg":"Field required"}],"value":"{\\"oops\\":1}"}'
)
OLD_UNKNOWN_ACTION = b'{"reason":"unknown action type","sync":"partition-0","value":"{}"}'


def test_old_assembler_dead_letters_read_each_kind() -> None:
    timed_out = read_dead_letter("assembler", orjson.loads(OLD_TIMED_OUT))
    assert isinstance(timed_out, AssemblerDeadLetter)
    assert timed_out.held_pages() == {2: HeldPage(add=["b"], remove=["c"])}
    assert (timed_out.account_name, timed_out.summary()) == ("acme", "sync t1, 1 pages held")
    assert timed_out.list_of == "HeapTestSegment"  # no list_name in letters from before it: the segment's
    late = read_dead_letter("assembler", orjson.loads(OLD_LATE_PAGE))
    assert isinstance(late, AssemblerDeadLetter) and late.page_record == orjson.loads(OLD_SYNC_PAGE)
    assert (late.account_name, late.summary()) == ("acme", "sync t1, page 2")
    early = read_dead_letter("assembler", orjson.loads(EARLY_LATE_PAGE))
    assert isinstance(early, AssemblerDeadLetter) and early.page_record == orjson.loads(OLD_SYNC_PAGE)
    unreadable = read_dead_letter("assembler", orjson.loads(OLD_UNREADABLE))
    assert isinstance(unreadable, AssemblerDeadLetter) and unreadable.value == '{"oops":1}'
    assert unreadable.account_name is None
    unknown = read_dead_letter("assembler", orjson.loads(OLD_UNKNOWN_ACTION))
    assert isinstance(unknown, AssemblerDeadLetter) and unknown.reason == "unknown action type"


def test_the_early_late_page_letter_still_names_its_sync_for_the_staleness_check() -> None:
    entry = dlq.parse_entry("assembler", Record("p.deltas.dlq", 0, 1, 1000, b"acme|sync||t1", EARLY_LATE_PAGE))
    ref = dlq.sync_ref(entry)
    assert ref is not None and (ref.account, ref.segment_id, ref.sync_task_id) == ("acme", "15225086", "t1")


def test_the_model_writers_write_what_the_dict_writers_did() -> None:
    """Same fields, same values: the earlier readers (and other consumers) see no difference."""
    timed_out = AssemblerDeadLetter.timed_out(
        "acme|sync||t1", account="acme", segment_id="15225086", segment_name="Heap Test Segment",
        identity_field="email", replay_id=None, sync_task_id="t1", total_pages=3, missing_pages=[1],
        pages={"2": HeldPage(add=["b"], remove=["c"], conflicts=0)}, list_name="HeapTestSegment",
        sync_emitted_at=1767225600.0)
    # what the dict writer wrote, with the list it was for (added when list names could be pinned)
    assert orjson.loads(timed_out.encode()) == {**orjson.loads(OLD_TIMED_OUT), "list_name": "HeapTestSegment"}
    late = AssemblerDeadLetter.late_page(
        "acme|sync||t1", page_number=2, total_pages=2, sync_task_id="t1", segment_id="15225086",
        segment_name="Heap Test Segment", adds=1, removes=0, sync_emitted_at=None)
    late.record = orjson.loads(OLD_SYNC_PAGE)  # as the worker adds it
    assert orjson.loads(late.encode()) == orjson.loads(OLD_LATE_PAGE)
    unknown = AssemblerDeadLetter.unreadable(0, "{}", reason="unknown action type")
    assert orjson.loads(unknown.encode()) == orjson.loads(OLD_UNKNOWN_ACTION)
    assert late.records()[0][0] == sync_key("acme", "sync", "t1", None).encode()


def test_a_split_assembler_dead_letter_joins_back_and_a_lone_part_is_listed() -> None:
    big = AssemblerDeadLetter.timed_out(
        "acme|sync||t1", account="acme", segment_id="1", segment_name="S", identity_field="email",
        replay_id=None, sync_task_id="t1", total_pages=2, missing_pages=list(range(3, 20_000)),
        pages={"1": HeldPage(add=["a"])}, list_name="S", sync_emitted_at=1.0)
    parts = big.records(16_384)
    assert len(parts) > 1
    records = [Record("p.deltas.dlq", 0, i, 1000, k, v) for i, (k, v) in enumerate(parts)]
    [whole] = join(records)
    assert read_dead_letter("assembler", orjson.loads(whole.value or b"")) == big
    second = read_dead_letter("assembler", orjson.loads(parts[1][1]))
    assert not second.counted_once
    [lone] = join(records[:1])
    entry = dlq.parse_entry("assembler", lone)
    assert entry.summary.endswith(f"(in {len(parts)} parts, 1 found)")
    assert dlq.plan_redrive([entry], "r1").outcomes[entry.id][0] == "failed"


# -- sink dead letters ---------------------------------------------------------------

REF = (b'"delta_id":"d1","chunk":1,"chunks":2,"chunk_key":"d1:1","account":"acme","list_name":"HeapTestSegment",'
       b'"segment_id":"15225086","sync_task_id":"t1"')
OLD_SINK_OPERATION = (b'{"sink":"cordial","reason":"cordial rejected the operation",' + REF +
                      b',"operation":"add","contact_id":"a@x.io","identity_key":"email","status":400,'
                      b'"response":"{\\"error\\":\\"bad\\"}"}')
OLD_SINK_UNKNOWN_ACCOUNT = (b'{"sink":"cordial","reason":"unknown account",' + REF + b',"delta":' + OLD_DELTA + b"}")
OLD_SINK_UNREADABLE = (b'{"sink":"cordial","reason":"unreadable delta","partition":1,"offset":7,'
                       b'"errors":[{"type":"missing","loc":["account"],"msg":"Field required"}],"value":"{}"}')
OLD_SINK_IMPORT_ROW = (b'{"sink":"cordial","reason":"cordial import rejected the row",' + REF +
                       b',"job_id":"j1","operation":"import","row":{"value":42,"message":"bad"},"status":422,'
                       b'"contact_id":42,"response":"bad"}')


def test_old_sink_dead_letters_read_each_kind() -> None:
    op = read_dead_letter("sink", orjson.loads(OLD_SINK_OPERATION))
    assert isinstance(op, SinkDeadLetter) and (op.operation, op.contact_id, op.status) == ("add", "a@x.io", 400)
    assert (op.account_name, op.list_of, op.summary()) == ("acme", "HeapTestSegment", "add on list HeapTestSegment")
    whole = read_dead_letter("sink", orjson.loads(OLD_SINK_UNKNOWN_ACCOUNT))
    assert isinstance(whole, SinkDeadLetter) and Delta.model_validate(whole.delta) == Delta.model_validate_json(
        OLD_DELTA)
    unreadable = read_dead_letter("sink", orjson.loads(OLD_SINK_UNREADABLE))
    assert isinstance(unreadable, SinkDeadLetter) and (unreadable.partition, unreadable.value) == (1, "{}")
    row = read_dead_letter("sink", orjson.loads(OLD_SINK_IMPORT_ROW))
    assert isinstance(row, SinkDeadLetter) and row.contact_id == 42 and row.row == {"value": 42, "message": "bad"}


def test_old_sink_dead_letters_still_redrive() -> None:
    entries = [dlq.parse_entry("sink", Record("p.sink.dlq", 0, i, 1000, b"d1", v))
               for i, v in enumerate((OLD_SINK_OPERATION, OLD_SINK_UNKNOWN_ACCOUNT))]
    plan = dlq.plan_redrive(entries, "r1")
    assert [o for o, _ in plan.outcomes.values()] == ["redriven", "redriven"]
    deltas = [Delta.model_validate_json(o.value) for o in plan.outputs]
    assert {(d.kind, tuple(d.add), d.replay_id) for d in deltas} == {("sync", ("a@x.io",), "r1")}
    assert {o.key for o in plan.outputs} == {b"acme:HeapTestSegment"}


def test_a_dead_letter_with_a_field_of_the_wrong_type_is_still_listed_by_its_reason() -> None:
    letter = read_dead_letter("sink", {"reason": "odd", "chunk": "not a number"})
    assert isinstance(letter, DeadLetterHead) and letter.reason == "odd"
    assert read_dead_letter("sink", {"reason": 5, "split": "x"}).reason == "unreadable dead-letter record"


# -- re-drive marks ------------------------------------------------------------------

OLD_MARK = (b'{"entry":"sink:0:5","outcome":"redriven","detail":"","replay_id":"r1",'
            b'"at":"2026-01-01T00:00:00.123456+00:00"}')


def test_an_old_mark_reads_and_a_new_one_reads_back() -> None:
    mark = read_mark(OLD_MARK)
    assert mark is not None and (mark.entry, mark.outcome, mark.replay_id) == ("sink:0:5", "redriven", "r1")
    assert read_mark(None) is None and read_mark(b"[]") is None
    entry = dlq.parse_entry("sink", Record("p.sink.dlq", 0, 5, 1000, b"d1", OLD_SINK_OPERATION))
    assert entry.mark_key == mark_key("p.sink.dlq", 0, 5) == "p.sink.dlq|0|5"
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    again = read_mark(dlq.mark_value(entry, "failed", "still invalid", "r2", now))
    assert again == RedriveMark(entry="sink:0:5", outcome="failed", detail="still invalid", replay_id="r2", at=now)
    assert dlq.state_of(entry, {entry.mark_key: mark}) == "redriven"


# -- sync metadata (the syncs table's changelog) -------------------------------------

EARLY_SYNC_META = (  # the first workers: received as a list of page numbers, no ref/announced/segment
    b'{"account":"acme","segment_id":"1","segment_name":"S","identity_field":"email","received":[1,3,3],'
    b'"total_pages":3,"partition":0,"started_at":100.0,"sync_task_id":"t1"}'
)
OLD_SYNC_META = (
    b'{"account":"acme","kind":"sync","ref":"t1","replay_id":null,"segment":"[\\"acme\\",\\"1\\"]","segment_id":"1",'
    b'"segment_name":"S","identity_field":"email","announced":3,"total_pages":3,"received":2,"partition":0,'
    b'"started_at":100.0}'
)


@pytest.mark.parametrize("raw", [EARLY_SYNC_META, OLD_SYNC_META])
def test_sync_metadata_of_every_worker_version_reads(raw: bytes) -> None:
    meta = SyncMeta.model_validate_json(raw)
    assert (meta.account, meta.kind, meta.received, meta.total_pages, meta.started_at) == ("acme", "sync", 2, 3, 100.0)


def test_the_assembler_writes_the_sync_metadata_it_always_wrote() -> None:
    old: dict[str, Any] = orjson.loads(OLD_SYNC_META)
    written = SyncMeta(**{k: v for k, v in old.items()}).table_value()
    assert written == old and list(written) == list(old)


# -- done markers (the done table's changelog) -------------------------------------------

EARLIEST_DONE = b"true"  # the first workers: done, nothing more
OLD_DONE = b'{"at":100.0,"complete":false,"digests":["0a1b2c3d4e5f6071",null],"outcome":"dead-letter"}'
DISABLED_DONE = b'{"at":200.0,"complete":true,"digests":["0a1b2c3d4e5f6071"],"outcome":"disabled","segment_id":"1"}'


@pytest.mark.parametrize(("raw", "expected"), [
    (EARLIEST_DONE, (None, None, True, [], None)),
    (OLD_DONE, (100.0, "dead-letter", False, ["0a1b2c3d4e5f6071", None], None)),
    (DISABLED_DONE, (200.0, "disabled", True, ["0a1b2c3d4e5f6071"], "1")),
])
def test_done_markers_of_every_worker_version_read(raw: bytes, expected: tuple[Any, ...]) -> None:
    done = read_done_marker(raw)
    assert done is not None
    assert (done.at, done.outcome, done.complete, done.digests, done.segment_id) == expected
    assert read_done_marker(None) is None and read_done_marker(b"not json") is None


@pytest.mark.parametrize("digests", ['{"1":"0a1b"}', "[1,2]", '"0a1b"'])
def test_a_done_marker_with_digests_of_another_shape_still_reads(digests: str) -> None:
    """Status reads only outcome, segment_id and at: a future shape of the digests must not make it stop
    counting a disabled segment's skipped syncs."""
    raw = b'{"at":200.0,"digests":%s,"outcome":"disabled","segment_id":"1"}' % digests.encode()
    done = read_done_marker(raw)
    assert done is not None and (done.outcome, done.segment_id, done.at, done.digests) == ("disabled", "1", 200.0, [])
    assert read_done_marker(b'{"outcome":"disabled","segment_id":[1]}') is None  # what status reads must read
    assert read_done_marker(b"[1]") is None and read_done_marker(b"false") is None


def test_the_assembler_writes_done_markers_the_model_reads() -> None:
    from processors import rules
    from tests.core.test_segment_settings import accounts
    from tests.processors.test_segments import feed, new_assembler, page

    asm = new_assembler(accounts('[accounts.acme.segments."1"]\nenabled = false\n'))
    feed(asm, page("s1", 1, 1, ["a@x.com"]), now=300.0)
    feed(asm, page("s2", 1, 1, ["b@x.com"], segment="2"), now=400.0)
    written = {k: orjson.dumps(v) for k, v in asm.done.items()}  # as Faust's json codec writes them
    disabled = DoneMarker.model_validate_json(written[rules.sync_key("acme", "sync", "s1", None)])
    sent = read_done_marker(written[rules.sync_key("acme", "sync", "s2", None)])
    assert (disabled.outcome, disabled.segment_id, disabled.at, len(disabled.digests)) == ("disabled", "1", 300.0, 1)
    assert sent is not None and (sent.outcome, sent.complete, sent.model_extra) == ("delta", True, {})
