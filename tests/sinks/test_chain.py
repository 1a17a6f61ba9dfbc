"""The Cordial sink as a real process: Tansu broker, deltas produced straight into the deltas
topic, the simulator over HTTP. Each test checks what a user would: the lists in "Cordial",
the dead-letter topic, the progress topic."""

from __future__ import annotations

import signal

import pytest

from heapsync_dev.processes import free_port
from tests.conftest import Pipeline, http
from tests.sink_helpers import make_delta, produce, read_topic, sim_members, sim_state, wait_for

pytestmark = pytest.mark.integration


def emails(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}@example.com" for i in range(n)]


def two_accounts(pipeline: Pipeline) -> None:
    pipeline.write_accounts(
        "[accounts.acme]\n"
        f'heap_webhook_secrets = ["{pipeline.secret}"]\n'
        f'cordial_api_key = "{pipeline.cordial_key}"\n'
        f'cordial_base_url = "{pipeline.sim_url}/v2"\n'
        "[accounts.beta]\n"
        'heap_webhook_secrets = ["beta-webhook-secret"]\n'
        'cordial_api_key = "beta-key"\n'
        f'cordial_base_url = "{pipeline.sim_url}/v2"\n'
    )


def test_invalid_emails_are_dead_lettered_and_a_repeated_chunk_is_not_applied_twice(pipeline: Pipeline) -> None:
    pipeline.start_simulator()
    sink = pipeline.start("sink", "sink")
    good = emails("u", 20)
    first = make_delta("Seg", add=good + ["not-an-email", "also@bad"])
    produce(pipeline, first)
    assert wait_for(lambda: sim_members(pipeline, "acme", "Seg") == set(good)), pipeline.logs()

    # later delta removes u0; then the first chunk arrives again (a redelivery): u0 must stay removed
    second = make_delta("Seg", remove=["u0@example.com"])
    marker = make_delta("Seg", add=["last@example.com"])
    produce(pipeline, second, first, marker)
    expected = (set(good) - {"u0@example.com"}) | {"last@example.com"}
    assert wait_for(lambda: sim_members(pipeline, "acme", "Seg") == expected), pipeline.logs()

    dead = [v for _, v in read_topic(pipeline, f"{pipeline.prefix}.sink.dlq", at_least=2)]
    assert sorted(d["contact_id"] for d in dead) == ["also@bad", "not-an-email"]
    assert all(d["status"] == 422 and d["delta_id"] == first.delta_id and "valid email" in d["response"]
               for d in dead)

    progress = dict(read_topic(pipeline, f"{pipeline.prefix}.sink.progress", at_least=3))
    assert set(progress) == {f"cordial|{d.chunk_key}" for d in (first, second, marker)}
    assert progress[f"cordial|{first.chunk_key}"]["dead_lettered"] == 2
    assert "already applied" in sink.output()
    assert sink.stop() == 0


def test_revoked_key_pauses_that_account_while_another_continues(pipeline: Pipeline) -> None:
    two_accounts(pipeline)
    pipeline.start("simulator", "simulator", "--port", str(pipeline.sim_port),
                   "--account", f"acme={pipeline.cordial_key}", "--account", "beta=beta-key")
    from heapsync_dev.processes import wait_for_port

    wait_for_port("127.0.0.1", pipeline.sim_port, 30)
    http("POST", f"{pipeline.sim_url}/_sim/config", b'{"revoke": ["beta"]}')
    metrics_port = free_port()
    sink = pipeline.start("sink", "sink", env=pipeline.env(HEAPSYNC_SINK_AUTH_PROBE_SECONDS="0.5",
                                                            HEAPSYNC_METRICS_PORT=str(metrics_port)))
    produce(pipeline, make_delta("Seg", add=emails("b", 10), account="beta"),
            make_delta("Seg", add=emails("a", 10), account="acme"))
    assert wait_for(lambda: sim_members(pipeline, "acme", "Seg") == set(emails("a", 10))), pipeline.logs()
    produce(pipeline, make_delta("Other", add=emails("c", 5), account="acme"))
    assert wait_for(lambda: sim_members(pipeline, "acme", "Other") == set(emails("c", 5))), pipeline.logs()
    assert sim_members(pipeline, "beta", "Seg") == set()
    assert "account paused" in sink.output()
    metrics = http("GET", f"http://127.0.0.1:{metrics_port}/metrics").body
    assert 'heapsync_sink_account_paused{account="beta"} 1.0' in metrics
    assert 'heapsync_sink_operations_total{account="acme",kind="add",result="applied"} 15.0' in metrics

    http("POST", f"{pipeline.sim_url}/_sim/config", b'{"restore": ["beta"]}')
    assert wait_for(lambda: sim_members(pipeline, "beta", "Seg") == set(emails("b", 10))), pipeline.logs()
    assert "account resumed" in sink.output()
    assert read_topic(pipeline, f"{pipeline.prefix}.sink.dlq", timeout=3) == []


