"""Dead letters on the real chain (Tansu, ingress, Faust worker, sink, simulator over HTTP), the
operator commands run as the CLI (issue 16): a late page is not re-driven over a newer sync of its
segment unless forced (#7); a dead letter larger than a record is written in parts, listed as one
entry and re-driven (#8)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from typing import Any

import pytest

from heapsync.topic_reader import read_topic
from heapsync_dev.samples import heap_request
from tests.conftest import Pipeline
from tests.ops.test_e2e import LIST, cli, wait_for

pytestmark = pytest.mark.integration


def cli_with_stderr(pipeline: Pipeline, *args: str, ok: tuple[int, ...] = (0,), json_flag: bool = True
                    ) -> tuple[Any, str]:
    res = subprocess.run([sys.executable, "-m", "heapsync_ops.cli", *args, *(["--json"] if json_flag else [])],
                         env=pipeline.env(),
                         capture_output=True, text=True, timeout=180)
    assert res.returncode in ok, f"heapsync {' '.join(args)} -> {res.returncode}\n{res.stdout}\n{res.stderr[-3000:]}"
    return json.loads(res.stdout), res.stderr


def test_a_late_page_is_refused_after_a_newer_sync_of_its_segment_and_forced_with_a_warning(
        pipeline: Pipeline) -> None:
    pipeline.extra_env.update({"HEAPSYNC_SYNC_TIMEOUT_SECONDS": "4"})
    pipeline.start_all()
    old, new = str(uuid.uuid4()), str(uuid.uuid4())
    # the old sync loses its page 2 (which adds x) and times out: its partial delta is applied
    assert pipeline.post(heap_request(old, 1, 2, add=["a@example.com"])).status == 200
    assert pipeline.wait_for_members(LIST, {"a@example.com"}) == {"a@example.com"}, pipeline.logs()
    # a newer sync of the segment: x is not a member
    assert pipeline.post(heap_request(new, 1, 1, add=["c@example.com"], remove=["x@example.com"])).status == 200
    members = {"a@example.com", "c@example.com"}
    assert pipeline.wait_for_members(LIST, members) == members, pipeline.logs()
    # the old sync's page 2 comes late: dead-lettered
    assert pipeline.post(heap_request(old, 2, 2, add=["x@example.com"])).status == 200
    [entry] = wait_for("the late page's dead letter", lambda: cli(pipeline, "dlq", "list", "--topic", "assembler"),
                       pipeline, timeout=60, every=2)
    assert entry["reason"] == "late page for an emitted sync"

    # re-driving it would put the old sync's x over the newer sync's removal: refused
    for args in (("--dry-run",), ()):
        refused, _ = cli_with_stderr(pipeline, "dlq", "redrive", "--topic", "assembler", *args, ok=(2,))
        [outcome] = refused["outcomes"]
        assert outcome["outcome"] == "failed" and outcome["detail"].startswith("refused: segment 15225086 had 1 newer")
        assert f"sync {new} at " in outcome["detail"] and "--force" in outcome["detail"]
        assert refused["produced"] == {"pages": 0, "deltas": 0} and refused["warnings"] == []
    assert [e["state"] for e in cli(pipeline, "dlq", "list", "--topic", "assembler")] == ["failed"]

    # --force re-drives it, loudly; the page is assembled as a fresh sync and applied after its timeout
    forced, stderr = cli_with_stderr(pipeline, "dlq", "redrive", "--topic", "assembler", "--force")
    assert [o["outcome"] for o in forced["outcomes"]] == ["redriven"] and forced["produced"]["pages"] == 1
    [warning] = forced["warnings"]
    assert f"WARNING: {entry['id']} re-driven with --force although segment 15225086" in stderr, stderr
    assert warning in stderr
    members |= {"x@example.com"}
    assert pipeline.wait_for_members(LIST, members) == members, pipeline.logs()


def test_a_dead_letter_larger_than_a_record_is_written_in_parts_listed_once_and_redriven(
        pipeline: Pipeline) -> None:
    pipeline.extra_env.update({
        "HEAPSYNC_PARTIAL_POLICY": "dead-letter",
        "HEAPSYNC_SYNC_TIMEOUT_SECONDS": "4",
        "HEAPSYNC_DEAD_LETTER_PART_BYTES": "16384",  # the rule as at 16 MiB, with pages a test can send
    })
    pipeline.start_all()
    sync = str(uuid.uuid4())
    ids = [f"user{n:05d}@example.com" for n in range(3000)]  # ~75 KB of ids held, page 3 never comes
    assert pipeline.post(heap_request(sync, 1, 3, add=ids[:1500])).status == 200
    assert pipeline.post(heap_request(sync, 2, 3, add=ids[1500:], remove=["gone@example.com"])).status == 200

    [entry] = wait_for("the timed-out sync's dead letter", lambda: cli(pipeline, "dlq", "list", "--topic", "assembler"),
                       pipeline, timeout=90, every=2)
    assert entry["reason"] == "sync timed out with pages missing" and "2 pages held" in entry["summary"]
    # on the topic: several records, none over the limit, under the sync's key
    raw = [(r.key or b"", r.value or b"") for r in read_topic(pipeline.broker.bootstrap,
                                                                f"{pipeline.prefix}.deltas.dlq", idle_timeout=10)]
    assert len(raw) >= 4 and all(len(k) + len(v) <= 16384 for k, v in raw), [len(v) for _, v in raw]
    assert {k for k, _ in raw} == {f"acme|sync||{sync}".encode()}

    shown, _ = cli_with_stderr(pipeline, "dlq", "show", entry["id"], json_flag=False)  # always JSON
    assert shown["entry"]["missing_pages"] == [3] and len(shown["entry"]["pages"]["1"]["add"]) == 1500
    report = cli(pipeline, "dlq", "redrive", "--topic", "assembler")
    assert [o["outcome"] for o in report["outcomes"]] == ["redriven"] and report["produced"]["deltas"] == 1
    assert pipeline.wait_for_members(LIST, set(ids)) == set(ids), pipeline.logs()
    assert cli(pipeline, "dlq", "list", "--topic", "assembler") == []
