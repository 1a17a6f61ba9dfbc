"""The sink's memory is bounded by its in-flight settings, not by the size of a sync (issue 15).

The rule (``poll_budget`` and ``should_pause``) is tested directly, with a property test of the loop that uses
it; the real sink process then applies a bulk sync many times larger than its in-flight bound, exactly."""

from __future__ import annotations

import re
import urllib.request

import pytest
from hypothesis import given
from hypothesis import strategies as st

from heapsync_dev.processes import free_port
from sinks.runner import poll_budget, should_pause
from tests.conftest import Pipeline
from tests.sink_helpers import make_delta, produce, read_topic, sim_members, sim_state, wait_for


def test_a_poll_takes_only_what_is_left_of_the_operations_bound() -> None:
    # 5,000-id chunks, 250,000 ids allowed: 50 chunks from empty, not the 500 a poll could return
    assert poll_budget(0, 0, 5000, 250_000, 5000) == 50
    assert poll_budget(10, 200_000, 5000, 250_000, 5000) == 10
    assert poll_budget(0, 0, 20, 250_000, 5000) == 20  # the chunk bound binds
    assert poll_budget(0, 0, 5000, 10**9, 1) == 500  # never more than one batch
    assert poll_budget(60, 300_000, 5000, 250_000, 5000) == 1  # past the bound: paused, the poll returns nothing


def test_pause_above_either_bound_and_resume_below_half_of_both() -> None:
    assert should_pause(False, 1, 250_000, 5000, 250_000)
    assert should_pause(False, 5000, 1, 5000, 250_000)
    assert not should_pause(False, 4999, 249_999, 5000, 250_000)
    assert should_pause(True, 10, 130_000, 5000, 250_000)  # still above half the ids
    assert not should_pause(True, 10, 120_000, 5000, 250_000)


@given(chunk_size=st.integers(1, 50), max_ids=st.integers(1, 500), max_chunks=st.integers(1, 40),
       steps=st.lists(st.tuples(st.integers(0, 50), st.booleans()), min_size=1, max_size=200))
def test_the_loop_never_holds_more_than_the_bound_plus_one_chunk(chunk_size: int, max_ids: int, max_chunks: int,
                                                                 steps: list[tuple[int, bool]]) -> None:
    """The runner's loop, modelled: poll (nothing while paused), then maybe finish the oldest chunk."""
    held: list[int] = []
    paused = False
    for size, finish in steps:
        paused = should_pause(paused, len(held), sum(held), max_chunks, max_ids)
        budget = poll_budget(len(held), sum(held), max_chunks, max_ids, chunk_size)
        if not paused:
            held.extend([min(max(1, size), chunk_size)] * budget)  # every chunk at most chunk_size operations
        assert sum(held) < max_ids + chunk_size
        assert len(held) < max_chunks + 1 or budget == 1
        if finish and held:
            held.pop(0)


def _inflight_ids(port: int) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        found = re.search(r'^heapsync_sink_inflight_ids\{sink="cordial"\} (\S+)$', resp.read().decode(), re.M)
    return float(found.group(1)) if found else None


@pytest.mark.integration
def test_a_bulk_sync_far_larger_than_the_inflight_bound_is_applied_exactly(pipeline: Pipeline) -> None:
    pipeline.start_simulator("--import-step", "0.02")
    metrics_port = free_port()
    sink = pipeline.start("sink", "sink", env=pipeline.env(
        HEAPSYNC_SINK_BULK_THRESHOLD="100", HEAPSYNC_DELTA_CHUNK_SIZE="100", HEAPSYNC_SINK_IMPORT_POLL_SECONDS="0.05",
        HEAPSYNC_SINK_MAX_INFLIGHT_IDS="300", HEAPSYNC_METRICS_PORT=str(metrics_port)))
    first = [f"u{i}@example.com" for i in range(4000)]
    chunks = [first[i:i + 100] for i in range(0, 4000, 100)]
    produce(pipeline, *[make_delta("Big", add=c, delta_id="big-1", chunk=n, chunks=len(chunks))
                        for n, c in enumerate(chunks, start=1)])
    seen: list[float | None] = []

    def done() -> bool:
        try:
            seen.append(_inflight_ids(metrics_port))
        except OSError:
            pass
        return sim_members(pipeline, "acme", "Big") == set(first)

    assert wait_for(done, 120, 0.05), pipeline.logs()
    # a follow-up: removes the first 1,200 and adds 1,200 new, in 100-operation chunks mixing both
    removed, added = first[:1200], [f"n{i}@example.com" for i in range(1200)]
    follow = [make_delta("Big", add=added[i:i + 50], remove=removed[i:i + 50], delta_id="big-2", chunk=n + 1,
                         chunks=24) for n, i in enumerate(range(0, 1200, 50))]
    produce(pipeline, *follow)
    expected = (set(first) - set(removed)) | set(added)
    assert wait_for(lambda: sim_members(pipeline, "acme", "Big") == expected, 120), pipeline.logs()
    assert sim_state(pipeline)["accounts"]["acme"]["jobs"] == {"Done": 64}  # one import per chunk, none redone
    held = [n for n in seen if n is not None]
    assert held and max(held) > 0, "the sink exports heapsync_sink_inflight_ids"
    assert max(held) < 300 + 100  # never more than the bound plus one chunk read ahead
    assert not read_topic(pipeline, f"{pipeline.prefix}.sink.dlq", timeout=1)
    assert sink.stop() == 0
