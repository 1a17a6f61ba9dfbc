"""`heapsync trace` with the removal rail (issue 14 §1 and §4) on the real chain: Tansu, the sink as a
process, the Cordial simulator over HTTP, `heapsync held` and `heapsync trace` run as the CLI. A mass
removal in two chunks is held (both chunks shown held) and a later sync waits behind it, then released (applied, "released");
a second hold is discarded (shown discarded, the contact still a member). Runs once the rail is there."""

from __future__ import annotations

import time

import pytest

from tests.conftest import Pipeline
from tests.ops.test_e2e import cli
from tests.sink_helpers import make_delta, produce, sim_members, wait_for

pytest.importorskip("heapsync.held", reason="the removal rail (issue 14 §1) is not merged")
pytestmark = pytest.mark.integration

EVERYONE = [f"u{i}@example.com" for i in range(10)]


def outcomes(pipeline: Pipeline, contact: str) -> list[tuple[str, str]]:
    doc = cli(pipeline, "trace", contact)
    return [(s["change"], s["outcome"]) for lst in doc["lists"] for s in lst["steps"]]


def until(pipeline: Pipeline, contact: str, expected: list[tuple[str, str]], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    seen: list[tuple[str, str]] = []
    while time.monotonic() < deadline:
        seen = outcomes(pipeline, contact)
        if seen == expected:
            return
        time.sleep(1)
    raise AssertionError(f"trace of {contact}: {seen}, wanted {expected}\n{pipeline.logs()}")


def test_trace_shows_held_waiting_released_and_discarded_changes(pipeline: Pipeline) -> None:
    pipeline.write_accounts(
        "[accounts.acme]\n"
        f'heap_webhook_secrets = ["{pipeline.secret}"]\n'
        f'cordial_api_key = "{pipeline.cordial_key}"\n'
        f'cordial_base_url = "{pipeline.sim_url}/v2"\n'
        "max_removal_fraction = 0.5\n")
    pipeline.start_simulator()
    pipeline.start("sink", "sink")
    produce(pipeline, make_delta("Seg", add=EVERYONE))
    assert wait_for(lambda: sim_members(pipeline, "acme", "Seg") == set(EVERYONE)), pipeline.logs()

    mass = make_delta("Seg", remove=EVERYONE[:4], chunks=2)  # 8 of 10 in two chunks: held, both chunks
    mass_2 = make_delta("Seg", remove=EVERYONE[4:8], delta_id=mass.delta_id, chunk=2, chunks=2)
    later = make_delta("Seg", add=["n0@example.com"])  # waits behind it
    produce(pipeline, mass, mass_2, later)
    until(pipeline, "u0@example.com", [("add", "applied"), ("remove", "held")])
    until(pipeline, "u5@example.com", [("add", "applied"), ("remove", "held")])  # chunk 2: held with its delta
    until(pipeline, "N0@example.com", [("add", "waiting")])
    [step] = [s for s in cli(pipeline, "trace", "u0@example.com")["lists"][0]["steps"] if s["outcome"] == "held"]
    assert step["detail"] == "would remove 8 of 10 members (more than 50%)" and step["at"]

    cli(pipeline, "held", "release", mass.delta_id)
    until(pipeline, "u0@example.com", [("add", "applied"), ("remove", "applied")])
    until(pipeline, "n0@example.com", [("add", "applied")])
    doc = cli(pipeline, "trace", "u0@example.com")
    assert doc["lists"][0]["member"] is False
    assert doc["lists"][0]["steps"][1]["detail"].endswith("(would remove 8 of 10 members (more than 50%)), released")
    until(pipeline, "u5@example.com", [("add", "applied"), ("remove", "applied")])
    assert cli(pipeline, "trace", "u5@example.com")["lists"][0]["steps"][1]["detail"].endswith(
        "(would remove 8 of 10 members (more than 50%)), released")

    members = {*EVERYONE[8:], "n0@example.com"}
    assert wait_for(lambda: sim_members(pipeline, "acme", "Seg") == members), pipeline.logs()
    again = make_delta("Seg", remove=sorted(members))  # 3 of 3: held, then discarded
    produce(pipeline, again)
    until(pipeline, "u9@example.com", [("add", "applied"), ("remove", "held")])
    cli(pipeline, "held", "discard", again.delta_id)
    until(pipeline, "u9@example.com", [("add", "applied"), ("remove", "discarded")])
    doc = cli(pipeline, "trace", "u9@example.com")
    assert doc["lists"][0]["member"] is True and sim_members(pipeline, "acme", "Seg") == members
    assert "discarded by an operator: nothing sent" in doc["lists"][0]["steps"][1]["detail"]