def test_outage_and_rate_limit_lose_nothing(pipeline: Pipeline) -> None:
    pipeline.start_simulator("--rate-limit", "40")
    pipeline.start("sink", "sink")
    produce(pipeline, make_delta("Seg", add=emails("x", 120)))
    assert wait_for(lambda: len(sim_members(pipeline, "acme", "Seg")) > 0, 60), pipeline.logs()
    http("POST", f"{pipeline.sim_url}/_sim/outage", b'{"seconds": 4}')  # mid-chunk
    produce(pipeline, make_delta("Seg", add=emails("y", 60), remove=emails("x", 10)),
            make_delta("Two", add=emails("z", 40)))
    expected = set(emails("x", 120)[10:]) | set(emails("y", 60))
    assert wait_for(lambda: sim_members(pipeline, "acme", "Seg") == expected, 120), pipeline.logs()
    assert wait_for(lambda: sim_members(pipeline, "acme", "Two") == set(emails("z", 40)), 60), pipeline.logs()
    state = sim_state(pipeline)
    assert state["outage_answers"] > 0
    assert read_topic(pipeline, f"{pipeline.prefix}.sink.dlq", timeout=3) == []


def test_sink_killed_mid_chunk_and_restarted_leaves_exact_lists(pipeline: Pipeline) -> None:
    pipeline.start_simulator("--latency", "0.01", "--rate-limit", "150")
    sink = pipeline.start("sink", "sink")
    big = emails("k", 600)
    produce(pipeline, make_delta("Seg", add=big), make_delta("Seg", add=emails("n", 50), remove=big[:200]))
    assert wait_for(lambda: len(sim_members(pipeline, "acme", "Seg")) >= 100, 60), pipeline.logs()
    sink.stop(signal.SIGKILL)
    assert len(sim_members(pipeline, "acme", "Seg")) < 600  # really killed mid-chunk
    sink = pipeline.start("sink", "sink")
    expected = set(big[200:]) | set(emails("n", 50))
    assert wait_for(lambda: sim_members(pipeline, "acme", "Seg") == expected, 120), pipeline.logs()
    # SIGTERM with work in flight: finishes or abandons cleanly and exits 0
    produce(pipeline, make_delta("Late", add=emails("l", 300)))
    assert wait_for(lambda: len(sim_members(pipeline, "acme", "Late")) > 0, 60), pipeline.logs()
    assert sink.stop(signal.SIGTERM) == 0
    sink = pipeline.start("sink", "sink")
    assert wait_for(lambda: sim_members(pipeline, "acme", "Late") == set(emails("l", 300)), 60), pipeline.logs()
    assert wait_for(lambda: "sink started" in sink.output(), 60)
    assert sink.stop() == 0


def test_bulk_import_path_end_to_end(pipeline: Pipeline) -> None:
    pipeline.start_simulator("--import-step", "0.05")
    sink = pipeline.start("sink", "sink", env=pipeline.env(HEAPSYNC_SINK_BULK_THRESHOLD="100",
                                                            HEAPSYNC_DELTA_CHUNK_SIZE="50",
                                                            HEAPSYNC_SINK_IMPORT_POLL_SECONDS="0.1"))
    produce(pipeline, make_delta("Seg", add=emails("old", 5)))  # small: REST path
    assert wait_for(lambda: sim_members(pipeline, "acme", "Seg") == set(emails("old", 5))), pipeline.logs()
    users = emails("b", 150)
    delta_id = "bulk-delta"
    chunks = [users[i:i + 50] for i in range(0, 150, 50)]
    chunks[2] = chunks[2][:-1] + ["broken-id"]
    produce(pipeline, *[make_delta("Seg", add=c, remove=emails("old", 5) if n == 1 else [], delta_id=delta_id,
                                   chunk=n, chunks=3) for n, c in enumerate(chunks, start=1)])
    expected = set(users[:-1])
    assert wait_for(lambda: sim_members(pipeline, "acme", "Seg") == expected, 60), pipeline.logs()
    state = sim_state(pipeline)["accounts"]["acme"]
    assert state["jobs"] == {"Done": 3}
    assert state["requests"] < 60  # three imports and their job polls, not 150 contact calls
    dead = [v for _, v in read_topic(pipeline, f"{pipeline.prefix}.sink.dlq", at_least=1)]
    assert [d["contact_id"] for d in dead] == ["broken-id"] and dead[0]["reason"] == "cordial import rejected the row"
    assert sink.stop() == 0


def test_the_chunk_log_line_says_how_many_were_applied_and_dead_lettered(pipeline: Pipeline) -> None:
    """Issue 13 #4: a chunk whose operations were dead-lettered was logged "applied" like any other.
    The line now counts both, and is a WARNING when any operation was dead-lettered."""
    import json

    pipeline.start_simulator()
    sink = pipeline.start("sink", "sink")
    clean = make_delta("Logged", add=emails("ok", 3))
    mixed = make_delta("Logged", add=emails("mixed", 2) + ["not-an-email", "also@bad"])
    refused = make_delta("Logged", add=["bad-one", "bad-two"])  # every operation dead-lettered
    produce(pipeline, clean, mixed, refused)
    assert wait_for(lambda: len(read_topic(pipeline, f"{pipeline.prefix}.sink.progress", timeout=0)) >= 3), \
        pipeline.logs()
    assert sink.stop() == 0
    lines = [json.loads(line) for line in sink.output().splitlines() if line.startswith("{")]
    applied = {line["delta_id"]: line for line in lines if line["msg"] == "delta chunk applied"}
    assert {d: (a["level"], a["operations"], a["applied"], a["dead_lettered"]) for d, a in applied.items()} == {
        clean.delta_id: ("info", 3, 3, 0),
        mixed.delta_id: ("warning", 4, 2, 2),
        refused.delta_id: ("warning", 2, 0, 2),
    }
    assert all("bad-one" not in json.dumps(line) for line in applied.values())  # counts, never contact ids
