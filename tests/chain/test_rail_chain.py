"""The removal rail on the real chain (issue 14, section 1): Tansu broker, the sink as a process, the
Cordial simulator over HTTP, `heapsync held` run as the CLI. A delta removing too much is held (the
list in "Cordial" keeps its members), a later sync of the same list waits behind it, and
release/discard decide it, also after the sink was killed and restarted."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from heapsync_dev.broker import free_port
from tests.conftest import Pipeline, http
from tests.ops.test_e2e import cli
from tests.sink_helpers import make_delta, produce, read_topic, sim_members, wait_for

pytestmark = pytest.mark.integration


def emails(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}@example.com" for i in range(n)]


def metrics(port: int) -> str:
    return str(http("GET", f"http://127.0.0.1:{port}/metrics").body)


def rail_accounts(pipeline: Pipeline, rail: str) -> None:
    pipeline.write_accounts(
        "[accounts.acme]\n"
        f'heap_webhook_secrets = ["{pipeline.secret}"]\n'
        f'cordial_api_key = "{pipeline.cordial_key}"\n'
        f'cordial_base_url = "{pipeline.sim_url}/v2"\n' + rail)


def held_rows(pipeline: Pipeline, n: int) -> list[dict]:
    deadline = time.monotonic() + 60
    rows: list[dict] = []
    while time.monotonic() < deadline:
        rows = cli(pipeline, "held", "list")
        if len(rows) == n and all(r["waiting"] >= 0 for r in rows):
            return rows
        time.sleep(1)
    return rows


def test_a_mass_removal_is_held_a_later_sync_waits_and_release_applies_both_in_order(pipeline: Pipeline) -> None:
    rail_accounts(pipeline, "max_removal_fraction = 0.5\n")
    pipeline.start_simulator()
    metrics_port = free_port()
    sink = pipeline.start("sink", "sink", env=pipeline.env(HEAPSYNC_METRICS_PORT=str(metrics_port)))
    everyone = emails("u", 10)
    produce(pipeline, make_delta("Seg", add=everyone))
    assert wait_for(lambda: sim_members(pipeline, "acme", "Seg") == set(everyone)), pipeline.logs()

    # removes 8 of 10 members, in two chunks: held (both); the next sync re-adds u0 and adds n0: it must wait
    # behind, not overtake
    mass = make_delta("Seg", remove=everyone[:4], chunks=2)
    mass_2 = make_delta("Seg", remove=everyone[4:8], delta_id=mass.delta_id, chunk=2, chunks=2)
    later = make_delta("Seg", add=["u0@example.com", "n0@example.com"])
    other = make_delta("Other", add=["o@example.com"])  # another list is not held up
    produce(pipeline, mass, mass_2, later, other)
    assert wait_for(lambda: sim_members(pipeline, "acme", "Other") == {"o@example.com"}), pipeline.logs()
    [row] = held_rows(pipeline, 1)
    assert row["delta_id"] == mass.delta_id and row["list_name"] == "Seg"
    assert row["reason"] == "would remove 8 of 10 members (more than 50%)"
    assert row["waiting_deltas"] == [later.delta_id] and row["decision"] is None and row["chunks_held"] == 2
    assert sim_members(pipeline, "acme", "Seg") == set(everyone)  # nothing of either applied
    shown = cli(pipeline, "held", "show", mass.delta_id[:8])
    assert shown["waiting_detail"] == [{"hold": later.delta_id, "delta_id": later.delta_id, "replay_id": None,
                                        "kind": "sync", "sync_task_id": None, "chunks": 1, "adds": 2, "removes": 0}]
    assert "u0@example.com" not in str(shown)  # no contact ids
    held_metric = 'heapsync_sink_held_deltas{account="acme",sink="cordial"}'
    assert wait_for(lambda: f"{held_metric} 1.0" in metrics(metrics_port), 30), metrics(metrics_port)
    status = cli(pipeline, "status")
    assert [h["delta_id"] for h in status["held"]] == [mass.delta_id]
    # deciding the waiting one is refused: it is not the hold
    res = subprocess.run([sys.executable, "-m", "heapsync_ops.cli", "held", "release", later.delta_id],
                         env=pipeline.env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and f"waits behind {mass.delta_id}" in res.stderr

    released = cli(pipeline, "held", "release", mass.delta_id)
    assert released["action"] == "release" and released["waiting_deltas"] == [later.delta_id]
    expected = set(everyone[8:]) | {"u0@example.com", "n0@example.com"}  # in order: remove u0, then add it back
    assert wait_for(lambda: sim_members(pipeline, "acme", "Seg") == expected), pipeline.logs()
    assert wait_for(lambda: cli(pipeline, "held", "list") == [], 60), pipeline.logs()
    assert wait_for(lambda: f"{held_metric} 0.0" in metrics(metrics_port), 30), metrics(metrics_port)
    progress = dict(read_topic(pipeline, f"{pipeline.prefix}.sink.progress", at_least=5))
    assert {f"cordial|{d.chunk_key}" for d in (mass, mass_2, later)} <= set(progress)
    assert "delta held by the removal rail" in sink.output()
    assert sink.stop() == 0


def test_a_held_drain_survives_a_restart_and_discard_drops_it_while_the_waiting_sync_is_applied(
        pipeline: Pipeline) -> None:
    rail_accounts(pipeline, "hold_drains = true\n")
    pipeline.start_simulator()
    sink = pipeline.start("sink", "sink")
    everyone = emails("d", 6)
    produce(pipeline, make_delta("Seg", add=everyone))
    assert wait_for(lambda: sim_members(pipeline, "acme", "Seg") == set(everyone)), pipeline.logs()
    drain = make_delta("Seg", kind="drain")
    later = make_delta("Seg", add=["late@example.com"], remove=[everyone[0]])
    produce(pipeline, drain, later)
    [row] = held_rows(pipeline, 1)
    assert row["delta_id"] == drain.delta_id and row["reason"] == "drain held (hold_drains)"
    assert row["waiting_deltas"] == [later.delta_id]

    sink.stop(signal.SIGKILL)  # the hold is on a topic, not in the sink's memory
    sink = pipeline.start("sink", "sink")
    # the restarted sink knows the hold: a sync arriving now waits behind it too
    later2 = make_delta("Seg", add=["late2@example.com"])
    produce(pipeline, later2)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and held_rows(pipeline, 1)[0]["waiting"] < 2:
        time.sleep(1)
    assert held_rows(pipeline, 1)[0]["waiting_deltas"] == [later.delta_id, later2.delta_id], pipeline.logs()
    assert sim_members(pipeline, "acme", "Seg") == set(everyone)
    discarded = cli(pipeline, "held", "discard", drain.delta_id)
    assert discarded["action"] == "discard"
    assert "then the 2 delta(s) waiting behind it are applied in order" in discarded["outcome"]
    expected = set(everyone[1:]) | {"late@example.com", "late2@example.com"}
    assert wait_for(lambda: sim_members(pipeline, "acme", "Seg") == expected, 90), pipeline.logs()
    assert wait_for(lambda: cli(pipeline, "held", "list") == [], 60), pipeline.logs()
    progress = dict(read_topic(pipeline, f"{pipeline.prefix}.sink.progress", at_least=3))
    assert progress[f"cordial|{drain.chunk_key}"]["discarded"] is True
    # the same drain delivered again is not applied: the list keeps its members
    produce(pipeline, drain, make_delta("Seg", add=["marker@example.com"]))
    expected.add("marker@example.com")
    assert wait_for(lambda: sim_members(pipeline, "acme", "Seg") == expected, 60), pipeline.logs()
    assert sink.stop() == 0
