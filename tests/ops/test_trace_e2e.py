"""`heapsync trace` on the real chain (issue 14 §4): Tansu, ingress, Faust worker, sink, Cordial simulator
over HTTP, the commands run as the CLI. A contact is added, a copy of that chunk comes again (a repeat),
it is removed, its next add is dead-lettered while Cordial fails and then re-driven: the trace lists
each change in order with its outcome, and never another contact's id."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest
from confluent_kafka import Producer

from heapsync.topic_reader import read_topic
from heapsync_dev.samples import heap_request
from tests.conftest import Pipeline, http
from tests.ops.test_e2e import LIST, cli, wait_for

pytestmark = pytest.mark.integration

ANN = "ann@example.com"
OTHERS = ("bob@example.com", "cat@example.com", "dan@example.com")


def trace_table(pipeline: Pipeline, *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "heapsync_ops.cli", "trace", *args], env=pipeline.env(),
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr[-3000:]}"
    return res.stdout


def test_trace_shows_each_change_of_one_contact_in_order_with_its_outcome(pipeline: Pipeline) -> None:
    pipeline.extra_env.update({"HEAPSYNC_SINK_MAX_RETRIES": "0"})
    pipeline.start_all()
    added, removed, again = (str(uuid.uuid4()) for _ in range(3))

    assert pipeline.post(heap_request(added, 1, 1, add=[ANN, OTHERS[0]])).status == 200
    assert pipeline.wait_for_members(LIST, {ANN, OTHERS[0]}) == {ANN, OTHERS[0]}, pipeline.logs()
    # the same chunk delivered again (at-least-once): the sink skips it
    [first] = [r for r in read_topic(pipeline.broker.bootstrap, f"{pipeline.prefix}.deltas", idle_timeout=10)
               if added.encode() in (r.value or b"")]
    producer = Producer({"bootstrap.servers": pipeline.broker.bootstrap})
    producer.produce(first.topic, first.value, key=first.key, partition=first.partition)
    producer.flush(10)

    assert pipeline.post(heap_request(removed, 1, 1, add=[OTHERS[1]], remove=[ANN])).status == 200
    assert pipeline.wait_for_members(LIST, {OTHERS[0], OTHERS[1]}) == {OTHERS[0], OTHERS[1]}, pipeline.logs()

    # Cordial fails every call: the next add of the contact is dead-lettered
    assert http("POST", f"{pipeline.sim_url}/_sim/config", b'{"error_rate": 1.0}').status == 200
    assert pipeline.post(heap_request(again, 1, 1, add=[ANN, OTHERS[2]])).status == 200
    wait_for("two sink dead letters", lambda: len(cli(pipeline, "dlq", "list", "--topic", "sink")) >= 2, pipeline,
             timeout=150, every=3)
    assert http("POST", f"{pipeline.sim_url}/_sim/config", b'{"error_rate": 0.0}').status == 200
    report = cli(pipeline, "dlq", "redrive", "--topic", "sink")
    replay = report["replay_id"]
    members = {ANN, *OTHERS}
    assert pipeline.wait_for_members(LIST, members) == members, pipeline.logs()

    last: list[dict] = []

    def traced() -> dict | None:  # the re-driven change applied: its progress record is written after the apply
        doc = cli(pipeline, "trace", " Ann@Example.COM ")  # matched the way Cordial compares emails
        last[:] = [doc]
        return doc if doc["lists"] and doc["lists"][0]["steps"][-1]["outcome"] == "applied" else None

    try:
        doc = wait_for("the re-driven change applied in the trace", traced, pipeline, timeout=60, every=2)
    except AssertionError as exc:
        raise AssertionError(f"last trace: {json.dumps(last, indent=1)}") from exc
    [lst] = doc["lists"]
    assert (lst["account"], lst["list_name"], lst["member"]) == ("acme", LIST, True)
    steps = [(s["sync_task_id"], s["replay_id"], s["change"], s["outcome"]) for s in lst["steps"]]
    assert steps == [
        (added, None, "add", "applied"),
        (added, None, "add", "repeat"),
        (removed, None, "remove", "applied"),
        (again, None, "add", "dead-lettered"),
        (again, replay, "add", "applied"),
    ], steps
    dead = lst["steps"][3]
    assert dead["detail"].startswith("cordial kept failing (HTTP 503)"), dead
    assert dead["redriven_as"] == replay and dead["dead_letter"].startswith("sink:")
    assert all(s["at"] for s in lst["steps"]) and {s["contact"] for s in lst["steps"]} == {ANN}

    text = json.dumps(doc)
    assert not any(other in text for other in OTHERS)  # personal data: only the asked contact

    # narrowing: another account or list has nothing of it
    assert cli(pipeline, "trace", ANN, "--account", "other")["lists"] == []
    assert cli(pipeline, "trace", ANN, "--list", "NoSuchList")["lists"] == []
    assert len(cli(pipeline, "trace", ANN, "--list", LIST)["lists"][0]["steps"]) == 5

    table = trace_table(pipeline, ANN)
    assert f"acme / {LIST}: {ANN}" in table
    for word in ("applied", "repeat", "dead-lettered", replay, added, removed, again,
                 "after the last applied change: a member"):
        assert word in table, (word, table)
    assert not any(other in table for other in OTHERS), table
    assert "no change on the deltas topic" in trace_table(pipeline, "nobody@example.com")
